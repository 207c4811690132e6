"""Benchmark the ring step's own cost on one GPU: block attention + log-sum-exp merge over R simulated ring ranks,
against the fused core on the same tokens (no communication: what the ring adds to the arithmetic).

GPU (the "Must show" run; bf16, Llama-3-8B heads: q (1, S, 32, 128), k and v (1, S, 8, 128)):
    python scripts/bench_ring.py --seqs 32768,131072 --rings 2,4,8
CPU check of the script itself (float32, tiny heads, the fp32 reference block core of parallel/sequence/ring.py):
    python scripts/bench_ring.py --tiny

What one row does, for a sequence of S tokens cut into the ring's 2R zig-zag chunks: every ring rank r (chunks r and
2R-1-r) runs its R steps, step t against rank (r - t) % R's k/v, as `causal_chunk_pairs` plans them (a whole block
where the key chunk precedes the query chunk, a causal square on the diagonal, nothing after), each block through a
core that returns its log-sum-exp, merged into the rank's fp32 output by `merge_block` (the ring's own merge). All
R x R steps run one after another on this GPU, so the ring's total work on these tokens is timed against one fused
causal call. Forward only: the ring's backward is the same block plan with the core's backward.
Block cores (each returns (out, lse)):
  flash      flash-attn-4 (`flash_attn.cute.flash_attn_func(..., return_lse=True)`), Hopper and newer
  flex       `torch.nn.attention.flex_attention` (compiled, `return_aux=AuxRequest(lse=True)`, causal BlockMask)
  reference  ring.block_attention, the fp32 reference core with an explicit mask (CPU; --tiny)
A core that cannot run here prints one row saying why, and the run goes on.
Columns:
  fused ms     the same core, one causal call on the whole sequence
  sdpa ms      F.scaled_dot_product_attention(is_causal=True, enable_gqa=True) on the whole sequence (cuDNN / flash)
  blocks ms    the R x R steps' block calls alone (no merge)
  merge ms     ring ms - blocks ms: the log-sum-exp merges
  ring ms      blocks + merges: the ring's arithmetic on these tokens
  ring/fused   ring ms / fused ms (the target: within 1.10)
  ring/sdpa    ring ms / sdpa ms
  err          max |ring out - fused out| / max |fused out| (the ring reproduces the fused core)
Times are medians over --iters runs after --warmup (CUDA events on GPU, perf_counter on CPU).
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

from megalysses.parallel.sequence.ring import block_attention, causal_chunk_pairs, merge_block

Core = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool], tuple[torch.Tensor, torch.Tensor]]


# ---------------------------------------------------------------------------------------- block cores (out, lse)


def reference_core(scale: float) -> Core:
    """The ring's fp32 reference block core: (b, s, h, d) -> (out (b, sq, h, d) fp32, lse (b, h, sq))."""
    def core(q, k, v, causal):
        mask = torch.ones(q.shape[1], k.shape[1], dtype=torch.bool, device=q.device)
        return block_attention(q, k, v, (mask.tril() if causal else mask).unsqueeze(0), scale)
    return core


def flash_core(scale: float) -> Core:
    """flash-attn-4's dense function with its log-sum-exp (b, h, s), GQA without repeating kv heads."""
    from flash_attn.cute import flash_attn_func  # ImportError: reported as the row's reason

    def core(q, k, v, causal):
        out, lse = flash_attn_func(q, k, v, softmax_scale=scale, causal=causal, return_lse=True)
        return out, lse
    return core


def flex_core(scale: float) -> Core:
    """torch's FlexAttention with a causal BlockMask for diagonal blocks; layout (b, h, s, d) inside. Compiled on
    GPU; eager (unfused, the scores materialised) on CPU, where compiled flex returns no log-sum-exp."""
    from torch.nn.attention.flex_attention import AuxRequest, create_block_mask, flex_attention

    compiled = torch.compile(flex_attention, dynamic=False)
    masks: dict[tuple[int, str], object] = {}

    def causal_mask(length: int, device):
        key = (length, str(device))
        if key not in masks:
            masks[key] = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, length, length, device=device)
        return masks[key]

    def core(q, k, v, causal):
        block_mask = causal_mask(q.shape[1], q.device) if causal else None
        attend = compiled if q.is_cuda else flex_attention
        out, aux = attend(*(t.transpose(1, 2) for t in (q, k, v)), block_mask=block_mask, scale=scale,
                          enable_gqa=True, return_aux=AuxRequest(lse=True))
        return out.transpose(1, 2), aux.lse
    return core


CORES = {"flash": flash_core, "flex": flex_core, "reference": reference_core}


# ------------------------------------------------------------------------------------------- the simulated ring


def simulated_ring(core: Core, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ranks: int,
                   merge: bool = True) -> list[torch.Tensor]:
    """Every ring rank's R steps on one device: -> the output of each of the 2R chunks (b, s / 2R, h, d) fp32, in
    sequence order (zeros without `merge`, which times the block calls alone)."""
    qc, kc, vc = (t.chunk(2 * ranks, dim=1) for t in (q, k, v))
    b, c, h, d = qc[0].shape
    out = [q.new_zeros((b, c, h, d), dtype=torch.float32) for _ in qc]  # per query chunk: every rank's two halves
    lse = [q.new_full((b, h, c), float("-inf"), dtype=torch.float32) for _ in qc]
    for rank in range(ranks):
        for step in range(ranks):
            for i, j, causal in causal_chunk_pairs(rank, (rank - step) % ranks, ranks):
                block_out, block_lse = core(qc[i], kc[j], vc[j], causal)
                if merge:
                    merge_block(out[i], lse[i], block_out, block_lse)
    return out


# ------------------------------------------------------------------------------------------------------ timing


def median_ms(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> float:
    """Median wall time of fn in milliseconds (CUDA events on GPU)."""
    times = []
    for i in range(warmup + iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            elapsed = start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            fn()
            elapsed = (time.perf_counter() - t0) * 1e3
        if i >= warmup:
            times.append(elapsed)
    return statistics.median(times)


def sdpa(q, k, v, scale):
    """The fused public core on the whole sequence: (b, s, h, d) in and out."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True).transpose(1, 2)


def fused(core: Core, q, k, v) -> torch.Tensor:
    return core(q, k, v, True)[0]


def rows_for_seq(args, s: int, device, dtype) -> list[tuple]:
    """One row per (core, ring size) at sequence length s."""
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(1, s, args.heads, args.head_dim, device=device, dtype=dtype, generator=g)
    k, v = (torch.randn(1, s, args.kv_heads, args.head_dim, device=device, dtype=dtype, generator=g) for _ in range(2))
    scale = args.head_dim ** -0.5
    timed = lambda fn: median_ms(fn, device, args.warmup, args.iters)  # noqa: E731
    sdpa_ms = timed(lambda: sdpa(q, k, v, scale))
    rows = []
    for name in args.cores:
        try:
            core = CORES[name](scale)
            whole = fused(core, q, k, v).float()
            fused_ms = timed(lambda: fused(core, q, k, v))
        except Exception as e:  # noqa: BLE001 - a core that cannot run here is a row saying why
            rows.append((s, "-", name, f"cannot run: {type(e).__name__}: {str(e).splitlines()[0][:90]}"))
            continue
        for ranks in args.rings:
            if s % (2 * ranks):
                rows.append((s, ranks, name, f"skipped: {s} tokens do not split into 2R = {2 * ranks} chunks"))
                continue
            ring_out = torch.cat(simulated_ring(core, q, k, v, ranks), dim=1)
            err = float((ring_out - whole).abs().max() / whole.abs().max())
            del ring_out
            blocks_ms = timed(lambda: simulated_ring(core, q, k, v, ranks, merge=False))
            ring_ms = timed(lambda: simulated_ring(core, q, k, v, ranks))
            rows.append((s, ranks, name, fused_ms, sdpa_ms, blocks_ms, ring_ms - blocks_ms, ring_ms,
                         ring_ms / fused_ms, ring_ms / sdpa_ms, err))
    return rows


def print_table(rows: list[tuple]) -> None:
    head = ("S", "R", "core", "fused ms", "sdpa ms", "blocks ms", "merge ms", "ring ms", "ring/fused", "ring/sdpa",
            "err")
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    for row in rows:
        if len(row) == 4:
            print(f"| {row[0]} | {row[1]} | {row[2]} | {row[3]} |")
            continue
        s, r, name, *ms, rel_fused, rel_sdpa, err = row
        print(f"| {s} | {r} | {name} | " + " | ".join(f"{m:.2f}" for m in ms) +
              f" | {rel_fused:.3f} | {rel_sdpa:.3f} | {err:.1e} |")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seqs", default="32768,131072", help="sequence lengths S, comma-separated")
    p.add_argument("--rings", default="2,4,8", help="ring sizes R, comma-separated")
    p.add_argument("--cores", default=None, help=f"block cores, comma-separated, of {', '.join(CORES)} (default: "
                   "flash,flex; reference with --tiny)")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--tiny", action="store_true", help="CPU, float32, 4 q / 2 kv heads x 16, S 64 and 256, the "
                   "reference core unless --cores says otherwise: checks the script and the ring's numbers without a "
                   "GPU")
    args = p.parse_args(argv)
    if args.tiny:
        args.seqs, args.heads, args.kv_heads, args.head_dim = "64,256", 4, 2, 16
        args.warmup, args.iters = 1, 3
    args.cores = args.cores or ("reference" if args.tiny else "flash,flex")
    args.seqs = [int(x) for x in args.seqs.split(",")]
    args.rings = [int(x) for x in args.rings.split(",")]
    args.cores = args.cores.split(",")
    unknown = [c for c in args.cores if c not in CORES]
    if unknown:
        p.error(f"unknown core(s) {unknown}: choose from {', '.join(CORES)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    cuda = torch.cuda.is_available() and not args.tiny
    device, dtype = (torch.device("cuda"), torch.bfloat16) if cuda else (torch.device("cpu"), torch.float32)
    name = torch.cuda.get_device_name() if cuda else "CPU"
    print(f"ring step vs fused core, one device ({name}), {dtype}, q heads {args.heads}, kv heads {args.kv_heads}, "
          f"head dim {args.head_dim}, forward")
    rows = []
    with torch.no_grad():
        for s in args.seqs:
            rows += rows_for_seq(args, s, device, dtype)
    print_table(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
