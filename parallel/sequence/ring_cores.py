"""Fused block cores for ring attention: FlexAttention (torch) and flash-attn-4, beside ring.py's fp32 reference.

A block core runs one RingBlock of a ring step and returns (out, lse) for merge_block's fp32 merge; its backward gets
the whole attention's final out and lse (the flash-attention backward of one block). Neither builds an (s x s) mask:
FlexAttention gets a BlockMask made from 128 x 128 tiles of the block (tiles no pair can attend to are skipped, tiles
inside one document and before the diagonal run without the mask function), flash-attn-4 a causal flag.

Backward. flash-attn-4 has a backward that takes an outside lse and out, so a block's gradient is one kernel call.
FlexAttention has none in its public API, but its log-sum-exp is differentiable (torch sends dL/dlse into its backward
kernel): recompute the block's (out_b, lse_b) with autograd and back-propagate the block's share of the final output,
`lse_weighted_grads`. torch has no FlexAttention backward on CPU (NotImplementedError in 2.13), so there the same
recompute runs through the dense math of the same mask; the forward is FlexAttention's own (uncompiled) on CPU too.
"""
from __future__ import annotations

import warnings
from typing import Callable, Optional

import torch
import torch.nn.attention.flex_attention as flex_api

from .ring import HEAD_DIM, BlockCore, RingBlock, _finite, _scores, _repeat_kv

FLEX_TILE = 128  # FlexAttention's sparse block size on GPU
FLEX_BACKWARD_DEVICES = ("cuda",)  # where torch's FlexAttention has a backward


# --------------------------------------------------------------------------------- backward by lse weighting


def lse_weighted_grads(attend: Callable, q, k, v, do, lse, delta) -> tuple[torch.Tensor, ...]:
    """A block's dq, dk, dv from a differentiable `attend(q, k, v) -> (out_b, lse_b)`: the final output is
    O = sum_b w_b O_b with w_b = exp(lse_b - lse), so block b gets dO_b = w_b dO and dlse_b = w_b (rowsum(dO O_b) -
    delta), delta = rowsum(dO O) (b, h, sq); together they give the block's dS = exp(S - lse) (dO V^T - delta)."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    with torch.enable_grad():
        out_b, lse_b = attend(q, k, v)  # (b, sq, h, d), (b, h, sq)
    weight = torch.exp(lse_b.detach().float() - _finite(lse))  # (b, h, sq): this block's share of each row
    grad_out = do.float() * weight.transpose(1, 2).unsqueeze(-1)
    grad_lse = weight * ((do.float() * out_b.detach().float()).sum(-1).transpose(1, 2) - delta)
    return torch.autograd.grad((out_b, lse_b), (q, k, v), (grad_out.to(out_b.dtype), grad_lse.to(lse_b.dtype)))


def dense_attention(q, k, v, mask: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable (out (b, sq, h, d), lse (b, h, sq)) by plain torch ops with an explicit mask (b or 1, sq, sk);
    a row that sees no key gives 0 and -inf with zero (not nan) gradients."""
    empty = ~mask.any(-1, keepdim=True)  # (b or 1, sq, 1)
    s = _scores(q, k, mask | empty, scale)  # an empty row attends everywhere (finite), then is cleared
    lse = torch.logsumexp(s, dim=-1)  # (b, h, sq)
    out = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, dim=-1), _repeat_kv(v, q.shape[HEAD_DIM]).float())
    lse = lse.masked_fill(empty.squeeze(-1).unsqueeze(1), float("-inf"))
    return out.masked_fill(empty.unsqueeze(-1), 0.0), lse


# ---------------------------------------------------------------------------------------- FlexAttention masks


def block_mask_mod(block: RingBlock) -> Optional[Callable]:
    """FlexAttention's mask function for a block, or None for a whole block. Three functions in all (none, causal,
    documents), capturing only tensors: a compiled flex_attention guards on the function's code, so every block of
    every batch reuses one of at most three graphs (per grad mode) instead of recompiling."""
    if block.docs is None:
        return _causal if block.causal else None
    dq, dk = block.docs  # (b, c) document ids of the query and the key chunk
    shift = torch.tensor(0 if block.causal else dk.shape[1], device=dq.device)  # a preceding key chunk: all causal

    def causal_same_document(b, h, qi, ki):
        return (qi + shift >= ki) & (dq[b, qi] == dk[b, ki])
    return causal_same_document


def _causal(b, h, qi, ki):
    return qi >= ki  # a diagonal block: query and key chunk start at the same global index


def _tile_ends(length: int, tile: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """First and last index (n,) of each tile of a length."""
    first = torch.arange(0, length, tile, device=device)
    return first, (first + tile).clamp(max=length) - 1


def block_tiles(block: RingBlock, tile: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(live, full) tile maps (b or 1, nq, nk) of a block without its (sq x sk) mask: live where some pair may attend
    (an over-estimate is only slower), full where every pair may (must be exact: full tiles skip the mask function).
    Document ids rise along the sequence, so a tile's ids span [id of its first token, id of its last]."""
    (sq, sk), q0, k0 = block.shape, block.q_start, block.k_start
    qa, qb = _tile_ends(sq, tile, device)
    ka, kb = _tile_ends(sk, tile, device)
    live = ((q0 + qb).unsqueeze(1) >= (k0 + ka).unsqueeze(0)).unsqueeze(0)  # (1, nq, nk): causal somewhere
    full = ((q0 + qa).unsqueeze(1) >= (k0 + kb).unsqueeze(0)).unsqueeze(0)  # causal everywhere
    if block.docs is not None:
        dq, dk = (d.to(device) for d in block.docs)  # (b, c)
        first_q, last_q = dq[:, qa].unsqueeze(2), dq[:, qb].unsqueeze(2)  # (b, nq, 1)
        first_k, last_k = dk[:, ka].unsqueeze(1), dk[:, kb].unsqueeze(1)  # (b, 1, nk)
        overlap = (first_q <= last_k) & (first_k <= last_q)
        one_document = (first_q == last_q) & (first_k == last_k) & (first_q == first_k)
        live, full = live & overlap, full & one_document
    return live, full


def _kv_blocks(tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """BlockMask's (count (b, 1, nq), indices (b, 1, nq, nk)) int32 of a tile map (b, nq, nk), live tiles first."""
    tiles = tiles.unsqueeze(1)
    order = torch.argsort((~tiles).to(torch.int8), dim=-1, stable=True)  # live columns first, in column order
    return tiles.sum(-1, dtype=torch.int32), order.to(torch.int32)


def flex_block_mask(block: RingBlock, tile: int, device):
    """The FlexAttention BlockMask of a block (None for a whole block), built from its tiles."""
    mask_mod = block_mask_mod(block)
    if mask_mod is None:
        return None
    live, full = block_tiles(block, tile, device)
    return flex_api.BlockMask.from_kv_blocks(*_kv_blocks(live & ~full), *_kv_blocks(full), BLOCK_SIZE=tile,
                                             mask_mod=mask_mod, seq_lengths=block.shape)


# ---------------------------------------------------------------------------------------------- the cores


def flex_with_lse(flex: Callable, q, k, v, block_mask, scale: float, gqa: bool):
    """flex_attention(...) -> (out, lse (b, h, sq), natural log): `return_aux=AuxRequest(lse=True)` where torch has
    it (2.9 on), else the older `return_lse=True`. Layout (b, h, s, d)."""
    if hasattr(flex_api, "AuxRequest"):
        out, aux = flex(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa,
                        return_aux=flex_api.AuxRequest(lse=True))
        return out, aux.lse
    return flex(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa, return_lse=True)


def _eager_flex(*args, **kwargs):
    """Uncompiled flex_attention (the scores materialised: CPU and tests), without its 'use torch.compile' warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return flex_api.flex_attention(*args, **kwargs)


class FlexBlockCore:
    """torch's FlexAttention per block: compiled on CUDA (one compiled function for every block), eager on CPU;
    GQA without repeating kv heads; packed documents through the block's tile mask and mask function."""

    name = "flex"

    def __init__(self, tile: int = FLEX_TILE):
        self.tile, self._compiled = tile, None

    def _flex(self, device) -> Callable:
        if device.type != "cuda":
            return _eager_flex
        if self._compiled is None:
            self._compiled = torch.compile(flex_api.flex_attention, dynamic=False)
        return self._compiled

    def block_mask(self, block: RingBlock, device):
        key = ("flex", self.tile, str(device))  # built once per batch, shared by every layer
        if key not in block.cache:
            block.cache[key] = flex_block_mask(block, self.tile, device)
        return block.cache[key]

    def attend(self, q, k, v, block: RingBlock, scale: float):
        """(out (b, sq, h, d) in q's dtype, lse (b, h, sq) fp32) of one block through flex_attention."""
        out, lse = flex_with_lse(self._flex(q.device), *(t.transpose(1, 2) for t in (q, k, v)),
                                 self.block_mask(block, q.device), scale, q.shape[HEAD_DIM] != k.shape[HEAD_DIM])
        return out.transpose(1, 2), lse

    def forward(self, q, k, v, block: RingBlock, scale: float):
        with torch.no_grad():  # inputs detached: the ring's own backward calls ours (and CPU flex refuses grads)
            out, lse = self.attend(q.detach(), k.detach(), v.detach(), block, scale)
        return out, lse.float()  # out in the inputs' dtype: merge_block scales it into fp32 without a copy

    def backward(self, q, k, v, do, out, lse, delta, block: RingBlock, scale: float):
        if q.device.type in FLEX_BACKWARD_DEVICES:
            attend = lambda *qkv: self.attend(*qkv, block, scale)  # noqa: E731
        else:  # no FlexAttention backward here: the same block's dense math
            attend = lambda *qkv: dense_attention(*qkv, block.mask(q.device), scale)  # noqa: E731
        return lse_weighted_grads(attend, q, k, v, do, lse, delta)


class FlashBlockCore:
    """flash-attn-4 per block (Hopper and newer, bf16/fp16): whole blocks and causal diagonals; blocks cut by
    documents go to `documents` (a FlexBlockCore). Its backward is flash-attn-4's own kernel run with the final out
    and lse, `_flash_attn_bwd`: the public function's lse carries no gradient, and ring implementations built on
    flash-attn call the same backward."""

    name = "flash"

    def __init__(self, documents: BlockCore):
        from flash_attn.cute import flash_attn_func
        from flash_attn.cute.interface import _flash_attn_bwd

        self._forward, self._backward, self.documents = flash_attn_func, _flash_attn_bwd, documents

    def forward(self, q, k, v, block: RingBlock, scale: float):
        if block.docs is not None:
            return self.documents.forward(q, k, v, block, scale)
        with torch.no_grad():
            out, lse = self._forward(q.detach(), k.detach(), v.detach(), softmax_scale=scale, causal=block.causal,
                                     return_lse=True)
        return out, lse.float()  # out in the inputs' dtype: merge_block scales it into fp32 without a copy

    def backward(self, q, k, v, do, out, lse, delta, block: RingBlock, scale: float):
        if block.docs is not None:
            return self.documents.backward(q, k, v, do, out, lse, delta, block, scale)
        q, k, v, out, do = (t.contiguous() for t in (q, k, v, out.to(q.dtype), do))
        return tuple(self._backward(q, k, v, out, do, lse.contiguous(), softmax_scale=scale, causal=block.causal)[:3])
