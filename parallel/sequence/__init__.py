"""Ulysses sequence parallelism: all-to-all attention, sequence sharding of batches, token-weighted loss."""

from .batch import IGNORE_INDEX, gather_sequence_ids, pad_sequence_batch, shard_sequence
from .loss import count_valid_tokens, token_weighted_loss
from .ulysses import heads_to_seq, replicate_kv_heads, seq_to_heads, ulysses_attention

__all__ = ["IGNORE_INDEX", "count_valid_tokens", "gather_sequence_ids", "heads_to_seq", "pad_sequence_batch",
           "replicate_kv_heads", "seq_to_heads", "shard_sequence", "token_weighted_loss", "ulysses_attention"]
