"""megalysses-plan: what a run will use and how fast it will go, on any number of GPUs, before it starts.

    megalysses-plan --config gpu-sp4-8b-long                      # this layout on its nproc GPUs
    megalysses-plan --config gpu-bench model=llama-3.2-1b train.seq_len=131072 memory.recompute=auto
    megalysses-plan --config gpu-bench model=llama-3-8b --gpus 64 --search     # ranked layouts and savers

Prints the resolved config, one rank's memory by term against the device (and host) capacity, the predicted step
time by part, tokens/s per GPU and MFU. memory.* keys set to 'auto' are resolved as the trainer would. --search ranks
candidate layouts (tp, sp, pp, dp, ZeRO) with their fastest fitting savers, marks those that do not fit, and gives
the longest sequence the best one fits. Rates and their provenance: megalysses/plan/rates.yaml (--rates).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Optional, Sequence

from megalysses.config import ConfigError, RunConfig, load_run_config
from megalysses.models.config import AUTO, MemoryConfig

from .memory import GIB
from .search import Candidate, Capacity, describe_memory, evaluate, longest_sequence, resolve_auto, search
from .speed import rate_sources


def summary(cfg: RunConfig, world: int) -> str:
    """The resolved config in a few lines: model, layout, savers, batch and precision."""
    m, t = cfg.model, cfg.train
    layout = cfg.layout.resolve(world) if cfg.layout.dp is None else cfg.layout
    return (f"  model   {m.num_params() / 1e9:.2f}B parameters, {m.num_layers} layers, hidden {m.hidden_size}, "
            f"{m.num_heads}/{m.num_kv_heads} heads x {m.head_dim}, vocab {m.vocab_size}, core {m.attention_core}, "
            f"backend {m.backend}\n"
            f"  layout  {layout.describe()} (tp {layout.tp}, sp {layout.sp}, ring {layout.ring}, pp {layout.pp}, "
            f"dp {layout.dp}, zero {layout.zero}, schedule {layout.schedule}) on {world} ranks\n"
            f"  memory  {describe_memory(cfg.memory)}\n"
            f"  train   seq_len {t.seq_len}, micro-batch {t.micro_batch_size}, global batch {t.global_batch_size}, "
            f"{t.dtype}, optimizer offload {str(getattr(t, 'offload_optimizer', False)).lower()}")


def speed_report(candidate: Candidate) -> str:
    time = candidate.time
    parts = "\n".join(f"    {k:<34} {v * 1e3:10.1f} ms" for k, v in time.parts.items() if v > 0)
    return (f"  predicted step {time.seconds:.3f} s: {time.tokens_per_s:,.0f} tokens/s per device, MFU {time.mfu:.1%}"
            f"\n{parts}")


def report(cfg: RunConfig, world: int, capacity: Capacity) -> str:
    """The whole plan of one config (memory 'auto' resolved first): summary, memory breakdown, speed."""
    resolved, why = resolve_auto(cfg, world, capacity)
    candidate = evaluate(resolved, world, capacity)
    lines = [f"megalysses-plan: {capacity.describe()}", summary(resolved, world)]
    if why:
        lines.append(f"  auto    {why}")
    lines += [candidate.memory_plan.breakdown(), speed_report(candidate)]
    m, layout = resolved.model, candidate.layout
    unmodelled = [text for text, on in (
        ("ring attention's k/v blocks and p2p exchange", layout.ring > 1),
        ("Transformer Engine layers (saves modelled as the torch layers'; FP8 speed not modelled)",
         m.backend == "te" or resolved.train.fp8 != "none")) if on]
    if unmodelled:
        lines.append(f"  note    not modelled: {'; '.join(unmodelled)}")
    return "\n".join(lines)


def search_table(cfg: RunConfig, world: int, capacity: Capacity, top: int) -> str:
    rows = search(cfg, world, capacity, top=top)
    if not rows:
        return f"no layout of {world} ranks is valid for this model and batch (check train.global_batch_size)"
    head = ("| rank | layout | tp | tp-sp | sp | pp | dp | zero | recompute | offload | mlp tiles | loss tiles | "
            "GiB/rank | tok/s/GPU | MFU | fits |\n|" + "---|" * 16)
    body = []
    for i, c in enumerate(rows, 1):
        L, mem = c.layout, c.cfg.memory
        body.append(f"| {i} | {L.describe()} | {L.tp} | {str(L.tp_sequence_parallel).lower()} | {L.sp} | {L.pp} | "
                    f"{L.dp} | {L.zero} | {mem.recompute} | "
                    f"{str(mem.offload_activations).lower()} | {mem.mlp_tiles} | {mem.loss_tiles} | "
                    f"{c.memory_plan.device_total / GIB:.1f} | {c.time.tokens_per_s:,.0f} | {c.time.mfu:.1%} | "
                    f"{'yes' if c.fits else 'NO'} |")
    out = [head, *body]
    best = next((c for c in rows if c.fits), None)
    if best is not None:
        longest = longest_sequence(dataclasses.replace(best.cfg, memory=MemoryConfig(*(AUTO,) * 5)), world, capacity)
        out.append(f"longest sequence that fits layout {best.layout.describe()}: {longest:,} tokens"
                   if longest else "")
    return "\n".join(out)


def capacity_from_args(args, world: int) -> Capacity:
    from .capacity import capacity_for_device

    return capacity_for_device(args.device, args.gpu_memory, args.host_memory,
                               ranks_per_host=min(world, 8) if args.ranks_per_host is None else args.ranks_per_host)


def add_capacity_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gpus", type=int, default=None, help="world size to plan for (default: train.nproc)")
    parser.add_argument("--device", default="h200", choices=("h200", "h100"), help="device whose rates apply")
    parser.add_argument("--gpu-memory", type=float, default=None, help="GiB per GPU (default: the device's)")
    parser.add_argument("--host-memory", type=float, default=None, help="GiB of host RAM per node")
    parser.add_argument("--ranks-per-host", type=int, default=None, help="GPUs per node (default: min(gpus, 8))")


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    from megalysses.train import QUICKSTART

    parser = argparse.ArgumentParser(prog="megalysses-plan", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(QUICKSTART), help="run YAML (default: the bundled CPU quick-start)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.seq_len=131072 layout=sp4")
    add_capacity_args(parser)
    parser.add_argument("--search", action="store_true", help="rank candidate layouts and savers for --gpus")
    parser.add_argument("--top", type=int, default=20, help="rows of the --search table")
    parser.add_argument("--rates", action="store_true", help="print the device rates and where each comes from")
    return parser.parse_intermixed_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_run_config(args.config, args.overrides)
        world = args.gpus or cfg.train.nproc
        if args.gpus and cfg.layout.dp is not None:  # the layout file fixed dp for its own world: re-infer it
            cfg = dataclasses.replace(cfg, layout=dataclasses.replace(cfg.layout, dp=None))
        if not args.search:  # the search tries its own layouts
            cfg.check(world)
        capacity = capacity_from_args(args, world)
        if args.rates:
            print("\n".join(f"  {k}: {v}" for k, v in rate_sources(args.device).items()))
        if args.search:
            print(f"megalysses-plan --search: {world} x {capacity.describe()}")
            print(search_table(cfg, world, capacity, args.top))
            return 0
        print(report(cfg, world, capacity))
    except ConfigError as err:
        print(f"megalysses-plan: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
