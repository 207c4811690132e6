"""ParallelMesh: the (pp, dp, ring, sp, tp) device mesh, built once from a layout and passed to whoever needs it."""
from __future__ import annotations

import itertools
from typing import Optional

import torch
import torch.distributed as dist

from .collectives import CommClock, CommGroup
from .layout import AXES, ParallelLayout


def coords_of(rank: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Row-major coordinates of a global rank in a mesh of the given shape (axis order pp, dp, ring, sp, tp)."""
    out = []
    for size in reversed(shape):
        out.append(rank % size)
        rank //= size
    return tuple(reversed(out))


def rank_of(coords: tuple[int, ...], shape: tuple[int, ...]) -> int:
    """Global rank at the given coordinates (inverse of coords_of)."""
    rank = 0
    for c, size in zip(coords, shape):
        rank = rank * size + c
    return rank


def group_members(shape: tuple[int, ...], axes: tuple[str, ...]) -> list[list[int]]:
    """Every group that varies over `axes` with the other coordinates fixed, as lists of global ranks."""
    varying = [AXES.index(a) for a in axes]
    fixed = [i for i in range(len(shape)) if i not in varying]
    groups = []
    for fixed_coords in itertools.product(*(range(shape[i]) for i in fixed)):
        members = []
        for var_coords in itertools.product(*(range(shape[i]) for i in varying)):
            c = [0] * len(shape)
            for i, v in zip(fixed, fixed_coords):
                c[i] = v
            for i, v in zip(varying, var_coords):
                c[i] = v
            members.append(rank_of(tuple(c), shape))
        groups.append(sorted(members))
    return groups


class ParallelMesh:
    """Groups, coordinates and pipeline neighbours of this rank; no module state, so several meshes may coexist."""

    # combined groups every mesh builds: gradient/loss reduction over dp x ring x sp (data_group); tp x sp for
    # head-sharded state; dp x ring x sp x tp: every rank of one pipeline stage (stage_group; FP8 amax reduction)
    COMBINED = (("dp", "ring", "sp"), ("sp", "tp"), ("dp", "ring", "sp", "tp"))

    def __init__(self, layout: ParallelLayout, device_type: str = "cpu"):
        if not dist.is_initialized():
            raise RuntimeError("ParallelMesh needs torch.distributed initialised (torchrun, or the test harness); "
                               "use ParallelMesh.single_device() for one process without it")
        from torch.distributed.device_mesh import init_device_mesh

        world = dist.get_world_size()
        self.layout = layout.resolve(world)
        self.shape = self.layout.shape
        self.global_rank = dist.get_rank()
        self.device_type = device_type
        self.device_mesh = init_device_mesh(device_type, self.shape, mesh_dim_names=AXES)
        self.clock = CommClock(device_type)  # times every collective of this mesh's groups while started
        self.coords = dict(zip(AXES, coords_of(self.global_rank, self.shape)))
        self._groups: dict[tuple[str, ...], CommGroup] = {}
        for axis in AXES:
            pg = self.device_mesh.get_group(axis)
            ranks = tuple(dist.get_process_group_ranks(pg))
            self._groups[(axis,)] = CommGroup(pg, ranks, ranks.index(self.global_rank), self.clock)
        for axes in self.COMBINED:
            self._groups[axes] = self._new_combined_group(axes)
        self._embedding_group = self._new_embedding_group()

    def _new_combined_group(self, axes: tuple[str, ...]) -> CommGroup:
        members = group_members(self.shape, axes)
        pg, _ = dist.new_subgroups_by_enumeration(members)
        mine = next(tuple(m) for m in members if self.global_rank in m)
        return CommGroup(pg, mine, mine.index(self.global_rank), self.clock)

    def _new_embedding_group(self) -> CommGroup:
        """First and last pipeline stage with equal dp/ring/sp/tp coordinates (every rank creates every group, in order)."""
        last = self.size("pp") - 1
        if last == 0:
            return CommGroup(None, (self.global_rank,), 0)
        members = [[rank_of((stage,) + rest, self.shape) for stage in (0, last)]
                   for rest in itertools.product(*(range(n) for n in self.shape[1:]))]
        pg, _ = dist.new_subgroups_by_enumeration(members)
        mine = next((tuple(m) for m in members if self.global_rank in m), None)
        if mine is None:  # a middle stage: holds no embedding
            return CommGroup(None, (self.global_rank,), 0)
        return CommGroup(pg, mine, mine.index(self.global_rank), self.clock)

    @classmethod
    def single_device(cls, device_type: str = "cpu") -> "ParallelMesh":
        """A mesh of one process: every axis has size 1 and every collective is a no-op (no torch.distributed)."""
        self = cls.__new__(cls)
        self.layout = ParallelLayout().resolve(1)
        self.shape = (1,) * len(AXES)
        self.global_rank = 0
        self.device_type = device_type
        self.device_mesh = None
        self.clock = CommClock(device_type)
        self.coords = dict.fromkeys(AXES, 0)
        self._groups = {axes: CommGroup.solo() for axes in [(a,) for a in AXES] + list(self.COMBINED)}
        self._embedding_group = CommGroup.solo()
        return self

    def group(self, *axes: str) -> CommGroup:
        """The group of ranks that differ only along `axes` (e.g. group('tp'), group('sp', 'tp'))."""
        key = tuple(a for a in AXES if a in axes)
        if len(key) != len(axes) or not key:
            raise KeyError(f"unknown mesh axes {axes}: choose from {AXES}")
        if key not in self._groups:
            raise KeyError(f"no combined group over {key}: built ones are {list(self._groups)}")
        return self._groups[key]

    def data_group(self) -> CommGroup:
        """dp x ring x sp: the ranks that see different tokens of one model replica's batch (pipeline stage and TP
        rank fixed); gradients, the loss and its valid-token count are summed over it."""
        return self._groups[("dp", "ring", "sp")]

    def stage_group(self) -> CommGroup:
        """dp x ring x sp x tp: every rank of this pipeline stage."""
        return self._groups[("dp", "ring", "sp", "tp")]

    def rank(self, axis: str) -> int:
        """This process's coordinate along an axis."""
        return self.coords[axis]

    def size(self, axis: str) -> int:
        """The degree of an axis."""
        return self.shape[AXES.index(axis)]

    @property
    def device(self) -> torch.device:
        """This rank's device: its current GPU on a cuda mesh, else the CPU (the one place that decides it)."""
        if self.device_type == "cuda":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device(self.device_type)

    @property
    def is_first_stage(self) -> bool:
        return self.coords["pp"] == 0

    @property
    def is_last_stage(self) -> bool:
        return self.coords["pp"] == self.size("pp") - 1

    def stage_neighbour(self, offset: int) -> Optional[int]:
        """Global rank of the pipeline stage `offset` away (same dp, ring, sp, tp coordinates), or None past either end."""
        stage = self.coords["pp"] + offset
        if not 0 <= stage < self.size("pp"):
            return None
        c = tuple(stage if a == "pp" else self.coords[a] for a in AXES)
        return rank_of(c, self.shape)

    @property
    def prev_stage(self) -> Optional[int]:
        return self.stage_neighbour(-1)

    @property
    def next_stage(self) -> Optional[int]:
        return self.stage_neighbour(+1)

    def embedding_group(self) -> CommGroup:
        """The tied-embedding group: this rank and its first/last-stage partner with the same dp/ring/sp/tp coordinates
        (size 2 on the first and last stage when pp > 1; this rank alone on middle stages and when pp = 1)."""
        return self._embedding_group

    def __repr__(self) -> str:
        c = ", ".join(f"{a}={self.coords[a]}/{self.size(a)}" for a in AXES)
        return f"ParallelMesh(rank {self.global_rank}: {c})"
