"""Gradient synchronisation and the global gradient norm: sums over dp x ring x sp (ranks that saw other tokens), over tp for
sequence-parallel params; the norm counts every element once whether it is replicated or sharded."""
from __future__ import annotations

import sys
from typing import Iterable, Optional

import torch

from .. import collectives as C
from ..mesh import ParallelMesh
from ..tensor.sharding import param_info


def all_reduce_gradients(params: Iterable[torch.nn.Parameter], mesh: ParallelMesh) -> None:
    """Sum each gradient over dp x ring x sp; params whose ParamInfo says grad_sum_over_tp
    (norms under TP sequence parallelism) also over tp, since each TP rank saw only its slice of the sequence.

    The loss is already normalised by the global token count, so a sum (not a mean) gives the exact gradient.
    """
    data, tp = mesh.data_group(), mesh.group("tp")
    for p in params:
        if p.grad is None:
            continue
        if param_info(p).grad_sum_over_tp:
            C.all_reduce(p.grad, tp)
        C.all_reduce(p.grad, data)


def global_grad_norm(params: Iterable[torch.nn.Parameter], mesh: ParallelMesh) -> torch.Tensor:
    """L2 norm of the whole model's gradient, counting every parameter exactly once.

    Call after all_reduce_gradients (dp x ring x sp replicas then agree). TP shards (a ShardSpec in the ParamInfo) are summed
    over tp; TP-replicated params are identical on every TP rank and counted once; pipeline stages hold disjoint
    params and are summed over pp, except the last stage's copy of a tied embedding (its ParamInfo says
    pipeline_duplicate), left out. FSDP gradients (DTensors sharded over dp x ring x sp) are disjoint pieces: summed
    over dp x ring x sp.
    """
    params = list(params)
    pieces = ((local_values(p.grad), param_info(p).shard is not None, _data_split(p.grad))
              for p in params if p.grad is not None and not param_info(p).pipeline_duplicate)
    sq = sum_of_squares(pieces, mesh.device)
    return global_norm(sq, mesh, data_split=any(_data_split(p) for p in params))


def sum_of_squares(pieces: Iterable[tuple[torch.Tensor, bool, bool]], device: Optional[torch.device] = None
                   ) -> torch.Tensor:
    """Local sums of squares of gradient pieces (values, split over tp?, split over dp x ring x sp?) as a float64 table
    sq[data_split, tp_split] of shape (2, 2)."""
    sq = torch.zeros(2, 2, dtype=torch.float64, device=device)
    for values, tp_split, data_split in pieces:
        sq[int(data_split), int(tp_split)] += values.detach().double().pow(2).sum().to(sq.device)
    return sq


def global_norm(sq: torch.Tensor, mesh: ParallelMesh, data_split: bool) -> torch.Tensor:
    """sqrt of the model's sum of squares from every rank's sq[data_split, tp_split] table, each element once:
    dp x ring x sp-split pieces (ZeRO-1 shards, FSDP shards) summed over dp x ring x sp (`data_split`: any rank may hold some;
    the same on every rank), tp-split pieces over tp, and everything over pp (stages hold disjoint params)."""
    if data_split:
        C.all_reduce(sq[1], mesh.data_group())
    per_tp = sq.sum(0)  # [tp-replicated, tp-split]
    total = C.all_reduce(per_tp[1].clone(), mesh.group("tp")) + per_tp[0]
    return C.all_reduce(total, mesh.group("pp")).sqrt()


def local_values(t: torch.Tensor) -> torch.Tensor:
    """This rank's values of a tensor: the local shard of a DTensor, else the tensor."""
    return t.to_local() if _is_dtensor(t) else t


def _data_split(t: Optional[torch.Tensor]) -> bool:
    """A DTensor sharded over its (dp x ring x sp) mesh: each rank holds a disjoint piece."""
    return _is_dtensor(t) and any(pl.is_shard() for pl in t.placements)


def _is_dtensor(t: Optional[torch.Tensor]) -> bool:
    """isinstance(t, DTensor) without importing DTensor (slow) when nothing has created one."""
    dtensor = sys.modules.get("torch.distributed.tensor")
    return dtensor is not None and isinstance(t, dtensor.DTensor)


def clip_gradients(params: Iterable[torch.nn.Parameter], max_norm: float, mesh: ParallelMesh) -> torch.Tensor:
    """Scale every gradient so the global norm is at most max_norm (0 disables); returns the norm before clipping."""
    params = [p for p in params if p.grad is not None]
    norm = global_grad_norm(params, mesh)
    if max_norm > 0:
        scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for p in params:
            grad = local_values(p.grad)  # in host memory under FSDP offload
            grad.mul_(scale.to(device=grad.device, dtype=grad.dtype))
    return norm
