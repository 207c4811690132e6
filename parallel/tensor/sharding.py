"""ShardSpec: how one full (layout-independent) tensor maps onto its tensor-parallel shards, and back."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch


@dataclass(frozen=True)
class ShardSpec:
    """Split `dim` of the full tensor, made of `sections` (e.g. q|k|v), each chunked over the ranks.

    Rank r holds the r-th chunk of every section, concatenated. A section that the ranks cannot divide is
    zero-padded to a multiple of the rank count first (vocab padding); unshard drops the padding again.
    """

    dim: int
    sections: tuple[int, ...]

    def local_sections(self, world: int) -> tuple[int, ...]:
        """Size of each section on one rank (padded sections round up)."""
        return tuple(-(-s // world) for s in self.sections)

    def local_size(self, world: int) -> int:
        return sum(self.local_sections(world))


def shard(full: torch.Tensor, spec: Optional[ShardSpec], rank: int, world: int) -> torch.Tensor:
    """The rank-th shard of a full tensor (a copy); a None spec means replicated."""
    if spec is None or world == 1:
        return full.clone()
    pieces = []
    for section, local in zip(full.split(list(spec.sections), dim=spec.dim), spec.local_sections(world)):
        pad = local * world - section.shape[spec.dim]
        if pad:
            shape = list(section.shape)
            shape[spec.dim] = pad
            section = torch.cat([section, section.new_zeros(shape)], dim=spec.dim)
        pieces.append(section.narrow(spec.dim, rank * local, local))
    return torch.cat(pieces, dim=spec.dim).clone()


def unshard(shards: Sequence[torch.Tensor], spec: Optional[ShardSpec]) -> torch.Tensor:
    """Reassemble the full tensor from every rank's shard (in rank order), dropping padding."""
    if spec is None:
        return shards[0]
    world = len(shards)
    locals_ = spec.local_sections(world)
    per_rank = [s.split(list(locals_), dim=spec.dim) for s in shards]
    sections = []
    for i, size in enumerate(spec.sections):
        joined = torch.cat([parts[i] for parts in per_rank], dim=spec.dim)
        sections.append(joined.narrow(spec.dim, 0, size))
    return torch.cat(sections, dim=spec.dim)


def gather_full(local: torch.Tensor, spec: Optional[ShardSpec], group) -> torch.Tensor:
    """The full tensor from every rank's shard over a tensor-parallel group (a collective: call on all ranks)."""
    if spec is None or group.size == 1:
        return local
    from ..collectives import all_gather

    return unshard(all_gather(local.detach().unsqueeze(0), group, dim=0).unbind(0), spec)
