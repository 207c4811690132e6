"""Sequence parallelism: Ulysses all-to-all attention, ring attention, sequence sharding of batches, token-weighted
loss."""

from .batch import IGNORE_INDEX, gather_sequence_ids, pad_sequence_batch, shard_ring_sequence, shard_sequence
from .loss import count_valid_tokens, token_weighted_loss
from .ring import RingMasks, ring_attention, ring_core, ring_masks, ring_shard, ring_unshard
from .ulysses import heads_to_seq, replicate_kv_heads, seq_to_heads, ulysses_attention

__all__ = ["IGNORE_INDEX", "RingMasks", "count_valid_tokens", "gather_sequence_ids", "heads_to_seq",
           "pad_sequence_batch", "replicate_kv_heads", "ring_attention", "ring_core", "ring_masks", "ring_shard",
           "ring_unshard", "seq_to_heads", "shard_ring_sequence", "shard_sequence", "token_weighted_loss",
           "ulysses_attention"]
