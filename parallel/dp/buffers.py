"""Flat fp32 main-gradient buffers cut into buckets: the unit of gradient communication and of ZeRO-1 ownership."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from ..collectives import Pending

ALIGN = 64
"""On GPUs, every rank's chunk of a bucket is a multiple of this many elements (aligned chunks for NCCL)."""


@dataclass(eq=False)
class Bucket:
    """Elements [start, end) of a GradBuffer, reduced by one collective; (end - start) divides by the shard count."""

    index: int              # position in the global launch order (the same on every rank)
    start: int
    end: int
    params: list[torch.nn.Parameter]
    ready: set[int] = field(default_factory=set)  # ids of params whose last-micro-batch gradient has arrived
    pending: Optional[Pending] = None              # the in-flight reduction, once launched

    def chunk(self, rank: int, shards: int) -> tuple[int, int]:
        """Buffer range [lo, hi) of the rank-th of `shards` equal chunks of this bucket."""
        size = (self.end - self.start) // shards
        return self.start + rank * size, self.start + (rank + 1) * size


@dataclass(frozen=True, eq=False)
class Segment:
    """Elements [param_lo, param_hi) of a flattened parameter, whose main gradient is buffer.data[lo:hi]."""

    param: torch.nn.Parameter
    param_lo: int
    param_hi: int
    buffer: "GradBuffer"
    bucket: Bucket
    lo: int
    hi: int

    @property
    def grad(self) -> torch.Tensor:
        return self.buffer.data[self.lo:self.hi]


class GradBuffer:
    """fp32 main gradients of a set of parameters in one flat buffer, cut into buckets of about `bucket_numel`.

    Parameters are laid out in the given order (callers pass them in the order backward produces their gradients,
    so buckets fill one after another); a parameter never straddles two buckets; each bucket is zero-padded to a
    multiple of `pad_to`. `sum_over_tp`: these gradients are also summed over tp (sequence-parallel norm weights).
    """

    def __init__(self, params: Sequence[torch.nn.Parameter], bucket_numel: int, pad_to: int, sum_over_tp: bool = False,
                 dtype: torch.dtype = torch.float32):
        if not params:
            raise ValueError("GradBuffer needs at least one parameter")
        self.sum_over_tp = sum_over_tp
        self.ranges: dict[int, tuple[int, int]] = {}  # id(param) -> [start, end) in the buffer
        self.buckets: list[Bucket] = []
        offset, members = 0, []
        for i, p in enumerate(params):
            self.ranges[id(p)] = (offset, offset + p.numel())
            offset += p.numel()
            members.append(p)
            bucket_start = self.ranges[id(members[0])][0]
            if offset - bucket_start >= bucket_numel or i == len(params) - 1:
                end = bucket_start + -(-(offset - bucket_start) // pad_to) * pad_to
                self.buckets.append(Bucket(len(self.buckets), bucket_start, end, members))
                offset, members = end, []
        self.data = torch.zeros(offset, dtype=dtype, device=params[0].device)  # (total padded elements,)

    def main_grad(self, p: torch.nn.Parameter) -> torch.Tensor:
        """The main gradient of p: a view of the buffer shaped like p."""
        start, end = self.ranges[id(p)]
        return self.data[start:end].view(p.shape)

    def segments(self, bucket: Bucket, lo: int, hi: int) -> list[Segment]:
        """The parts of the bucket's parameters whose gradients lie in buffer range [lo, hi), in buffer order."""
        out = []
        for p in bucket.params:
            start, end = self.ranges[id(p)]
            a, b = max(start, lo), min(end, hi)
            if a < b:
                out.append(Segment(p, a - start, b - start, self, bucket, a, b))
        return out
