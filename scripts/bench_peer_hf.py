"""megalysses against what a user would pick instead on one GPU: Hugging Face transformers (LlamaForCausalLM, SDPA
attention, bf16 parameters, torch fused AdamW), with Liger kernels when asked, on the same geometry, sequence, batch
and micro-batches, in one process and one run (issue 23).

GPU (one H200; Liger staged as ../shared/DEVICE.md "Peer baseline" says):
    python3 scripts/bench_peer_hf.py --config gpu-bench model=llama-3.2-1b train.global_batch_size=8 \\
        train.micro_batch_size=1 --seq-len 8192 --liger
    python3 scripts/bench_peer_hf.py --config gpu-bench model=llama-3-8b model.num_layers=16 \\
        train.global_batch_size=4 train.micro_batch_size=1 --seq-len 8192 --liger
    python3 scripts/bench_peer_hf.py ... --seq-len 131072 --liger --hf-checkpointing memory.recompute=full ...
CPU check (tiny geometry, float32, no Liger, no memory figures):
    python scripts/bench_peer_hf.py --tiny

The megalysses row is a megalysses-bench row (its Bench, the trainer's own train_step) of the run config and
overrides; the HF row builds the same geometry as a LlamaConfig (models/hf.py: hf_config_from_gpt) and runs, per
step, one forward + backward per micro-batch (loss / micro-batches), gradient clipping at train.grad_clip, and
AdamW (megalysses.optim.build_optimizer: the same groups, betas, eps and fused kernel, on the bf16 parameters). Both see the same random tokens; `--warmup` untimed steps, then `--steps` timed ones. Columns: step ms, tokens
per second, peak GiB (torch.cuda.max_memory_allocated from the first warm-up step on; weights included).

Memory the HF side does not keep, from the parameter count P (bytes): fp32 master weights 4P, fp32 main gradients
4P and fp32 AdamW moments 8P (theirs: bf16 parameters 2P, bf16 gradients 2P, bf16 moments 4P, all of which we also
have in some form). Issue 23's memory bound is HF's peak plus that allowance (16P); the net difference of the
persistent state (ours 18P: bf16 weights, fp32 masters, main gradients, moments; theirs 8P) is 10P.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import os
import sys
import tempfile
import time
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from megalysses.bench import Bench, describe_setup, random_rows
from megalysses.config import RunConfig
from megalysses.models.hf import hf_config_from_gpt
from megalysses.optim import build_optimizer
from megalysses.train import QUICKSTART, load_checked
from megalysses.trainer import with_seq_len

TINY = ["model=tiny", "layout=single", "train.nproc=1", "train.device=cpu", "train.dtype=float32",
        "train.global_batch_size=4", "train.micro_batch_size=2", "train.init=device"]
"""The --tiny run: the bundled tiny model on one CPU process, two micro-batches of two sequences."""

GIB = 2 ** 30


@contextlib.contextmanager
def one_process_group(device: torch.device):
    """torch.distributed with this process as the only rank (NCCL on CUDA, gloo on CPU), as megalysses needs."""
    with tempfile.TemporaryDirectory() as tmp:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        store = dist.FileStore(os.path.join(tmp, "store"), 1)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_gib(device: torch.device) -> Optional[float]:
    return torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None


def release(device: torch.device) -> None:
    """Return what the last side freed to the device, so the next side's peak starts from the same ground."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


# ----------------------------------------------------------------------------------------------------- megalysses


def megalysses_row(cfg: RunConfig, seq_len: int, steps: int, warmup: int) -> dict:
    """A megalysses-bench row of this config at seq_len (the bench's own Bench.measure)."""
    bench = Bench(cfg)
    row = bench.measure(seq_len, steps, warmup)
    del bench
    return {"side": "megalysses", "setup": describe_setup(with_seq_len(cfg, seq_len)), "step_s": row["s/step"],
            "tok/s": row["tok/s"], "peak GiB": row["peak GiB"], "loss": row["loss"]}


# ------------------------------------------------------------------------------------------------------------- HF


def build_hf_model(cfg: RunConfig, device: torch.device, liger: bool, checkpointing: bool) -> torch.nn.Module:
    """LlamaForCausalLM of cfg.model's geometry on the device, SDPA attention, in the run's dtype (bf16 parameters
    for a bf16 run), with Liger's RoPE, RMSNorm, SwiGLU and fused linear cross-entropy when `liger`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if liger:
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=True)
    dtype = torch.bfloat16 if cfg.train.dtype == "bfloat16" else torch.float32
    config = LlamaConfig(**hf_config_from_gpt(cfg.model, "llama"))
    config.use_cache = False
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, attn_implementation="sdpa", dtype=dtype)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def hf_step(model, optimizer, micro_batches, grad_clip: float) -> float:
    """One optimizer step as a transformers user writes it: mean loss per micro-batch / their number, clip, AdamW."""
    total = 0.0
    for ids in micro_batches:
        loss = model(input_ids=ids, labels=ids).loss / len(micro_batches)  # HF shifts the labels itself
        loss.backward()
        total += loss.detach()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(total)


def hf_row(cfg: RunConfig, rows: torch.Tensor, device: torch.device, steps: int, warmup: int, liger: bool,
           checkpointing: bool) -> dict:
    """Time the HF model on the same token rows (global batch, seq), cut into the run's micro-batches."""
    model = build_hf_model(cfg, device, liger, checkpointing)
    t = cfg.train
    optimizer = build_optimizer(model, t, device.type)  # our AdamW groups and settings (fused on CUDA), on HF's bf16 parameters
    micro = [m.to(device) for m in rows.split(t.micro_batch_size)]
    release(device)
    for _ in range(warmup):
        hf_step(model, optimizer, micro, t.grad_clip)
    sync(device)
    tic = time.perf_counter()
    losses = [hf_step(model, optimizer, micro, t.grad_clip) for _ in range(steps)]
    sync(device)
    step_s = (time.perf_counter() - tic) / steps
    setup = " ".join(["transformers", "+ liger" if liger else "", "sdpa", "bf16" if t.dtype == "bfloat16" else "fp32",
                      "checkpointing" if checkpointing else ""]).replace("  ", " ").strip()
    n_params = sum(p.numel() for p in model.parameters())
    row = {"side": "HF", "setup": setup, "step_s": step_s, "tok/s": rows.numel() / step_s,
           "peak GiB": peak_gib(device), "loss": losses[-1], "params": n_params}
    del model, optimizer, micro
    return row


# ---------------------------------------------------------------------------------------------------------- table


def not_kept_by_hf(params: int) -> dict:
    """GiB of the fp32 state megalysses keeps and HF does not: master weights, main gradients, AdamW moments."""
    return {"fp32 masters": 4 * params / GIB, "fp32 main grads": 4 * params / GIB, "fp32 moments": 8 * params / GIB}


def report(rows: list[dict], seq_len: int, cfg: RunConfig) -> str:
    """Both rows as a markdown table, the ratio, and the memory allowance of issue 23."""
    t = cfg.train
    lines = [f"seq {seq_len}, {t.global_batch_size} sequences per step in micro-batches of {t.micro_batch_size}, "
             f"{cfg.model.num_params() / 1e6:,.1f}M parameters",
             "| side | setup | step ms | tok/s | peak GiB | loss |", "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        peak = "-" if r["peak GiB"] is None else f"{r['peak GiB']:.1f}"
        lines.append(f"| {r['side']} | {r['setup']} | {r['step_s'] * 1e3:.1f} | {r['tok/s']:,.0f} | {peak} | "
                     f"{r['loss']:.4f} |")
    by_side = {r["side"]: r for r in rows}
    if len(by_side) == 2:
        ours, theirs = by_side["megalysses"], by_side["HF"]
        lines.append(f"ratio megalysses / HF: {ours['tok/s'] / theirs['tok/s']:.3f}x tok/s")
        extra = not_kept_by_hf(theirs["params"])
        parts = ", ".join(f"{k} {v:.1f}" for k, v in extra.items())
        lines.append(f"not kept by HF (GiB, from {theirs['params']:,} parameters): {parts}; "
                     f"total {sum(extra.values()):.1f}")
        if theirs["peak GiB"] is not None:
            budget = theirs["peak GiB"] + sum(extra.values())
            verdict = "within" if ours["peak GiB"] <= budget else "OVER"
            lines.append(f"memory bound (HF peak + that): {budget:.1f} GiB; megalysses peak {ours['peak GiB']:.1f} "
                         f"GiB: {verdict}")
    return "\n".join(lines)


def run(cfg: RunConfig, args: argparse.Namespace) -> str:
    device = torch.device("cuda", 0) if cfg.train.device == "cuda" else torch.device("cpu")
    seq_len = args.seq_len or cfg.train.seq_len
    rows = []
    with one_process_group(device):
        if args.only in ("both", "megalysses"):
            rows.append(megalysses_row(cfg, seq_len, args.steps, args.warmup))
            release(device)
        if args.only in ("both", "hf"):
            from megalysses.parallel import ParallelMesh

            ids, labels, _ = random_rows(cfg, ParallelMesh.single_device(), seq_len, seq_len)  # the bench's tokens
            rows.append(hf_row(cfg, ids, device, args.steps, args.warmup, args.liger, args.hf_checkpointing))
    return report(rows, seq_len, cfg)


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(QUICKSTART), help="run YAML (e.g. gpu-bench)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model=llama-3.2-1b train.global_batch_size=8")
    p.add_argument("--seq-len", type=int, default=None, help="sequence length (default: train.seq_len)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per side")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    p.add_argument("--liger", action="store_true", help="HF with Liger kernels (needs liger_kernel)")
    p.add_argument("--hf-checkpointing", action="store_true", help="HF gradient checkpointing (long sequences)")
    p.add_argument("--only", choices=("both", "megalysses", "hf"), default="both", help="run one side only")
    p.add_argument("--tiny", action="store_true", help="CPU check: the tiny model, float32, no Liger")
    args = p.parse_intermixed_args(argv)
    if args.steps < 1 or args.warmup < 0:
        p.error(f"--steps {args.steps} / --warmup {args.warmup}: need steps >= 1 and warmup >= 0")
    if args.tiny and args.liger:
        p.error("--tiny runs on the CPU, where Liger's Triton kernels do not: drop --liger")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    overrides = (TINY + ["train.seq_len=64"] if args.tiny else []) + ["train.init=device", *args.overrides]
    cfg = load_checked("bench_peer_hf", args.config, overrides, data=False,
                       seq_lens=[args.seq_len] if args.seq_len else ())
    if cfg is None:
        return 2
    if cfg.train.nproc != 1 or cfg.layout.tp * cfg.layout.sp * cfg.layout.pp * (cfg.layout.dp or 1) != 1:
        print(f"bench_peer_hf: one device only (train.nproc = {cfg.train.nproc}, layout {cfg.layout}): use "
              "layout=single train.nproc=1", file=sys.stderr)
        return 2
    print(run(cfg, args), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
