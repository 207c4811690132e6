"""Ring attention: k/v blocks travel round the sequence-parallel ranks, partial results merge by log-sum-exp.

Layout (causal load balancing, the "zig-zag" split): the sequence is cut into 2R chunks and rank r holds chunks r and
2R-1-r, so at every ring step each rank has the same amount of causal work. Tensors are (b, s/R, h, d).

The sp x ring hybrid (Ulysses inside, ring across): each ring rank's zig-zag shard is split contiguously over sp; the
Ulysses all-to-all gives every SP rank the whole ring shard for its head subset, and `ring_core` runs the ring over
the ring ranks that hold the same heads.

Each ring step runs a *block core* on (this rank's query chunk, one key chunk of the travelling k/v block), described by
a RingBlock (causal diagonal, whole, or cut by documents; blocks no document crosses are skipped) and returning
(out, lse) in fp32-mergeable form; its backward gets the final out and lse. The fp32 reference core here is one;
ring_cores.py has FlexAttention and flash-attn-4.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Protocol

import torch

from .. import collectives as C
from ..collectives import CommGroup

SEQ_DIM, HEAD_DIM = 1, 2  # activations are (b, s, h, d)


# ------------------------------------------------------------------------------------------- the zig-zag layout


def ring_chunks(rank: int, ranks: int) -> tuple[int, int]:
    """The two chunks (of 2R) a ring rank holds: r and its mirror 2R-1-r."""
    return rank, 2 * ranks - 1 - rank


def _check_ring_length(length: int, ranks: int) -> None:
    if length % (2 * ranks):
        raise ValueError(f"ring sharding: sequence length {length} is not divisible by 2 * ring ranks = {2 * ranks} "
                         f"(each rank holds two mirrored chunks of 2R); pad it to a multiple of {2 * ranks} first "
                         f"(pad_sequence_batch(..., multiple={2 * ranks})): padding sits after every real token, so "
                         "the causal mask hides it from them")


def ring_shard(x: torch.Tensor, group: CommGroup, dim: int = SEQ_DIM) -> torch.Tensor:
    """This rank's zig-zag shard of a whole sequence: chunks r and 2R-1-r (of 2R along dim), concatenated."""
    ranks = group.size
    _check_ring_length(x.shape[dim], ranks)
    chunks = x.chunk(2 * ranks, dim=dim)
    first, second = ring_chunks(group.rank, ranks)
    return torch.cat([chunks[first], chunks[second]], dim=dim).contiguous()


def ring_unshard(x: torch.Tensor, group: CommGroup, dim: int = SEQ_DIM) -> torch.Tensor:
    """The whole sequence from every rank's zig-zag shard (all-gather, then chunks back in order); no autograd."""
    ranks = group.size
    if x.shape[dim] % 2:
        raise ValueError(f"ring_unshard: a zig-zag shard holds two equal chunks, got length {x.shape[dim]} along "
                         f"dim {dim}; shard with ring_shard")
    pieces = C.all_gather(x.movedim(dim, 0), group, dim=0).movedim(0, dim).chunk(2 * ranks, dim=dim)
    ordered = [None] * (2 * ranks)  # pieces[2r], pieces[2r + 1] are rank r's chunks r and 2R-1-r
    for r in range(ranks):
        first, second = ring_chunks(r, ranks)
        ordered[first], ordered[second] = pieces[2 * r], pieces[2 * r + 1]
    return torch.cat(ordered, dim=dim)


def ring_token_index(rank: int, ranks: int, chunk: int, device=None) -> torch.Tensor:
    """Global sequence index (2 * chunk,) of each token a ring rank holds."""
    first, second = ring_chunks(rank, ranks)
    return torch.cat([torch.arange(first * chunk, (first + 1) * chunk, device=device),
                      torch.arange(second * chunk, (second + 1) * chunk, device=device)])


def document_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Document index (b, s) of each token of whole sequences: a document starts where a position does not continue
    the previous one (position_ids reset at each packed document)."""
    starts = position_ids[:, 1:] != position_ids[:, :-1] + 1  # (b, s - 1)
    return torch.cat([torch.zeros_like(position_ids[:, :1]), starts.long().cumsum(dim=1)], dim=1)


# --------------------------------------------------------------------------------------------- masks and plans


@dataclass(frozen=True)
class RingBlock:
    """One block of a ring step: this rank's query chunk (`rows` of its shard) against one key chunk (`cols` of the
    travelling k/v block). Whole when the key chunk precedes the query chunk, a causal square when they are the same
    chunk (`causal`); `docs` (query ids (b, c), key ids (b, c)) when document boundaries cut it, else None."""

    rows: slice
    cols: slice
    q_start: int  # global index of the first query and of the first key
    k_start: int
    causal: bool
    docs: Optional[tuple[torch.Tensor, torch.Tensor]] = None
    cache: dict = field(default_factory=dict, compare=False, repr=False)  # per-core derived masks, built once

    @property
    def shape(self) -> tuple[int, int]:
        return self.rows.stop - self.rows.start, self.cols.stop - self.cols.start

    def mask(self, device) -> torch.Tensor:
        """(b or 1, sq, sk) bool, explicit: query i may attend key j (what the reference core uses)."""
        sq, sk = self.shape
        iq = torch.arange(self.q_start, self.q_start + sq, device=device)
        ik = torch.arange(self.k_start, self.k_start + sk, device=device)
        allowed = (ik.unsqueeze(0) <= iq.unsqueeze(1)).unsqueeze(0)  # (1, sq, sk)
        if self.docs is not None:
            dq, dk = (d.to(device) for d in self.docs)
            allowed = allowed & (dq.unsqueeze(2) == dk.unsqueeze(1))
        return allowed


@dataclass(frozen=True)
class RingMasks:
    """Which (query, key) pairs may attend, for this rank's queries against any rank's k/v block: causal by global
    position, and within one document when `doc_ids` (b, s) of the whole sequence is given. Built once per batch;
    its plans (and the masks cores derive from them) are reused by every layer, forward and backward."""

    rank: int
    ranks: int
    chunk: int  # tokens per chunk: s / 2R
    doc_ids: Optional[torch.Tensor] = None  # (b, s), global order, rising along each row (document_ids)
    plans: dict = field(default_factory=dict, compare=False, repr=False)  # src -> list[RingBlock]

    def mask(self, src: int, device) -> torch.Tensor:
        """(b or 1, 2c, 2c) bool: this rank's query i may attend key j of rank src's block."""
        iq = ring_token_index(self.rank, self.ranks, self.chunk, device)
        ik = ring_token_index(src, self.ranks, self.chunk, device)
        allowed = (ik.unsqueeze(0) <= iq.unsqueeze(1)).unsqueeze(0)  # (1, 2c, 2c)
        if self.doc_ids is not None:
            dq, dk = self.doc_ids[:, iq], self.doc_ids[:, ik]  # (b, 2c)
            allowed = allowed & (dq.unsqueeze(2) == dk.unsqueeze(1))
        return allowed

    def plan(self, src: int) -> list[RingBlock]:
        """The blocks worth computing against rank src's k/v, one per (query chunk, key chunk) pair that attends at
        all (causal_chunk_pairs); with documents, a block no document crosses is skipped and a block inside one
        document in every row needs no document mask."""
        if src not in self.plans:
            self.plans[src] = [b for b in (self._block(qc, kc, diag, src) for qc, kc, diag in
                                           causal_chunk_pairs(self.rank, src, self.ranks)) if b is not None]
        return self.plans[src]

    def _block(self, qc: int, kc: int, diagonal: bool, src: int) -> Optional[RingBlock]:
        c = self.chunk
        local_q, local_k = ring_chunks(self.rank, self.ranks).index(qc), ring_chunks(src, self.ranks).index(kc)
        rows, cols = slice(local_q * c, (local_q + 1) * c), slice(local_k * c, (local_k + 1) * c)
        docs = None
        if self.doc_ids is not None:  # ids rise along the sequence: compare the chunks' end tokens
            dq, dk = self.doc_ids[:, qc * c:(qc + 1) * c], self.doc_ids[:, kc * c:(kc + 1) * c]  # (b, c)
            if not diagonal and not bool((dq[:, 0] == dk[:, -1]).any()):
                return None  # no document reaches from the key chunk into the query chunk
            if not bool((dq[:, -1] == dk[:, 0]).all()):
                docs = (dq, dk)
        return RingBlock(rows, cols, qc * c, kc * c, diagonal, docs)


def causal_chunk_pairs(rank: int, src: int, ranks: int) -> list[tuple[int, int, bool]]:
    """The causal ring step without masks (one document per row): (query chunk, key chunk, causal) for each pair of
    this rank's chunks and rank src's chunks (global chunk indices of 2R) that attends at all: key chunk before the
    query chunk -> whole block, the same chunk -> causal square, after -> skipped. What a fused block core runs."""
    return [(qc, kc, qc == kc) for qc in ring_chunks(rank, ranks) for kc in ring_chunks(src, ranks) if kc <= qc]


def ring_masks(group: CommGroup, local_len: int, positions: Optional[torch.Tensor] = None) -> RingMasks:
    """The masks for this rank's shard of length 2c; positions (b, 2c) is the zig-zag shard of the global
    position_ids (gathered once here to find documents), or None for one causal document per row."""
    if local_len % 2:
        raise ValueError(f"ring attention: a zig-zag shard holds two equal chunks, got local length {local_len}; "
                         "shard the sequence with ring_shard")
    doc_ids = None
    if positions is not None:
        if positions.dim() != 2 or positions.shape[1] != local_len:
            raise ValueError(f"ring attention: positions must be this rank's (b, {local_len}) zig-zag shard of the "
                             f"global position_ids, got shape {tuple(positions.shape)}")
        docs = document_ids(ring_unshard(positions, group, dim=1))
        doc_ids = docs if bool((docs != 0).any()) else None  # one document per row: plain causal
    return RingMasks(group.rank, group.size, local_len // 2, doc_ids)


# ------------------------------------------------------------------------------------- reference block core (fp32)


def _repeat_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    """GQA: (b, s, hk, d) -> (b, s, h, d), query head i using kv head i // (h / hk)."""
    return x if x.shape[HEAD_DIM] == heads else x.repeat_interleave(heads // x.shape[HEAD_DIM], dim=HEAD_DIM)


def _fold_kv(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """GQA gradient: (b, s, h, d) -> (b, s, hk, d), summing each kv head's query group."""
    b, s, h, d = x.shape
    return x if h == kv_heads else x.view(b, s, kv_heads, h // kv_heads, d).sum(dim=3)


def _scores(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """Masked scaled scores (b, h, sq, sk) in fp32; disallowed pairs are -inf."""
    s = torch.einsum("bqhd,bkhd->bhqk", q.float(), _repeat_kv(k, q.shape[HEAD_DIM]).float()) * scale
    return s.masked_fill(~mask.unsqueeze(1), float("-inf"))


def _finite(lse: torch.Tensor) -> torch.Tensor:
    """lse with -inf (a row that attends to nothing) replaced by 0, so exp(score - lse) gives 0, not nan."""
    return torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)


def block_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                    scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference block core, explicit mask, fp32: -> (out (b, sq, h, d), lse (b, h, sq)); empty rows: 0 and -inf."""
    s = _scores(q, k, mask, scale)  # (b, h, sq, sk)
    lse = torch.logsumexp(s, dim=-1)  # (b, h, sq)
    p = torch.exp(s - _finite(lse).unsqueeze(-1))
    out = torch.einsum("bhqk,bkhd->bqhd", p, _repeat_kv(v, q.shape[HEAD_DIM]).float())
    return out, lse


def block_attention_grads(q, k, v, do, lse, delta, mask, scale) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flash-attention backward of one block, fp32: dq (b, sq, h, d), dk, dv (b, sk, hk, d), given the final lse
    (b, h, sq) and delta = rowsum(dO * O) (b, h, sq) of the whole attention."""
    heads, kv_heads = q.shape[HEAD_DIM], k.shape[HEAD_DIM]
    kr, vr, do = _repeat_kv(k, heads).float(), _repeat_kv(v, heads).float(), do.float()
    p = torch.exp(_scores(q, k, mask, scale) - _finite(lse).unsqueeze(-1))  # (b, h, sq, sk)
    dv = torch.einsum("bhqk,bqhd->bkhd", p, do)
    ds = p * (torch.einsum("bqhd,bkhd->bhqk", do, vr) - delta.unsqueeze(-1))
    dq = torch.einsum("bhqk,bkhd->bqhd", ds, kr) * scale
    dk = torch.einsum("bhqk,bqhd->bkhd", ds, q.float()) * scale
    return dq, _fold_kv(dk, kv_heads), _fold_kv(dv, kv_heads)


def merge_block(out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor) -> None:
    """Online softmax merge in place, fp32: out (b, sq, h, d), lse (b, h, sq) absorb one block's partial result
    (block_out in any float dtype, scaled into fp32)."""
    new = torch.logaddexp(lse, block_lse)
    keep, take = torch.exp(lse - _finite(new)), torch.exp(block_lse - _finite(new))  # (b, h, sq)
    out.mul_(keep.transpose(1, 2).unsqueeze(-1)).add_(block_out * take.transpose(1, 2).unsqueeze(-1))
    lse.copy_(new)


# ------------------------------------------------------------------------------------------------- block cores


class BlockCore(Protocol):
    """What a ring step runs on one RingBlock: q (b, sq, h, d), k and v (b, sk, hk, d)."""

    name: str

    def forward(self, q, k, v, block: RingBlock, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """-> out (b, sq, h, d) in any float dtype and lse (b, h, sq) fp32 (merge_block accumulates in fp32); rows
        that see no key: 0 and -inf."""

    def backward(self, q, k, v, do, out, lse, delta, block: RingBlock,
                 scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> dq (b, sq, h, d), dk, dv (b, sk, hk, d), given the whole attention's final out (b, sq, h, d) and lse,
        delta = rowsum(dO * out) (b, h, sq) of these rows: the flash-attention backward of one block."""


class ReferenceBlockCore:
    """The fp32 reference block core: explicit (b, sq, sk) masks, plain torch ops; exact, for CPU and tests."""

    name = "reference"

    def forward(self, q, k, v, block: RingBlock, scale: float):
        return block_attention(q, k, v, block.mask(q.device), scale)

    def backward(self, q, k, v, do, out, lse, delta, block: RingBlock, scale: float):
        return block_attention_grads(q, k, v, do, lse, delta, block.mask(q.device), scale)


REFERENCE_CORE = ReferenceBlockCore()


# ------------------------------------------------------------------------------------------------ the ring passes


def forward_step(q, kv, blocks: list[RingBlock], scale: float, core: BlockCore, out, lse) -> None:
    """One ring step's arithmetic: this rank's q (b, sq, h, d) against a k/v block kv (2, b, sk, hk, d), every block
    of the step's plan through the core, merged into out (b, sq, h, d) and lse (b, h, sq), fp32, in place."""
    for block in blocks:
        qs, ks = block.rows, block.cols
        block_out, block_lse = core.forward(q[:, qs], kv[0][:, ks], kv[1][:, ks], block, scale)
        merge_block(out[:, qs], lse[:, :, qs], block_out, block_lse)


def output_delta(do: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """delta = rowsum(dO * O) (b, h, sq) in fp32, of the whole attention's output: the softmax backward's shift."""
    return (do.float() * out.float()).sum(-1).transpose(1, 2)


def backward_step(q, kv, do, out, lse, delta, blocks: list[RingBlock], scale: float, core: BlockCore, dq,
                  dkv) -> None:
    """One ring step's backward arithmetic: every block's gradients given the final out and lse, added to dq
    (b, sq, h, d) and to the k/v block's dkv (2, b, sk, hk, d), fp32, in place."""
    for block in blocks:
        qs, ks = block.rows, block.cols
        bq, bk, bv = core.backward(q[:, qs], kv[0][:, ks], kv[1][:, ks], do[:, qs], out[:, qs], lse[:, :, qs],
                                   delta[:, :, qs], block, scale)
        dq[:, qs] += bq
        dkv[0][:, ks] += bk
        dkv[1][:, ks] += bv


def _ring_forward(q, k, v, group: CommGroup, masks: RingMasks, scale: float,
                  core: BlockCore) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward ring: at step t this rank holds rank (r - t)'s k/v; the next block is in flight while this one runs."""
    b, sq, h, d = q.shape
    out = q.new_zeros((b, sq, h, d), dtype=torch.float32)
    lse = q.new_full((b, h, sq), float("-inf"), dtype=torch.float32)
    kv = torch.stack([k, v])  # (2, b, sk, hk, d): one message per step
    for step in range(group.size):
        src = (group.rank - step) % group.size
        following, pending = C.ring_pass(kv, group) if step + 1 < group.size else (None, [])
        forward_step(q, kv, masks.plan(src), scale, core, out, lse)
        for handle in pending:
            handle.wait()
        kv = following
    return out, lse


def _ring_backward(q, k, v, out, lse, do, group: CommGroup, masks: RingMasks, scale: float, core: BlockCore):
    """Backward ring: k/v travel as in the forward and dk/dv travel with them, one step behind, arriving home after
    R passes; each step's gradient pass is in flight while the next block runs."""
    delta = output_delta(do, out)  # (b, h, sq)
    dq = torch.zeros_like(q, dtype=torch.float32)
    kv = torch.stack([k, v])  # (2, b, sk, hk, d)
    dkv_in, dkv_pending = None, []
    for step in range(group.size):
        src = (group.rank - step) % group.size
        following, kv_pending = C.ring_pass(kv, group) if step + 1 < group.size else (None, [])
        acc = torch.zeros_like(kv, dtype=torch.float32)  # this block's dk/dv from our queries
        backward_step(q, kv, do, out, lse, delta, masks.plan(src), scale, core, dq, acc)
        for handle in dkv_pending:  # the previous ranks' share of this block's dk/dv
            handle.wait()
        if dkv_in is not None:
            acc += dkv_in
        dkv_in, dkv_pending = C.ring_pass(acc, group)  # after R passes a block's gradient is back with its owner
        for handle in kv_pending:
            handle.wait()
        kv = following
    for handle in dkv_pending:
        handle.wait()
    return dq.to(q.dtype), dkv_in[0].to(k.dtype), dkv_in[1].to(v.dtype)


class _RingAttention(torch.autograd.Function):
    """Ring attention whose backward runs the ring again (dk/dv travel with their k/v and return to their owner)."""

    @staticmethod
    def forward(ctx, q, k, v, group, masks, scale, core):
        out, lse = _ring_forward(q, k, v, group, masks, scale, core)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.group, ctx.masks, ctx.scale, ctx.core = group, masks, scale, core
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _ring_backward(q, k, v, out, lse, do.contiguous(), ctx.group, ctx.masks, ctx.scale, ctx.core)
        return dq, dk, dv, None, None, None, None


def _check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.shape != v.shape or k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3]:
        raise ValueError(f"ring attention: q (b, s/R, h, d) and k, v (b, s/R, hk, d) must agree; got q "
                         f"{tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[HEAD_DIM] % k.shape[HEAD_DIM]:
        raise ValueError(f"ring attention: {k.shape[HEAD_DIM]} kv heads do not divide {q.shape[HEAD_DIM]} query "
                         "heads; GQA needs whole query groups per kv head")


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: CommGroup,
                   positions: Optional[torch.Tensor] = None, scale: Optional[float] = None,
                   masks: Optional[RingMasks] = None, core: BlockCore = REFERENCE_CORE) -> torch.Tensor:
    """Ring attention over zig-zag shards: q (b, s/R, h, d), k, v (b, s/R, hk, d) -> (b, s/R, h, d), equal to causal
    attention over the whole sequence (within each packed document when positions (b, s/R), this rank's shard of
    the global position_ids, is given). Pass `masks` (ring_masks, once per batch) to skip the positions gather;
    `core` runs each block (the fp32 reference by default; ring_cores.py has the fused ones)."""
    _check_shapes(q, k, v)
    if masks is None:
        masks = ring_masks(group, q.shape[SEQ_DIM], positions)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return _RingAttention.apply(q, k, v, group, masks, scale, core)


def ring_core(group: CommGroup, block_core: BlockCore = REFERENCE_CORE):
    """Ring attention as a local attention core, `core(q, k, v, docs=RingMasks, scale=None)`: what ulysses_attention
    runs in its head-sharded region to make the sp x ring hybrid (q (b, s/R, h/sp, d) holds this ring rank's whole
    zig-zag shard); `block_core` runs each ring block."""
    def core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, docs: RingMasks,
             scale: Optional[float] = None) -> torch.Tensor:
        return ring_attention(q, k, v, group, scale=scale, masks=docs, core=block_core)
    return core
