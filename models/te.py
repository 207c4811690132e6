"""Transformer Engine backend: TE layers in the layer spec, TE fused attention as a core, FP8 recipes.

TE modules hold the same local shards as the torch backend (each parameter carries our ParamInfo), so init, gradient gathering and checkpoints stay layout- and backend-independent. TE fuses the
pre-attention and pre-MLP RMSNorm into the following column-parallel linear (`te.LayerNormLinear`); the spec's
`rename` maps those norm weights back to the torch backend's names.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn

from megalysses.parallel.mesh import ParallelMesh
from megalysses.parallel.tensor import ParamInfo, ShardSpec, VocabParallelEmbedding, set_param_info

from .spec import norm_weight_info


class TransformerEngineUnavailable(RuntimeError):
    """Transformer Engine was requested where it cannot run."""


def import_te():
    """transformer_engine.pytorch, or a clear error (TE absent, or its core library unusable without CUDA)."""
    if not torch.cuda.is_available():
        raise TransformerEngineUnavailable("the Transformer Engine backend needs a CUDA GPU and none is visible; "
                                           "use backend 'torch' (runs on CPU and GPU)")
    try:
        import transformer_engine.pytorch as te
    except (ImportError, OSError, RuntimeError) as err:  # a present core wheel without a GPU raises OSError/RuntimeError
        raise TransformerEngineUnavailable(
            f"Transformer Engine cannot be imported ({type(err).__name__}: {err}); install it with "
            "`pip install --no-build-isolation -e \".[te]\"` on a CUDA machine, or use backend 'torch'") from err
    return te


def _tp_args(mesh: ParallelMesh) -> dict:
    tp = mesh.group("tp")
    return dict(tp_group=tp.pg, tp_size=tp.size, sequence_parallel=mesh.layout.tp_sequence_parallel,
                params_dtype=torch.get_default_dtype(), device="cuda")


def _mark(param: nn.Parameter, full_shape: Sequence[int], spec: Optional[ShardSpec]) -> None:
    set_param_info(param, ParamInfo(tuple(full_shape), spec))


def te_norm(dim: int, eps: float, mesh: ParallelMesh, per_head: bool = False) -> nn.Module:
    """te.RMSNorm over the last dim (the residual stream, or each head with per_head)."""
    te = import_te()
    norm = te.RMSNorm(dim, eps=eps, sequence_parallel=mesh.layout.tp_sequence_parallel and not per_head,
                      params_dtype=torch.get_default_dtype(), device="cuda")
    set_param_info(norm.weight, norm_weight_info(dim, mesh, per_head))
    return norm


def _sequence_first(module: nn.Module, mesh: ParallelMesh) -> nn.Module:
    """TE's sequence parallelism gathers / scatters dim 0, Megatron's (s, b, h) layout; ours is (b, s, h). Under
    sequence parallelism, present (s, b, h) to the module and turn its output back (views when b == 1)."""
    if mesh.layout.tp_sequence_parallel:
        module.register_forward_pre_hook(lambda m, args: (args[0].transpose(0, 1).contiguous(), *args[1:]))
        module.register_forward_hook(lambda m, args, out: out.transpose(0, 1))
    return module


def te_norm_column(in_features: int, sections: Sequence[int], bias: bool, mesh: ParallelMesh,
                   eps: float = 1e-5) -> nn.Module:
    """RMSNorm fused with a column-parallel linear (te.LayerNormLinear); output rows split section by section."""
    te = import_te()
    spec = ShardSpec(dim=0, sections=tuple(sections))
    layer = te.LayerNormLinear(in_features, spec.local_size(mesh.size("tp")) * mesh.size("tp"), eps=eps,
                               bias=bias, normalization="RMSNorm", parallel_mode="column", **_tp_args(mesh))
    _mark(layer.weight, (sum(sections), in_features), spec)
    if bias:
        _mark(layer.bias, (sum(sections),), spec)
    set_param_info(layer.layer_norm_weight, norm_weight_info(in_features, mesh, per_head=False))
    return _sequence_first(layer, mesh)


def te_row(in_features: int, out_features: int, bias: bool, mesh: ParallelMesh) -> nn.Module:
    """Row-parallel linear (te.Linear): partial outputs all-reduced (reduce-scattered under sequence parallelism)."""
    te = import_te()
    layer = te.Linear(in_features, out_features, bias=bias, parallel_mode="row", **_tp_args(mesh))
    _mark(layer.weight, (out_features, in_features), ShardSpec(dim=1, sections=(in_features,)))
    if bias:
        _mark(layer.bias, (out_features,), None)
    return _sequence_first(layer, mesh)


def te_embedding(vocab_size: int, dim: int, mesh: ParallelMesh) -> nn.Module:
    """TE has no embedding layer: the vocab-parallel embedding of the torch backend, on the GPU."""
    return VocabParallelEmbedding(vocab_size, dim, mesh.group("tp"), mesh.layout.tp_sequence_parallel).cuda()


class TEAttentionCore(nn.Module):
    """te.DotProductAttention (cuDNN fused attention) on the head-sharded tensors inside the Ulysses region."""

    def __init__(self, heads: int, kv_heads: int, head_dim: int, scale: Optional[float] = None):
        super().__init__()
        te = import_te()
        self.dense = te.DotProductAttention(heads, head_dim, num_gqa_groups=kv_heads, attn_mask_type="causal",
                                            qkv_format="bshd", softmax_scale=scale)
        self.packed = te.DotProductAttention(heads, head_dim, num_gqa_groups=kv_heads,
                                             attn_mask_type="padding_causal", qkv_format="thd", softmax_scale=scale)

    def forward(self, q, k, v, docs=None, scale=None):
        # q: (b, s, hq, d); k, v: (b, s, hk, d) -> (b, s, hq, d); the scale was fixed when the core was built
        b, s, h, d = q.shape
        if docs is None or docs.doc_ids is None:
            return self.dense(q, k, v).view(b, s, h, d)
        cu, longest = docs.cu_seqlens()
        flat = [t.reshape(b * s, t.shape[2], d) for t in (q, k, v)]  # THD: documents back to back
        out = self.packed(*flat, cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=longest, max_seqlen_kv=longest)
        return out.view(b, s, h, d)


def fp8_context(recipe: str, group):
    """te.fp8_autocast for 'delayed' or 'current' scaling (amax reduced over `group`), a no-op context for 'none'."""
    import contextlib

    if recipe == "none":
        return contextlib.nullcontext()
    te = import_te()
    from transformer_engine.common import recipe as te_recipe

    if recipe == "delayed":
        fp8_recipe = te_recipe.DelayedScaling(fp8_format=te_recipe.Format.HYBRID, amax_history_len=16,
                                              amax_compute_algo="max")
    elif recipe == "current":
        fp8_recipe = te_recipe.Float8CurrentScaling(fp8_format=te_recipe.Format.HYBRID)
    else:
        raise ValueError(f"fp8 recipe {recipe!r}: choose 'none', 'delayed' or 'current'")
    return te.fp8_autocast(enabled=True, fp8_recipe=fp8_recipe, fp8_group=group)
