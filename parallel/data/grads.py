"""Gradient synchronisation: sum over dp x sp (ranks that saw other tokens), and over tp for sequence-parallel params."""
from __future__ import annotations

from typing import Iterable

import torch

from .. import collectives as C
from ..mesh import ParallelMesh


def all_reduce_gradients(params: Iterable[torch.nn.Parameter], mesh: ParallelMesh) -> None:
    """Sum each gradient over dp x sp; params marked `sequence_parallel` (norms under TP sequence parallelism)
    also over tp, since each TP rank saw only its slice of the sequence.

    The loss is already normalised by the global token count, so a sum (not a mean) gives the exact gradient.
    """
    data, tp = mesh.group("dp", "sp"), mesh.group("tp")
    for p in params:
        if p.grad is None:
            continue
        if getattr(p, "sequence_parallel", False):
            C.all_reduce(p.grad, tp)
        C.all_reduce(p.grad, data)


def global_grad_norm(params: Iterable[torch.nn.Parameter], mesh: ParallelMesh) -> torch.Tensor:
    """L2 norm of the whole model's gradient, counting every parameter exactly once.

    Call after all_reduce_gradients (dp x sp replicas then agree). TP shards (params with a shard_spec) are summed
    over tp; TP-replicated params are identical on every TP rank and counted once; pipeline stages hold disjoint
    params and are summed over pp.
    """
    sharded_sq, replicated_sq = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
    for p in params:
        if p.grad is None:
            continue
        sq = p.grad.detach().double().pow(2).sum().cpu()
        if getattr(p, "shard_spec", None) is not None:
            sharded_sq += sq
        else:
            replicated_sq += sq
    total = C.all_reduce(sharded_sq.to(_device(mesh)), mesh.group("tp")) + replicated_sq.to(_device(mesh))
    return C.all_reduce(total, mesh.group("pp")).sqrt()


def _device(mesh: ParallelMesh) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if mesh.device_type == "cuda" else torch.device("cpu")


def clip_gradients(params: Iterable[torch.nn.Parameter], max_norm: float, mesh: ParallelMesh) -> torch.Tensor:
    """Scale every gradient so the global norm is at most max_norm (0 disables); returns the norm before clipping."""
    params = [p for p in params if p.grad is not None]
    norm = global_grad_norm(params, mesh)
    if max_norm > 0:
        scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for p in params:
            p.grad.mul_(scale.to(p.grad.dtype))
    return norm
