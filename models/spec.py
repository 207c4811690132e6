"""Layer specs: which module builds each part of a block. Parallelism and backends enter here, not in the model."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from megalysses.parallel.mesh import ParallelMesh
from megalysses.parallel.tensor import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding


class RMSNorm(nn.Module):
    """y = x / rms(x) * w, computed in float32; under TP sequence parallelism its weight's grad is summed over tp."""

    def __init__(self, dim: int, eps: float, mesh: ParallelMesh):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))
        self.weight.full_shape, self.weight.shard_spec = (dim,), None
        self.weight.sequence_parallel = mesh.layout.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


def torch_norm(dim: int, eps: float, mesh: ParallelMesh) -> nn.Module:
    return RMSNorm(dim, eps, mesh)


def torch_column(in_features: int, sections: Sequence[int], bias: bool, mesh: ParallelMesh) -> nn.Module:
    return ColumnParallelLinear(in_features, sections, bias, mesh.group("tp"), mesh.layout.sequence_parallel)


def torch_row(in_features: int, out_features: int, bias: bool, mesh: ParallelMesh) -> nn.Module:
    return RowParallelLinear(in_features, out_features, bias, mesh.group("tp"), mesh.layout.sequence_parallel)


def torch_embedding(vocab_size: int, dim: int, mesh: ParallelMesh) -> nn.Module:
    return VocabParallelEmbedding(vocab_size, dim, mesh.group("tp"), mesh.layout.sequence_parallel)


NormFactory = Callable[[int, float, ParallelMesh], nn.Module]          # (dim, eps, mesh)
ColumnFactory = Callable[[int, Sequence[int], bool, ParallelMesh], nn.Module]  # (in, out sections, bias, mesh)
RowFactory = Callable[[int, int, bool, ParallelMesh], nn.Module]        # (in, out, bias, mesh)
EmbeddingFactory = Callable[[int, int, ParallelMesh], nn.Module]        # (vocab, dim, mesh)


@dataclass(frozen=True)
class LayerSpec:
    """The modules of a GPT, by role. A backend (torch, Transformer Engine) is one instance of this."""

    name: str
    attn_norm: NormFactory
    qkv: ColumnFactory
    attn_out: RowFactory
    mlp_norm: NormFactory
    gate_up: ColumnFactory
    down: RowFactory
    final_norm: NormFactory
    embedding: EmbeddingFactory


TORCH_SPEC = LayerSpec(name="torch", attn_norm=torch_norm, qkv=torch_column, attn_out=torch_row,
                       mlp_norm=torch_norm, gate_up=torch_column, down=torch_row, final_norm=torch_norm,
                       embedding=torch_embedding)

SPECS = {"torch": TORCH_SPEC}


def layer_spec(name: str) -> LayerSpec:
    """The spec registered under a backend name."""
    if name not in SPECS:
        raise ValueError(f"layer backend {name!r} is not available; choose one of {sorted(SPECS)}")
    return SPECS[name]
