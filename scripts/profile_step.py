"""Profile one training step of a megalysses-bench row and print where its time goes, by kind: matmul, attention,
elementwise, norms/other, optimizer, communication, idle (megalysses/profiling.py names the kernels of each kind).

GPU (the 8K Llama-3.2-1B step of issue 23; any bench row's config and overrides work, under torchrun for several):
    python3 scripts/profile_step.py --config gpu-bench model=llama-3.2-1b train.global_batch_size=8 \\
        train.micro_batch_size=1 --seq-len 8192
    python3 scripts/profile_step.py ... memory.fused_loss=true           # the same step with the fused head + loss
CPU check (tiny model, one process; CPU ops classified by the same names, their self time):
    python scripts/profile_step.py --tiny

`--warmup` untimed steps (compilation, allocator), `--steps` timed steps without the profiler (the step time to
compare the profiled step's with), then one step under torch.profiler. Rank 0 prints the table: ms and % of the
profiled step's wall time per kind; idle is the wall time with no kernel running (CPU launch overhead, syncs,
exposed host work); overlap is time counted twice where kernels of two streams ran at once (communication beside
compute). `--top N` also lists the N kernels that took longest; `--trace DIR` writes rank 0's Chrome trace.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile, record_function

from megalysses.bench import Bench, describe_setup, random_rows
from megalysses.config import RunConfig
from megalysses.parallel.launch import add_debug_flag, apply_debug_flag, launch
from megalysses.profiling import breakdown_table, cpu_op_kind, kernel_kind, step_breakdown
from megalysses.train import QUICKSTART, load_checked
from megalysses.trainer import with_seq_len

TINY = ["model=tiny", "layout=single", "train.nproc=1", "train.device=cpu", "train.dtype=float32",
        "train.global_batch_size=4", "train.micro_batch_size=2", "train.seq_len=64"]
STEP = "megalysses.step"


def top_kernels(events, device: bool, n: int) -> str:
    """The n kernels (CPU: ops) with the most total time in the step, with their kind."""
    totals: dict[tuple[str, str], float] = defaultdict(float)
    for e in events:
        on_device = str(e.device_type).endswith("CUDA")
        if device and on_device:
            totals[e.name, kernel_kind(e.name)] += e.time_range.end - e.time_range.start
        elif not device and not on_device and e.name.startswith("aten::"):
            totals[e.name, cpu_op_kind(e)] += e.self_cpu_time_total
    lines = ["| kernel | kind | ms |", "|---|---|---:|"]
    for (name, kind), us in sorted(totals.items(), key=lambda kv: -kv[1])[:n]:
        lines.append(f"| {name[:110]} | {kind} | {us / 1e3:.2f} |")
    return "\n".join(lines)


def profile_rank(cfg: RunConfig, args: argparse.Namespace) -> None:
    """Warm up, time, profile one step on this rank; rank 0 prints the breakdown."""
    seq_len = args.seq_len or cfg.train.seq_len
    cfg = with_seq_len(cfg, seq_len)
    bench = Bench(cfg)
    device = bench.device.type == "cuda"
    batches = bench.trainer.batcher.micro_batches(*random_rows(cfg, bench.mesh, seq_len, seq_len))
    bench.steps(batches, args.warmup)
    bench.sync_device()
    tic = time.perf_counter()
    bench.steps(batches, args.steps)
    bench.sync_device()
    step_ms = (time.perf_counter() - tic) / args.steps * 1e3
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device else [])
    with profile(activities=activities) as prof:
        with record_function(STEP):
            bench.steps(batches, 1)
            bench.sync_device()
    if dist.get_rank() != 0:
        return
    events = prof.events()
    step = next(e for e in events if e.name == STEP)
    wall = step.time_range.end - step.time_range.start
    print(f"profile_step: {describe_setup(cfg)}, layout {bench.mesh.layout.describe()}, seq {seq_len}, "
          f"{cfg.train.global_batch_size} sequences per step in micro-batches of {cfg.train.micro_batch_size}; "
          f"step {step_ms:.1f} ms unprofiled (mean of {args.steps}), {wall / 1e3:.1f} ms profiled\n", flush=True)
    print(breakdown_table(step_breakdown(events, wall, device), wall, "GPU kernels" if device else "CPU ops"))
    if args.top:
        print("\n" + top_kernels(events, device, args.top))
    if args.trace:
        args.trace.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(args.trace / f"trace-seq{seq_len}-rank0.json.gz"))
    sys.stdout.flush()


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(QUICKSTART), help="run YAML (e.g. gpu-bench)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model=llama-3.2-1b memory.fused_loss=true")
    p.add_argument("--seq-len", type=int, default=None, help="sequence length (default: train.seq_len)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--steps", type=int, default=2, help="timed steps without the profiler")
    p.add_argument("--top", type=int, default=0, help="also list the N longest kernels")
    p.add_argument("--trace", type=Path, default=None, help="folder for rank 0's Chrome trace")
    p.add_argument("--tiny", action="store_true", help="CPU check: the tiny model on one process")
    add_debug_flag(p)
    args = p.parse_intermixed_args(argv)
    apply_debug_flag(args)
    if args.steps < 1 or args.warmup < 0:
        p.error(f"--steps {args.steps} / --warmup {args.warmup}: need steps >= 1 and warmup >= 0")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    overrides = (TINY if args.tiny else []) + ["train.init=device", *args.overrides]
    cfg = load_checked("profile_step", args.config, overrides, data=False,
                       seq_lens=[args.seq_len] if args.seq_len else ())
    if cfg is None:
        return 2
    return launch(profile_rank, cfg, args, nproc=cfg.train.nproc, device_type=cfg.train.device,
                  command="scripts/profile_step.py")


if __name__ == "__main__":
    sys.exit(main())
