"""The data loader: consecutive global batches of a sample-indexed dataset, this dp rank's rows, resumable state.

The global sample stream does not depend on the layout: global batch t holds samples [c, c + global_batch_size)
where c is the number of samples consumed before it, and dp rank r takes the contiguous rows
[r * b, (r + 1) * b), b = global_batch_size / dp (the rows `tensor.chunk(dp)[r]` would give). Each rank
materialises only its own rows, full length (b, s); the trainer splits them across sp with `shard_sequence`.
The state is the consumed-sample count plus a description of the dataset, so a resumed run, even with another
dp size or global batch size, continues the very same sample stream.
"""
from __future__ import annotations

from typing import Any, Iterator

from .blend import SampleDataset
from .packed import Batch


def dp_rows(consumed: int, global_batch_size: int, dp_rank: int, dp_size: int) -> range:
    """Sample indices of dp rank `dp_rank`'s rows of the global batch that starts after `consumed` samples."""
    if global_batch_size % dp_size:
        raise ValueError(f"global_batch_size = {global_batch_size} is not divisible by dp = {dp_size}: each dp rank "
                         f"needs the same number of rows; use a multiple of {dp_size}")
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank = {dp_rank}: must be in [0, {dp_size})")
    rows = global_batch_size // dp_size
    start = consumed + dp_rank * rows
    return range(start, start + rows)


def _differences(saved: Any, current: Any, key: str = "") -> list[str]:
    """Dotted keys where two nested descriptions differ, with both values."""
    if isinstance(saved, dict) and isinstance(current, dict):
        return [d for k in sorted(set(saved) | set(current), key=str)
                for d in _differences(saved.get(k), current.get(k), f"{key}.{k}" if key else str(k))]
    if isinstance(saved, list) and isinstance(current, list) and len(saved) == len(current):
        return [d for i, (a, b) in enumerate(zip(saved, current)) for d in _differences(a, b, f"{key}[{i}]")]
    return [] if saved == current else [f"{key or 'dataset'}: checkpoint {saved!r}, now {current!r}"]


class BatchLoader:
    """Consecutive global batches of a dataset; this dp rank's rows; state_dict() goes into the checkpoint."""

    def __init__(self, dataset: SampleDataset, global_batch_size: int, dp_rank: int = 0, dp_size: int = 1):
        if global_batch_size < 1:
            raise ValueError(f"global_batch_size = {global_batch_size}: must be >= 1")
        dp_rows(0, global_batch_size, dp_rank, dp_size)  # validates the split
        self.dataset, self.global_batch_size = dataset, global_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.consumed_samples = 0

    def batch_at(self, consumed: int) -> Batch:
        """This rank's (global_batch_size / dp, seq_len) rows of the global batch after `consumed` samples."""
        rows = dp_rows(consumed, self.global_batch_size, self.dp_rank, self.dp_size)
        return Batch.stack([self.dataset[i] for i in rows])

    def next_batch(self) -> Batch:
        """The next global batch's rows for this rank; advances the state by one global batch."""
        batch = self.batch_at(self.consumed_samples)
        self.consumed_samples += self.global_batch_size
        return batch

    def __iter__(self) -> Iterator[Batch]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        """Plain ints, strings and lists: the consumed samples, where they leave each dataset, and what the data is."""
        return {"consumed_samples": self.consumed_samples, "global_batch_size": self.global_batch_size,
                "position": self.dataset.position(self.consumed_samples), "dataset": self.dataset.describe()}

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> None:
        """Continue where a checkpoint's loader stopped; strict refuses a dataset that is not the one it described."""
        if strict:
            diff = _differences(state.get("dataset"), self.dataset.describe())
            if diff:
                raise ValueError("the checkpoint's data loader read other data: " + "; ".join(diff) + ". Resume "
                                 "with the same data and seeds, or pass strict=False to continue this dataset from "
                                 f"sample {state.get('consumed_samples')}")
        consumed = state["consumed_samples"]
        if not isinstance(consumed, int) or consumed < 0:
            raise ValueError(f"consumed_samples = {consumed!r} in the loader state: must be an int >= 0")
        self.consumed_samples = consumed
