"""Tensor parallelism: sharding specs, autograd mappings (f / g), column/row/vocab-parallel layers, vocab-parallel loss."""

from .cross_entropy import vocab_parallel_cross_entropy
from .layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, vocab_parallel_logits
from .sharding import ParamInfo, ShardSpec, gather_full, param_info, set_param_info, shard, unshard, update_param_info

__all__ = ["ColumnParallelLinear", "ParamInfo", "RowParallelLinear", "ShardSpec", "param_info", "set_param_info",
           "update_param_info", "VocabParallelEmbedding", "gather_full", "shard", "unshard",
           "vocab_parallel_cross_entropy", "vocab_parallel_logits"]
