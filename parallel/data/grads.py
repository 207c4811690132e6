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
