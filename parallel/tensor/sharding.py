"""ShardSpec: how one full (layout-independent) tensor maps onto its tensor-parallel shards, and back; ParamInfo: a
parameter's parallel facts as one typed record."""
from __future__ import annotations

from dataclasses import dataclass, replace
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


@dataclass(frozen=True)
class ParamInfo:
    """What the parallel machinery must know of one parameter; set once where the parameter is made (param_info)."""

    full_shape: tuple[int, ...]
    """Shape of the whole, layout-independent tensor (what init, checkpoints and conversion see)."""
    shard: Optional[ShardSpec] = None
    """How the whole tensor is split over tp; None: every tp rank holds all of it."""
    grad_sum_over_tp: bool = False
    """Held whole on every tp rank, but each rank's gradient covers only its own tokens or heads (norm weights under
    tp sequence parallelism, per-head q / k norms): the gradient is summed over tp."""
    pipeline_duplicate: bool = False
    """A second copy on another pipeline stage (the tied embedding on the last stage): its gradient is summed with
    the first copy's, and it is counted (in the gradient norm) and saved once, on the first stage."""

    def __post_init__(self):
        object.__setattr__(self, "full_shape", tuple(int(d) for d in self.full_shape))


_INFO = "parallel_info"  # the one attribute a parameter carries (FSDP copies it onto the parameters it makes)


def set_param_info(param: torch.Tensor, info: ParamInfo) -> torch.Tensor:
    """Attach the record to a parameter; returns the parameter."""
    setattr(param, _INFO, info)
    return param


def param_info(param: torch.Tensor) -> ParamInfo:
    """The record of a parameter; one that our layers did not build (a plain torch module) is whole and the same on
    every rank: ParamInfo(its shape)."""
    info = getattr(param, _INFO, None)
    return ParamInfo(tuple(param.shape)) if info is None else info


def update_param_info(param: torch.Tensor, **changes) -> None:
    """Change fields of a parameter's record (e.g. pipeline_duplicate=True)."""
    set_param_info(param, replace(param_info(param), **changes))


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
