"""Autograd mappings between tensor-parallel regions (Megatron's f and g, and their sequence-parallel forms)."""
from __future__ import annotations

import torch

from .. import collectives as C
from ..collectives import CommGroup


class _CopyToRegion(torch.autograd.Function):
    """f: copy forward, all-reduce backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return C.all_reduce(grad.contiguous().clone(), ctx.group), None


class _ReduceFromRegion(torch.autograd.Function):
    """g: all-reduce forward, copy backward."""

    @staticmethod
    def forward(ctx, x, group):
        return C.all_reduce(x.contiguous().clone(), group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherSequence(torch.autograd.Function):
    """Sequence-parallel f: all-gather along the sequence forward, reduce-scatter backward."""

    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return C.all_gather(x, group, dim=dim)

    @staticmethod
    def backward(ctx, grad):
        return C.reduce_scatter(grad, ctx.group, dim=ctx.dim), None, None


class _ReduceScatterSequence(torch.autograd.Function):
    """Sequence-parallel g: reduce-scatter along the sequence forward, all-gather backward."""

    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return C.reduce_scatter(x, group, dim=dim)

    @staticmethod
    def backward(ctx, grad):
        return C.all_gather(grad, ctx.group, dim=ctx.dim), None, None


def copy_to_region(x: torch.Tensor, group: CommGroup) -> torch.Tensor:
    return x if group.size == 1 else _CopyToRegion.apply(x, group)


def reduce_from_region(x: torch.Tensor, group: CommGroup) -> torch.Tensor:
    return x if group.size == 1 else _ReduceFromRegion.apply(x, group)


def gather_sequence(x: torch.Tensor, group: CommGroup, dim: int = 1) -> torch.Tensor:
    return x if group.size == 1 else _GatherSequence.apply(x, group, dim)


def reduce_scatter_sequence(x: torch.Tensor, group: CommGroup, dim: int = 1) -> torch.Tensor:
    return x if group.size == 1 else _ReduceScatterSequence.apply(x, group, dim)


def enter_parallel_region(x: torch.Tensor, group: CommGroup, sequence_parallel: bool) -> torch.Tensor:
    """Input of a column-parallel layer: copy (f), or all-gather the sequence under sequence parallelism."""
    return gather_sequence(x, group) if sequence_parallel else copy_to_region(x, group)


def leave_parallel_region(x: torch.Tensor, group: CommGroup, sequence_parallel: bool) -> torch.Tensor:
    """Output of a row-parallel layer: all-reduce (g), or reduce-scatter the sequence under sequence parallelism."""
    return reduce_scatter_sequence(x, group) if sequence_parallel else reduce_from_region(x, group)
