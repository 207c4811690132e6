"""Tensor parallelism: sharding specs, autograd mappings (f / g), column/row/vocab-parallel layers, vocab-parallel loss."""

from .cross_entropy import vocab_parallel_cross_entropy
from .layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, vocab_parallel_logits
from .sharding import ShardSpec, gather_full, shard, unshard

__all__ = ["ColumnParallelLinear", "RowParallelLinear", "ShardSpec", "VocabParallelEmbedding", "gather_full", "shard", "unshard",
           "vocab_parallel_cross_entropy", "vocab_parallel_logits"]
