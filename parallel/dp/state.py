"""The per-parameter optimizer state form that checkpoints use: whole tensors for the master weight and AdamW moments."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

MOMENTS = ("exp_avg", "exp_avg_sq")  # AdamW's per-element state


def check_state_shapes(owner: str, states: Mapping[int, Mapping[str, Any]], params: Sequence[torch.Tensor]) -> None:
    """Every parameter's saved master and moments have the parameter's (local, TP-sharded) shape."""
    for i, p in enumerate(params):
        for key in ("master", *MOMENTS):
            if tuple(states[i][key].shape) != tuple(p.shape):
                raise ValueError(f"{owner}.load_state_dict: parameter {i} {key} has shape "
                                 f"{tuple(states[i][key].shape)}, the model's is {tuple(p.shape)}: load a state saved "
                                 "from the same model and tensor-parallel shard")
