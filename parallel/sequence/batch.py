"""Sequence sharding of a batch: pad to a multiple of the shard unit, give each SP rank one contiguous chunk (after the
ring's zig-zag split when there is a ring)."""
from __future__ import annotations

from typing import Optional

import torch

from .. import collectives as C
from ..collectives import CommGroup
from .ring import ring_shard

IGNORE_INDEX = -100  # label of a token that is not trained on (padding, masked prompt)


def pad_sequence_batch(input_ids: torch.Tensor, labels: torch.Tensor, position_ids: Optional[torch.Tensor],
                       multiple: int, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pad (b, s) tensors at the end to a multiple of `multiple`; padding is ignored by the loss.

    Padding sits after every real token, so under causal attention no real token ever sees it. Its positions
    continue the last position of each row.
    """
    b, s = input_ids.shape
    if position_ids is None:
        position_ids = torch.arange(s, device=input_ids.device).expand(b, s)
    pad = -s % multiple
    if pad == 0:
        return input_ids, labels, position_ids
    tail = torch.arange(1, pad + 1, device=input_ids.device).expand(b, pad)
    return (torch.cat([input_ids, input_ids.new_full((b, pad), pad_id)], dim=1),
            torch.cat([labels, labels.new_full((b, pad), IGNORE_INDEX)], dim=1),
            torch.cat([position_ids, position_ids[:, -1:] + tail], dim=1))


def shard_sequence(x: torch.Tensor, group: CommGroup, dim: int = 1) -> torch.Tensor:
    """This rank's contiguous chunk of the sequence dimension (the length must divide by the group size)."""
    if x.shape[dim] % group.size:
        raise ValueError(f"sequence length {x.shape[dim]} is not divisible by {group.size} ranks: pad it first "
                         "(pad_sequence_batch)")
    return x.chunk(group.size, dim=dim)[group.rank].contiguous()


def shard_ring_sequence(x: torch.Tensor, ring: CommGroup, sp: CommGroup, dim: int = 1) -> torch.Tensor:
    """This rank's piece of a whole sequence: its ring rank's zig-zag shard (chunks r and 2R-1-r of 2R), then this SP
    rank's contiguous chunk of that; plain shard_sequence when the ring has one rank."""
    if ring.size > 1:
        x = ring_shard(x, ring, dim=dim)
    return shard_sequence(x, sp, dim=dim)


def gather_sequence_ids(x: torch.Tensor, group: CommGroup) -> torch.Tensor:
    """All-gather a (b, s/P) integer tensor (e.g. position_ids) into the whole (b, s) sequence; no autograd."""
    return C.all_gather(x, group, dim=1)
