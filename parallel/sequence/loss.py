"""Token-weighted loss: sum of per-token losses over the valid tokens of the whole dp x ring x sp batch / their count."""
from __future__ import annotations

import torch

from .. import collectives as C
from ..collectives import CommGroup
from .batch import IGNORE_INDEX


def count_valid_tokens(labels: torch.Tensor, group: CommGroup) -> torch.Tensor:
    """Number of trained tokens across the group (a float scalar, the same on every rank)."""
    return C.all_reduce((labels != IGNORE_INDEX).sum().to(torch.float64), group)


def token_weighted_loss(per_token: torch.Tensor, labels: torch.Tensor, total_valid: torch.Tensor) -> torch.Tensor:
    """This rank's share of the global mean: sum of its valid per-token losses / the group's valid-token count.

    Summing the shares (and their gradients) over dp x ring x sp gives exactly the mean over every valid token, even
    when ranks hold different numbers of them, or none.
    """
    valid = labels != IGNORE_INDEX
    return (per_token * valid).sum() / total_valid.clamp(min=1).to(per_token.dtype)
