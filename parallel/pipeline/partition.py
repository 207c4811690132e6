"""Which layers each virtual stage holds, and the tied parameters kept in sync between first and last stage."""
from __future__ import annotations

from typing import Iterable

import torch

from .. import collectives as C
from ..layout import ParallelLayout
from ..mesh import ParallelMesh
from .plan import virtual_stage


def stage_layer_ids(layout: ParallelLayout, num_layers: int) -> list[list[int]]:
    """Global layer ids of every virtual stage, in stage order (even split, or layout.stage_layers)."""
    counts = layout.check_layers(num_layers)  # raises when the stages cannot split the layers
    starts = [sum(counts[:v]) for v in range(len(counts))]
    return [list(range(start, start + n)) for start, n in zip(starts, counts)]


def local_virtual_stages(pp: int, vpp: int, rank: int) -> list[int]:
    """The virtual stages of pipeline rank `rank`, by chunk: rank, rank + pp, ..."""
    return [virtual_stage(chunk, rank, pp) for chunk in range(vpp)]


def all_reduce_tied_gradients(params: Iterable[torch.nn.Parameter], mesh: ParallelMesh) -> None:
    """Sum the gradients of parameters held by both the first and the last stage (tied embeddings) over the
    embedding group, so both copies take the same optimizer step; call after backward, before the dp x ring x sp sync."""
    group = mesh.embedding_group()
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)  # a copy that saw no token still joins the sum
        C.all_reduce(p.grad, group)
