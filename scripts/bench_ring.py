"""Benchmark the ring's arithmetic on one GPU, forward and forward + backward: R simulated ring ranks through the
ring's own step functions and block cores, against the same core's one fused call on the same tokens.

GPU (the "Must show" run; bf16, Llama-3-8B heads: q (1, S, 32, 128), k and v (1, S, 8, 128)):
    python scripts/bench_ring.py --seqs 32768,131072 --rings 2,4,8
    python scripts/bench_ring.py --seqs 32768,131072 --rings 4 --doc-len 4096     # packed documents of 4096
CPU check of the script itself (float32, tiny heads, the fp32 reference block core):
    python scripts/bench_ring.py --tiny

What one row does, for a sequence of S tokens cut into the ring's 2R zig-zag chunks: every ring rank r (chunks r and
2R-1-r) runs its R steps, step t against rank (r - t) % R's k/v, with parallel/sequence/ring.py's own code:
RingMasks.plan (one block per (query chunk, key chunk) pair that attends; with documents, blocks no document crosses
are skipped), `forward_step` (each block through the block core, merged by log-sum-exp in fp32) and `backward_step`
(each block's gradients from the final out and lse, dk/dv summed per k/v owner): what `ring_attention` runs between
its passes, without the passes. All R x R steps run one after another on this GPU, so this is the ring's whole
arithmetic on these tokens, timed against one fused causal call of the same core (forward, then forward + backward
through autograd). Plans and FlexAttention block masks are built once before timing (once per batch in the model,
shared by every layer).
Block cores (parallel/sequence/ring_cores.py; what model.attention_core picks under a ring):
  flash      flash-attn-4 (Hopper and newer): forward with its lse, flash-attn-4's backward kernel with the final
             out and lse; blocks cut by documents go to flex
  flex       torch FlexAttention, compiled: BlockMask from 128 x 128 tiles of each block; backward recomputes the
             block and back-propagates its lse-weighted share (flex's lse is differentiable)
  reference  the fp32 reference core (explicit masks; CPU; --tiny)
On CPU (--tiny --cores reference,flex) flex runs uncompiled and its fused call is the dense math of the same mask
(torch has no CPU FlexAttention backward): a check of the numbers, not of speed.
A core that cannot run here prints one row saying why, and the run goes on.
Columns:
  fused fwd / fwd+bwd ms   the same core, one causal call on the whole sequence (packed: per document)
  sdpa fwd+bwd ms          F.scaled_dot_product_attention(is_causal=True, enable_gqa=True), one document only
  ring fwd / fwd+bwd ms    the ring's arithmetic on these tokens
  ring/fused fwd, fwd+bwd  the ratios (the issue's target: within 1.10)
  err out, err grad        max |ring - fused| / max |fused| of the output and of the worst of dq, dk, dv
Times are medians over --iters runs after --warmup (CUDA events on GPU, perf_counter on CPU).
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from megalysses.parallel.sequence.ring import (REFERENCE_CORE, BlockCore, RingBlock, RingMasks, backward_step,
                                               document_ids, forward_step, output_delta, ring_chunks,
                                               ring_token_index)
from megalysses.parallel.sequence.ring_cores import (FLEX_BACKWARD_DEVICES, FlashBlockCore, FlexBlockCore,
                                                     dense_attention)

Fused = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


# ------------------------------------------------------------------------------- block cores and their fused call


def whole_block(s: int, doc_ids: Optional[torch.Tensor]) -> RingBlock:
    """The whole sequence as one causal block (with its documents): what the fused call computes."""
    return RingBlock(slice(0, s), slice(0, s), 0, 0, True, None if doc_ids is None else (doc_ids, doc_ids))


def build_core(name: str) -> tuple[BlockCore, Callable[[float, Optional[torch.Tensor]], Fused]]:
    """(block core, fused(scale, doc_ids) -> differentiable whole-sequence call of the same kernels)."""
    if name == "reference":
        def fused_reference(scale, doc_ids):
            return lambda q, k, v: dense_attention(q, k, v, whole_block(q.shape[1], doc_ids).mask(q.device), scale)[0]
        return REFERENCE_CORE, fused_reference
    flex = FlexBlockCore()

    def fused_flex(scale, doc_ids):
        def call(q, k, v):
            block = whole_block(q.shape[1], doc_ids)
            if q.device.type in FLEX_BACKWARD_DEVICES:
                return flex.attend(q, k, v, block, scale)[0]
            return dense_attention(q, k, v, block.mask(q.device), scale)[0]  # no CPU flex backward: the dense math
        return call
    if name == "flex":
        return flex, fused_flex
    core = FlashBlockCore(documents=flex)  # ImportError here: reported as the row's reason
    from megalysses.models.cores import Documents, FlashAttention, find_flash_attn

    flash = FlashAttention(find_flash_attn())

    def fused_flash(scale, doc_ids):  # dense causal, or varlen over the documents
        docs = None if doc_ids is None else Documents(doc_ids)
        return lambda q, k, v: flash(q, k, v, docs=docs, scale=scale)
    return core, fused_flash


CORES = ("flash", "flex", "reference")


# ------------------------------------------------------------------------------------------- the simulated ring


def zig_zag(x: torch.Tensor, ranks: int) -> list[torch.Tensor]:
    """Every ring rank's shard (b, 2c, ...) of a whole sequence (b, s, ...): chunks r and 2R-1-r."""
    chunks = x.chunk(2 * ranks, dim=1)
    return [torch.cat([chunks[i] for i in ring_chunks(r, ranks)], dim=1) for r in range(ranks)]


def unzig(shards: list[torch.Tensor], ranks: int) -> torch.Tensor:
    """The whole sequence back from every rank's shard."""
    chunk = shards[0].shape[1] // 2
    order = torch.cat([ring_token_index(r, ranks, chunk) for r in range(ranks)])
    whole = torch.empty_like(torch.cat(shards, dim=1))
    whole[:, order.to(whole.device)] = torch.cat(shards, dim=1)
    return whole


class SimulatedRing:
    """R ring ranks on one device: every rank's shards and block plans, stepped with ring.py's forward_step and
    backward_step (what ring_attention runs between its k/v passes)."""

    def __init__(self, core: BlockCore, q, k, v, ranks: int, doc_ids: Optional[torch.Tensor], scale: float):
        self.core, self.ranks, self.scale, self.dtype = core, ranks, scale, q.dtype
        self.q = zig_zag(q, ranks)
        self.kv = [torch.stack(pair) for pair in zip(zig_zag(k, ranks), zig_zag(v, ranks))]  # (2, b, 2c, hk, d)
        chunk = q.shape[1] // (2 * ranks)
        self.masks = [RingMasks(r, ranks, chunk, doc_ids) for r in range(ranks)]
        self.plans = [[m.plan((m.rank - t) % ranks) for t in range(ranks)] for m in self.masks]  # built once

    def forward(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Every rank's (out in the inputs' dtype, lse fp32)."""
        outs, lses = [], []
        for r, q in enumerate(self.q):
            b, sq, h, d = q.shape
            out = q.new_zeros((b, sq, h, d), dtype=torch.float32)
            lse = q.new_full((b, h, sq), float("-inf"), dtype=torch.float32)
            for t in range(self.ranks):
                forward_step(q, self.kv[(r - t) % self.ranks], self.plans[r][t], self.scale, self.core, out, lse)
            outs.append(out.to(self.dtype))
            lses.append(lse)
        return outs, lses

    def backward(self, outs, lses, grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Whole-sequence dq, dk, dv from every rank's blocks (dk/dv summed where their k/v came from)."""
        dos = zig_zag(grad_out, self.ranks)
        dqs = [torch.zeros_like(q, dtype=torch.float32) for q in self.q]
        dkvs = [torch.zeros_like(kv, dtype=torch.float32) for kv in self.kv]
        for r, q in enumerate(self.q):
            delta = output_delta(dos[r], outs[r])
            for t in range(self.ranks):
                src = (r - t) % self.ranks
                backward_step(q, self.kv[src], dos[r], outs[r], lses[r], delta, self.plans[r][t], self.scale,
                              self.core, dqs[r], dkvs[src])
        return unzig(dqs, self.ranks), unzig([x[0] for x in dkvs], self.ranks), unzig([x[1] for x in dkvs], self.ranks)

    def run(self, grad_out: torch.Tensor):
        outs, lses = self.forward()
        return (unzig(outs, self.ranks),) + self.backward(outs, lses, grad_out)


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


def with_backward(fn: Fused, q, k, v, grad_out) -> list[torch.Tensor]:
    """fn's output and (dq, dk, dv) through autograd."""
    x = [t.detach().requires_grad_() for t in (q, k, v)]
    out = fn(*x)
    out.backward(grad_out)
    return [out.detach()] + [t.grad for t in x]


def sdpa(q, k, v, scale):
    """The fused public core on the whole sequence: (b, s, h, d) in and out."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True).transpose(1, 2)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def inputs(args, s: int, device, dtype):
    """q, k, v, the output gradient and the document ids (None: one document) of a whole sequence."""
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(1, s, args.heads, args.head_dim, device=device, dtype=dtype, generator=g)
    k, v = (torch.randn(1, s, args.kv_heads, args.head_dim, device=device, dtype=dtype, generator=g) for _ in range(2))
    grad_out = torch.randn(1, s, args.heads, args.head_dim, device=device, dtype=dtype, generator=g)
    doc_ids = None
    if args.doc_len:
        doc_ids = document_ids(torch.arange(s, device=device).remainder(args.doc_len).unsqueeze(0))
    return q, k, v, grad_out, doc_ids


def rows_for_seq(args, s: int, device, dtype) -> list[tuple]:
    """One row per (core, ring size) at sequence length s."""
    q, k, v, grad_out, doc_ids = inputs(args, s, device, dtype)
    scale = args.head_dim ** -0.5
    timed = lambda fn: median_ms(fn, device, args.warmup, args.iters)  # noqa: E731
    sdpa_ms = timed(lambda: with_backward(lambda *x: sdpa(*x, scale), q, k, v, grad_out)) if doc_ids is None else None
    rows = []
    for name in args.cores:
        try:
            core, fused_of = build_core(name)
            fused = fused_of(scale, doc_ids)
            with torch.no_grad():
                fused_fwd_ms = timed(lambda: fused(q, k, v))
            want = with_backward(fused, q, k, v, grad_out)
            fused_ms = timed(lambda: with_backward(fused, q, k, v, grad_out))
        except Exception as e:  # noqa: BLE001 - a core that cannot run here is a row saying why
            rows.append((s, "-", name, f"cannot run: {type(e).__name__}: {str(e).splitlines()[0][:90]}"))
            continue
        for ranks in args.rings:
            if s % (2 * ranks):
                rows.append((s, ranks, name, f"skipped: {s} tokens do not split into 2R = {2 * ranks} chunks"))
                continue
            ring = SimulatedRing(core, q, k, v, ranks, doc_ids, scale)
            got = ring.run(grad_out)
            err_out, err_grad = relative(got[0], want[0]), max(relative(a, b) for a, b in zip(got[1:], want[1:]))
            del got
            ring_fwd_ms = timed(ring.forward)
            ring_ms = timed(lambda: ring.run(grad_out))
            rows.append((s, ranks, name, fused_fwd_ms, fused_ms, sdpa_ms, ring_fwd_ms, ring_ms,
                         ring_fwd_ms / fused_fwd_ms, ring_ms / fused_ms, err_out, err_grad))
    return rows


HEAD = ("S", "R", "core", "fused fwd ms", "fused fwd+bwd ms", "sdpa fwd+bwd ms", "ring fwd ms", "ring fwd+bwd ms",
        "ring/fused fwd", "ring/fused fwd+bwd", "err out", "err grad")


def print_table(rows: list[tuple]) -> None:
    print("| " + " | ".join(HEAD) + " |")
    print("|" + "|".join("---" for _ in HEAD) + "|")
    for row in rows:
        if len(row) == 4:
            print(f"| {row[0]} | {row[1]} | {row[2]} | {row[3]} |")
            continue
        s, r, name, fused_fwd, fused, sdpa_ms, ring_fwd, ring, ratio_fwd, ratio, err_out, err_grad = row
        times = [f"{fused_fwd:.2f}", f"{fused:.2f}", "-" if sdpa_ms is None else f"{sdpa_ms:.2f}", f"{ring_fwd:.2f}",
                 f"{ring:.2f}"]
        print(f"| {s} | {r} | {name} | " + " | ".join(times) +
              f" | {ratio_fwd:.3f} | {ratio:.3f} | {err_out:.1e} | {err_grad:.1e} |")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seqs", default="32768,131072", help="sequence lengths S, comma-separated")
    p.add_argument("--rings", default="2,4,8", help="ring sizes R, comma-separated")
    p.add_argument("--cores", default=None, help=f"block cores, comma-separated, of {', '.join(CORES)} (default: "
                   "flash,flex; reference with --tiny)")
    p.add_argument("--doc-len", type=int, default=0, help="packed documents of this many tokens (0: one document)")
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
    docs = f"documents of {args.doc_len}" if args.doc_len else "one document"
    print(f"ring vs fused core, one device ({name}), {dtype}, q heads {args.heads}, kv heads {args.kv_heads}, "
          f"head dim {args.head_dim}, {docs}, forward and forward + backward")
    # every (S, R) is new shapes for the compiled FlexAttention (a run trains at one): room for them all
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 16 * len(args.seqs) *
                                               (len(args.rings) + 1))
    rows = []
    for s in args.seqs:
        rows += rows_for_seq(args, s, device, dtype)
    print_table(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
