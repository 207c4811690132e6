"""Parallelism on one 4D device mesh (pp, dp, sp, tp): layout, mesh, collectives, tensor / sequence parallel layers."""

from .collectives import CommGroup
from .layout import AXES, LayoutError, ParallelLayout
from .mesh import ParallelMesh

__all__ = ["AXES", "CommGroup", "LayoutError", "ParallelLayout", "ParallelMesh"]
