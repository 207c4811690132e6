"""Ulysses: sequence-sharded (b, s/P, h, d) <-> head-sharded (b, s, h/P, d) all-to-alls around a local attention core."""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from .. import collectives as C
from ..collectives import CommGroup
from ..layout import ulysses_heads


def _pack(tensors: Sequence[torch.Tensor], p: int, scatter_dim: int) -> tuple[torch.Tensor, list[torch.Size]]:
    """One send buffer (p, n): row i holds chunk i (along scatter_dim) of every tensor, flattened, in order."""
    chunks = [t.unflatten(scatter_dim, (p, t.shape[scatter_dim] // p)).movedim(scatter_dim, 0) for t in tensors]
    shapes = [c.shape[1:] for c in chunks]
    send = tensors[0].new_empty((p, sum(s.numel() for s in shapes)))
    offset = 0
    for c, shape in zip(chunks, shapes):
        send[:, offset:offset + shape.numel()].view(p, *shape).copy_(c)  # the only copy on the way out
        offset += shape.numel()
    return send, shapes


def _unpack(recv: torch.Tensor, shapes: Sequence[torch.Size], gather_dim: int) -> list[torch.Tensor]:
    """Split the received (p, n) buffer; row i (from rank i) becomes piece i along gather_dim."""
    out, offset = [], 0
    for shape in shapes:
        piece = recv[:, offset:offset + shape.numel()].view(recv.shape[0], *shape)
        out.append(piece.movedim(0, gather_dim).flatten(gather_dim, gather_dim + 1))  # the only copy on the way in
        offset += shape.numel()
    return out


def all_to_all_tensors(tensors: Sequence[torch.Tensor], group: CommGroup, scatter_dim: int,
                       gather_dim: int) -> list[torch.Tensor]:
    """Scatter every tensor along scatter_dim and gather along gather_dim, all in a single all-to-all."""
    p = group.size
    for t in tensors:
        if t.shape[scatter_dim] % p:
            raise ValueError(f"all-to-all over {p} ranks: dim {scatter_dim} of a {tuple(t.shape)} tensor is not divisible")
    send, shapes = _pack(tensors, p, scatter_dim)
    return _unpack(C.all_to_all_stacked(send, group), shapes, gather_dim)


class _AllToAll(torch.autograd.Function):
    """All-to-all whose backward is the inverse all-to-all (scatter and gather dims swapped)."""

    @staticmethod
    def forward(ctx, group, scatter_dim, gather_dim, *tensors):
        ctx.group, ctx.scatter_dim, ctx.gather_dim = group, scatter_dim, gather_dim
        return tuple(all_to_all_tensors(tensors, group, scatter_dim, gather_dim))

    @staticmethod
    def backward(ctx, *grads):
        grads = [g.contiguous() for g in grads]
        return (None, None, None, *all_to_all_tensors(grads, ctx.group, ctx.gather_dim, ctx.scatter_dim))


SEQ_DIM, HEAD_DIM = 1, 2  # activations are (b, s, h, d)


def seq_to_heads(group: CommGroup, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Ulysses: sequence-sharded (b, s/P, h, d) -> head-sharded (b, s, h/P, d), all tensors in one all-to-all."""
    if group.size == 1:
        return tensors
    return _AllToAll.apply(group, HEAD_DIM, SEQ_DIM, *tensors)


def heads_to_seq(group: CommGroup, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Ulysses: head-sharded (b, s, h/P, d) -> sequence-sharded (b, s/P, h, d)."""
    if group.size == 1:
        return tensors
    return _AllToAll.apply(group, SEQ_DIM, HEAD_DIM, *tensors)


def replicate_kv_heads(k: torch.Tensor, v: torch.Tensor, sp: int) -> tuple[torch.Tensor, torch.Tensor]:
    """GQA with fewer kv heads than sp ranks: repeat each kv head so every rank receives the one its queries use."""
    kv_heads = k.shape[HEAD_DIM]
    ulysses_heads(sp, None, kv_heads)
    if kv_heads % sp == 0:
        return k, v
    rep = sp // kv_heads
    return k.repeat_interleave(rep, dim=HEAD_DIM), v.repeat_interleave(rep, dim=HEAD_DIM)


AttentionCore = Callable[..., torch.Tensor]  # (q (b,s,hq,d), k (b,s,hk,d), v, **kw) -> (b, s, hq, d)


def ulysses_attention(core: AttentionCore, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: CommGroup,
                      **core_kwargs) -> torch.Tensor:
    """Sequence-sharded q, k, v (b, s/P, h, d) -> one all-to-all -> local core on whole sequences -> all-to-all back."""
    sp = group.size
    if sp == 1:
        return core(q, k, v, **core_kwargs)
    ulysses_heads(sp, q.shape[HEAD_DIM], k.shape[HEAD_DIM], " on this rank")
    k, v = replicate_kv_heads(k, v, sp)
    q, k, v = seq_to_heads(group, q, k, v)  # (b, s, h/P, d)
    out = core(q, k, v, **core_kwargs)  # (b, s, hq/P, d)
    return heads_to_seq(group, out)[0]  # (b, s/P, hq, d)
