"""Peak memory and step time of one forward + backward with and without each memory saver, on one device.

GPU (the "Must show" run: Llama-3-8B geometry with 4 of its 32 layers, S = 32768, bf16, one GPU):
    python3 scripts/bench_memory.py
    python3 scripts/bench_memory.py --seq 65536 --rows none,loss_tiles,all     # longer, selected rows
CPU smoke test (tiny model, float32, no memory figures):
    python scripts/bench_memory.py --device cpu --tiny

One row per saver (MemoryConfig): none, selective, full, full+offload, mlp_tiles, loss_tiles, fused_loss (the fused
head + loss), all (full + offload + mlp_tiles + loss_tiles). Each row builds the model afresh with the same seeded weights (initialised on the device),
runs `--warmup` untimed steps, then `--iters` timed steps. Columns:
  peak GiB     torch.cuda.max_memory_allocated over the timed steps (weights, gradients, activations, workspace)
  above GiB    peak minus the memory held before the step (the weights): what the step itself needs
  ms/step      median wall time of forward + backward (CUDA-synchronised)
  loss         mean per-token loss; grad norm: global norm of all parameter gradients. Every row must agree to
               the dtype's tolerance (checked at the end: exit status 1 if not). A row that runs out of memory
               prints OOM.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import statistics
import sys
import time
from contextlib import contextmanager

import torch

from megalysses.config import load_model_config
from megalysses.models.config import GPTConfig, MemoryConfig
from megalysses.models.gpt import GPT, init_on_device
from megalysses.parallel.mesh import ParallelMesh
from megalysses.parallel.sequence import IGNORE_INDEX


def saver_rows(tiles: int) -> dict[str, MemoryConfig]:
    return {
        "none": MemoryConfig(),
        "selective": MemoryConfig(recompute="selective"),
        "full": MemoryConfig(recompute="full"),
        "full+offload": MemoryConfig(recompute="full", offload_activations=True),
        "mlp_tiles": MemoryConfig(mlp_tiles=tiles),
        "loss_tiles": MemoryConfig(loss_tiles=tiles),
        "fused_loss": MemoryConfig(fused_loss=True),
        "all": MemoryConfig(recompute="full", offload_activations=True, mlp_tiles=tiles, loss_tiles=tiles),
    }


TOLERANCE = {torch.bfloat16: (5e-3, 5e-2), torch.float32: (1e-5, 1e-4)}  # relative: loss, grad norm


@contextmanager
def default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build(cfg: GPTConfig, memory: MemoryConfig, device: torch.device, dtype: torch.dtype) -> GPT:
    """The model allocated directly on the device in `dtype` (RoPE frequencies stay float32)."""
    with torch.device(device), default_dtype(dtype):
        model = GPT(cfg, ParallelMesh.single_device(device.type), memory=memory)
    init_on_device(model, seed=1234)
    return model


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_row(cfg, memory, ids, labels, args, device, dtype) -> dict:
    """Build, warm up, then time `iters` forward + backward steps; returns the row's figures."""
    model = build(cfg, memory, device, dtype)
    cuda = device.type == "cuda"
    total = (labels != IGNORE_INDEX).sum().double()

    def step():
        model.zero_grad(set_to_none=True)
        loss = model(ids, labels=labels, total_valid=total)  # the mean loss (the trainer's token-weighted form)
        loss.backward()
        return loss

    for _ in range(args.warmup):
        step()
    model.zero_grad(set_to_none=True)
    sync(device)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device) if cuda else 0
    times = []
    for _ in range(args.iters):
        t0 = time.perf_counter()
        loss = step()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    peak = torch.cuda.max_memory_allocated(device) if cuda else None
    grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.float().norm() for p in model.parameters()])).item()
    return dict(peak=peak, above=None if peak is None else peak - before, ms=statistics.median(times),
                loss=loss.item(), grad_norm=grad_norm)


def model_config(args) -> GPTConfig:
    if args.tiny:
        cfg = GPTConfig(vocab_size=1000, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                        intermediate_size=172)
    else:
        cfg = load_model_config(args.model)
    return dataclasses.replace(cfg, num_layers=args.layers, max_seq_len=max(cfg.max_seq_len, args.seq),
                               attention_core=args.core or cfg.attention_core)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama-3-8b", help="model file or bundled name (default llama-3-8b)")
    p.add_argument("--layers", type=int, default=None, help="blocks to build (default 4; 2 with --tiny)")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 32768; 256 with --tiny)")
    p.add_argument("--batch", type=int, default=1, help="sequences per step")
    p.add_argument("--tiles", type=int, default=8, help="mlp_tiles / loss_tiles of the tiled rows")
    p.add_argument("--rows", default=None, help="comma-separated subset of: " + ",".join(saver_rows(8)))
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float32"], help="default bf16 (float32 on CPU)")
    p.add_argument("--core", default=None, help="attention core override (sdpa, flash, auto)")
    p.add_argument("--tiny", action="store_true", help="a tiny model for a quick check of the script itself")
    args = p.parse_args(argv)
    args.layers = args.layers or (2 if args.tiny else 4)
    args.seq = args.seq or (256 if args.tiny else 32768)
    args.dtype = getattr(torch, args.dtype or ("float32" if args.device == "cpu" else "bfloat16"))
    return args


def gib(x) -> str:
    return "-" if x is None else f"{x / 2**30:.2f}"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: use --device cpu (with --tiny for a quick check)")
    device = torch.device(args.device)
    cfg = model_config(args)
    rows = saver_rows(args.tiles)
    names = args.rows.split(",") if args.rows else list(rows)
    unknown = [n for n in names if n not in rows]
    if unknown:
        sys.exit(f"--rows: unknown {unknown}; choose from {', '.join(rows)}")
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=gen).to(device)
    labels = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=gen).to(device)

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"# {where}, torch {torch.__version__}, {str(args.dtype).removeprefix('torch.')}, batch {args.batch} x "
          f"seq {args.seq}, {cfg.num_layers} layers of hidden {cfg.hidden_size} / intermediate "
          f"{cfg.intermediate_size} / heads {cfg.num_heads}:{cfg.num_kv_heads} / vocab {cfg.vocab_size}, "
          f"core {cfg.attention_core}, tiles {args.tiles}", flush=True)
    print(f"{'saver':<14}{'peak GiB':>10}{'above GiB':>11}{'ms/step':>10}{'loss':>12}{'grad norm':>12}", flush=True)
    results = {}
    for name in names:
        try:
            r = run_row(cfg, rows[name], ids, labels, args, device, args.dtype)
        except torch.OutOfMemoryError:
            r = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if r is None:
            print(f"{name:<14}{'OOM':>10}", flush=True)
            continue
        results[name] = r
        print(f"{name:<14}{gib(r['peak']):>10}{gib(r['above']):>11}{r['ms']:>10.1f}{r['loss']:>12.6f}"
              f"{r['grad_norm']:>12.6f}", flush=True)
    return check_agreement(results, args.dtype)


def check_agreement(results: dict, dtype: torch.dtype) -> int:
    """Every row's loss and gradient norm against the first row that ran; 1 if any differs beyond tolerance."""
    if len(results) < 2:
        return 0
    (first, ref), *others = results.items()
    loss_tol, norm_tol = TOLERANCE[dtype]
    loss_err = max(abs(r["loss"] - ref["loss"]) / abs(ref["loss"]) for _, r in others)
    norm_err = max(abs(r["grad_norm"] - ref["grad_norm"]) / abs(ref["grad_norm"]) for _, r in others)
    ok = loss_err <= loss_tol and norm_err <= norm_tol
    print(f"# against '{first}': max relative difference loss {loss_err:.2e} (tol {loss_tol:.0e}), grad norm "
          f"{norm_err:.2e} (tol {norm_tol:.0e}): {'agree' if ok else 'DISAGREE'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
