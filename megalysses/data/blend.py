"""Blending: samples drawn from several datasets in proportion to weights, exactly (within rounding) and seeded.

The blended sample sequence is cut into blocks of `block` samples. Over the first N = b * block samples,
dataset k contributes A_k(N) samples: the largest-remainder apportionment of N by the weights (exact rationals),
so |A_k(N) - w_k N| < 1 at every block boundary. Block b holds A_k((b + 1) * block) - A_k(b * block) samples of
dataset k in a seeded random order; dataset k's samples are taken in its own order (0, 1, 2, ...), so each dataset
walks through its epochs at its own pace. Any blended sample is found from (seed, index) alone.
"""
from __future__ import annotations

import math
from fractions import Fraction
from typing import Any, Protocol, Sequence

import torch

from .packed import Batch, seeded_generator


class SampleDataset(Protocol):
    """What a loader needs: sample i of an endless sequence, its length, and a description that pins it down."""

    seq_len: int

    def __getitem__(self, index: int) -> Batch: ...

    def describe(self) -> dict[str, Any]: ...

    def position(self, consumed: int) -> dict[str, Any]: ...


def apportion(n: int, weights: Sequence[Fraction]) -> list[int]:
    """n split by weights (summing to 1): floors, then one more to the largest remainders (ties: lower index)."""
    quotas = [n * w for w in weights]
    counts = [math.floor(q) for q in quotas]
    by_remainder = sorted(range(len(weights)), key=lambda k: (-(quotas[k] - counts[k]), k))
    for k in by_remainder[: n - sum(counts)]:
        counts[k] += 1
    return counts


class BlendedDataset:
    """Samples from several datasets by weight: exact counts per block of samples, seeded order inside a block."""

    def __init__(self, datasets: Sequence[SampleDataset], weights: Sequence[float], seed: int = 0, block: int = 1024):
        if len(datasets) == 0 or len(datasets) != len(weights):
            raise ValueError(f"{len(datasets)} datasets and {len(weights)} weights: give one weight per dataset "
                             "(and at least one dataset)")
        bad = [w for w in weights if not (w > 0 and math.isfinite(w))]
        if bad:
            raise ValueError(f"weights {list(weights)}: every weight must be a positive finite number (got {bad[0]}); "
                             "leave a dataset out instead of weighting it 0")
        lengths = {d.seq_len for d in datasets}
        if len(lengths) != 1:
            raise ValueError(f"datasets have different seq_len {sorted(lengths)}: blend datasets of one seq_len")
        total = sum(Fraction(w) for w in weights)
        self.weights = [Fraction(w) / total for w in weights]
        # block * w_k >= 1 for every k keeps each dataset's cumulative count non-decreasing from block to block
        self.block = max(block, math.ceil(1 / min(self.weights)))
        self.datasets, self.seed, self.seq_len = list(datasets), seed, lengths.pop()
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def _block(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Block b: (dataset of each sample, index of that sample within its dataset), each (block,)."""
        if b not in self._cache:
            before, after = apportion(b * self.block, self.weights), apportion((b + 1) * self.block, self.weights)
            counts = torch.tensor([a - c for a, c in zip(after, before)])
            choice = torch.repeat_interleave(torch.arange(len(counts)), counts)
            choice = choice[torch.randperm(self.block, generator=seeded_generator(self.seed, b))]
            index = torch.empty(self.block, dtype=torch.long)
            for k, start in enumerate(before):
                here = choice == k
                index[here] = start + torch.arange(int(counts[k]))
            self._cache = {b: (choice, index)}
        return self._cache[b]

    def source(self, index: int) -> tuple[int, int]:
        """(dataset, sample within that dataset) of blended sample `index`."""
        b, i = divmod(index, self.block)
        choice, within = self._block(b)
        return int(choice[i]), int(within[i])

    def __getitem__(self, index: int) -> Batch:
        if index < 0:
            raise IndexError(f"sample index {index}: must be >= 0")
        k, j = self.source(index)
        return self.datasets[k][j]

    def consumed_per_dataset(self, consumed: int) -> list[int]:
        """How many samples of each dataset the first `consumed` blended samples used."""
        b, i = divmod(consumed, self.block)
        counts = apportion(b * self.block, self.weights)
        if i:
            taken = torch.bincount(self._block(b)[0][:i], minlength=len(counts))
            counts = [c + int(t) for c, t in zip(counts, taken)]
        return counts

    def describe(self) -> dict[str, Any]:
        return {"kind": "blended", "seed": self.seed, "block": self.block,
                "weights": [str(w) for w in self.weights], "datasets": [d.describe() for d in self.datasets]}

    def position(self, consumed: int) -> dict[str, Any]:
        return {"datasets": [d.position(c) for d, c in zip(self.datasets, self.consumed_per_dataset(consumed))]}
