"""Layer specs: which module builds each part of a block. Parallelism and backends enter here, not in the model."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from megalysses.parallel.kernel_fusion import fused
from megalysses.parallel.mesh import ParallelMesh
from megalysses.parallel.tensor import (ColumnParallelLinear, ParamInfo, RowParallelLinear, VocabParallelEmbedding,
                                        set_param_info)

from .config import BACKENDS, Backend


class RMSNorm(nn.Module):
    """y = x / rms(x) * w over the last dim, computed in float32 (a residual-stream norm, or per head)."""

    def __init__(self, dim: int, eps: float, mesh: ParallelMesh, per_head: bool = False):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))
        set_param_info(self.weight, norm_weight_info(dim, mesh, per_head))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


@fused
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * x / rms(x), the normalisation in float32, the result in x's dtype times weight; one kernel on CUDA."""
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


def norm_weight_info(dim: int, mesh: ParallelMesh, per_head: bool) -> ParamInfo:
    """A norm weight is whole on every tp rank, but its gradient covers only this rank's tokens under tp sequence
    parallelism, and only this rank's heads for a per-head norm (heads are split over tp): then it is summed over tp."""
    return ParamInfo((dim,), None, grad_sum_over_tp=norm_grad_sums_over_tp(mesh.size("tp"),
                                                                           mesh.layout.tp_sequence_parallel, per_head))


def norm_grad_sums_over_tp(tp: int, tp_sequence_parallel: bool, per_head: bool) -> bool:
    """Whether a norm weight's gradient is summed over tp (the rule of norm_weight_info, also read by the planner)."""
    return tp > 1 and (per_head or tp_sequence_parallel)


def torch_norm(dim: int, eps: float, mesh: ParallelMesh, per_head: bool = False) -> nn.Module:
    return RMSNorm(dim, eps, mesh, per_head)


def torch_column(in_features: int, sections: Sequence[int], bias: bool, mesh: ParallelMesh,
                 eps: float = 1e-5) -> nn.Module:
    return ColumnParallelLinear(in_features, sections, bias, mesh.group("tp"), mesh.layout.tp_sequence_parallel)


def torch_row(in_features: int, out_features: int, bias: bool, mesh: ParallelMesh) -> nn.Module:
    return RowParallelLinear(in_features, out_features, bias, mesh.group("tp"), mesh.layout.tp_sequence_parallel)


def torch_embedding(vocab_size: int, dim: int, mesh: ParallelMesh) -> nn.Module:
    return VocabParallelEmbedding(vocab_size, dim, mesh.group("tp"), mesh.layout.tp_sequence_parallel)


NormFactory = Callable[..., nn.Module]  # (dim, eps, mesh, per_head=False): per_head normalises each head (b, s, h, dim)
ColumnFactory = Callable[..., nn.Module]  # (in, out sections, bias, mesh, eps=): eps for a fused pre-norm
RowFactory = Callable[[int, int, bool, ParallelMesh], nn.Module]        # (in, out, bias, mesh)
EmbeddingFactory = Callable[[int, int, ParallelMesh], nn.Module]        # (vocab, dim, mesh)


@dataclass(frozen=True)
class LayerSpec:
    """The modules of a GPT, by role. A backend (torch, Transformer Engine) is one instance of this.

    A backend that fuses a norm into the next linear (TE's LayerNormLinear) sets that norm's role to `identity`
    and lists in `rename` how its parameter names map to the canonical (torch backend) names, so weights,
    initialisation and checkpoints do not depend on the backend.
    """

    name: str
    attn_norm: NormFactory
    qkv: ColumnFactory
    attn_out: RowFactory
    mlp_norm: NormFactory
    gate_up: ColumnFactory
    down: RowFactory
    norm: NormFactory
    """A standalone RMSNorm: the final norm, and per-head norms (q / k norms) with per_head=True."""
    embedding: EmbeddingFactory
    rename: tuple[tuple[str, str], ...] = ()
    """(backend suffix, canonical suffix) pairs, e.g. ('attn.qkv.layer_norm_weight', 'attn_norm.weight')."""

    def canonical_name(self, name: str) -> str:
        """The backend-independent name of a parameter."""
        for suffix, canonical in self.rename:
            if name.endswith(suffix):
                return name[: len(name) - len(suffix)] + canonical
        return name


def identity(*args, **kwargs) -> nn.Module:
    """The role is fused into a neighbouring module."""
    return nn.Identity()


TORCH_SPEC = LayerSpec(name="torch", attn_norm=torch_norm, qkv=torch_column, attn_out=torch_row,
                       mlp_norm=torch_norm, gate_up=torch_column, down=torch_row, norm=torch_norm,
                       embedding=torch_embedding)

def te_spec() -> LayerSpec:
    """Transformer Engine layers: RMSNorm fused into the QKV and gate/up projections, TE row-parallel linears."""
    from . import te

    return LayerSpec(name="te", attn_norm=identity, qkv=te.te_norm_column, attn_out=te.te_row, mlp_norm=identity,
                     gate_up=te.te_norm_column, down=te.te_row, norm=te.te_norm, embedding=te.te_embedding,
                     rename=(("attn.qkv.layer_norm_weight", "attn_norm.weight"),
                             ("mlp.gate_up.layer_norm_weight", "mlp_norm.weight")))


def layer_spec(name: Backend) -> LayerSpec:
    """The spec of a backend: 'torch' (runs anywhere) or 'te' (Transformer Engine, CUDA only)."""
    if name == "torch":
        return TORCH_SPEC
    if name == "te":
        return te_spec()
    raise ValueError(f"backend = {name!r}: choose one of {', '.join(BACKENDS)}")
