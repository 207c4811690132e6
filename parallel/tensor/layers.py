"""Tensor-parallel layers: column/row-parallel linear and vocab-parallel embedding, each holding one shard."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..collectives import CommGroup
from .mappings import enter_parallel_region, leave_parallel_region, reduce_from_region, reduce_scatter_sequence
from .sharding import ParamInfo, ShardSpec, set_param_info, update_param_info


def sharded_parameter(full_shape: Sequence[int], spec: Optional[ShardSpec], group: CommGroup) -> nn.Parameter:
    """An uninitialised parameter holding this rank's shard, with its ParamInfo (full shape, ShardSpec)."""
    shape = list(full_shape)
    if spec is not None:
        shape[spec.dim] = spec.local_size(group.size)
    return set_param_info(nn.Parameter(torch.empty(shape)), ParamInfo(tuple(full_shape), spec))


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W's output rows split over tp; `sections` (e.g. q|k|v) are split one by one."""

    def __init__(self, in_features: int, sections: Sequence[int], bias: bool, group: CommGroup,
                 sequence_parallel: bool = False):
        super().__init__()
        self.group, self.sequence_parallel = group, sequence_parallel
        self.sections = tuple(sections)
        spec = ShardSpec(dim=0, sections=self.sections)
        self.local_sections = spec.local_sections(group.size)
        self.weight = sharded_parameter((sum(sections), in_features), spec, group)  # (out / tp, in)
        self.bias = sharded_parameter((sum(sections),), ShardSpec(0, self.sections), group) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (b, s, in) [or (b, s / tp, in) under sequence parallelism] -> (b, s, out / tp)
        return F.linear(enter_parallel_region(x, self.group, self.sequence_parallel), self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """y = x W^T + b with W's input columns split over tp; partial outputs summed (or reduce-scattered)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, group: CommGroup,
                 sequence_parallel: bool = False):
        super().__init__()
        self.group, self.sequence_parallel = group, sequence_parallel
        self.weight = sharded_parameter((out_features, in_features), ShardSpec(dim=1, sections=(in_features,)), group)
        self.bias = sharded_parameter((out_features,), None, group) if bias else None
        if bias and sequence_parallel:  # added after the reduce-scatter: each tp rank's gradient covers its tokens
            update_param_info(self.bias, grad_sum_over_tp=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (b, s, in / tp) -> (b, s, out) [or (b, s / tp, out) under sequence parallelism]
        y = leave_parallel_region(F.linear(x, self.weight), self.group, self.sequence_parallel)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Token embedding with the vocab rows split over tp (padded to a multiple of tp); lookups summed over tp."""

    def __init__(self, vocab_size: int, dim: int, group: CommGroup, sequence_parallel: bool = False):
        super().__init__()
        self.group, self.sequence_parallel = group, sequence_parallel
        self.vocab_size = vocab_size
        self.weight = sharded_parameter((vocab_size, dim), ShardSpec(dim=0, sections=(vocab_size,)), group)
        self.rows = self.weight.shape[0]  # padded vocab / tp
        self.vocab_start = group.rank * self.rows

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # ids: (b, s) -> (b, s, d) [or (b, s / tp, d) under sequence parallelism]
        if self.group.size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.rows)
        out = F.embedding(local.masked_fill(outside, 0), self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return reduce_scatter_sequence(out, self.group)
        return reduce_from_region(out, self.group)


def vocab_parallel_logits(x: torch.Tensor, weight: torch.Tensor, group: CommGroup,
                          sequence_parallel: bool) -> torch.Tensor:
    """LM head on a vocab shard: (b, s, d) [or (b, s / tp, d)] -> (b, s, padded vocab / tp); never gathered."""
    return F.linear(enter_parallel_region(x, group, sequence_parallel), weight)

