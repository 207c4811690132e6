"""GradSync: bucketed gradient reduction over dp x ring x sp, launched from backward hooks so it overlaps the backward pass."""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch

from .. import collectives as C
from ..mesh import ParallelMesh
from .buffers import ALIGN, Bucket, GradBuffer, Segment
from ..tensor.sharding import param_info
from .grads import global_norm, sum_of_squares


class GradSync:
    """Bucketed all-reduce (or reduce-scatter for ZeRO-1) of fp32 main gradients over dp x ring x sp (PyTorch DDP's Reducer,
    Megatron's DistributedDataParallel).

    A post-accumulate-grad hook adds each parameter's gradient (any dtype) into its fp32 main gradient and frees the
    gradient. On the last micro-batch (outside `no_sync()`) the hook also marks the parameter ready; a bucket whose
    parameters are all ready is reduced with one asynchronous collective while backward goes on. Buckets start in a
    fixed order on every rank, so the collectives match across ranks whatever order the hooks fire in.

    The loss is each rank's share of the global token-weighted mean, so gradients are summed, not averaged.
    With `shard` (ZeRO-1) each bucket is reduce-scattered: rank r of dp x ring x sp holds the sum of chunk r only.
    Parameters whose ParamInfo says grad_sum_over_tp (norm weights under TP sequence parallelism) sit in their own buffer and
    are also summed over tp in finish().
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], mesh: ParallelMesh, bucket_mb: float = 25.0,
                 shard: bool = False):
        params = list({id(p): p for p in params if p.requires_grad}.values())[::-1]  # backward order, roughly
        if not params:
            raise ValueError("GradSync got no parameters that require gradients")
        self.mesh, self.shard = mesh, shard
        self.data_group, self.tp_group = mesh.data_group(), mesh.group("tp")
        self.shards = self.data_group.size if shard else 1
        bucket_numel = max(1, int(bucket_mb * 2**20 / 4))
        pad_to = self.shards * (ALIGN if params[0].is_cuda else 1)  # every rank's chunk equally long (and aligned)
        self.buffers: list[GradBuffer] = []
        for sum_over_tp in (False, True):  # sequence-parallel params last: their buckets complete at the very end
            members = [p for p in params if param_info(p).grad_sum_over_tp == sum_over_tp]
            if members:
                self.buffers.append(GradBuffer(members, bucket_numel, pad_to, sum_over_tp))
        self.buckets: list[Bucket] = []  # the launch order, the same on every rank
        self._home: dict[int, tuple[GradBuffer, Bucket]] = {}  # id(param) -> where its main gradient lives
        for buf in self.buffers:
            for bucket in buf.buckets:
                bucket.index = len(self.buckets)
                self.buckets.append(bucket)
                self._home.update({id(p): (buf, bucket) for p in bucket.params})
        self.params = params
        self._sync = True
        self._next = 0  # index of the next bucket to launch
        self._finished = False
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad) for p in params]

    # ------------------------------------------------------------------------------------------- backward side

    def _on_grad(self, p: torch.nn.Parameter) -> None:
        """Accumulate p.grad into its fp32 main gradient; on the last micro-batch, start every bucket now complete."""
        buf, bucket = self._home[id(p)]
        if bucket.pending is not None:
            raise RuntimeError(f"a gradient of shape {tuple(p.shape)} arrived after its bucket {bucket.index} was "
                               "already reduced: call zero_grad() after each optimizer step, and run every backward "
                               "but the last of a step inside no_sync()")
        buf.main_grad(p).add_(p.grad)
        p.grad = None
        if self._sync:
            bucket.ready.add(id(p))
            self._launch_ready()

    def _launch_ready(self) -> None:
        """Launch the complete buckets at the front of the launch order (a later complete bucket waits its turn)."""
        while self._next < len(self.buckets):
            bucket = self.buckets[self._next]
            if len(bucket.ready) < len(bucket.params):
                return
            self._launch(bucket)

    def _launch(self, bucket: Bucket) -> None:
        flat = self._buffer_of(bucket).data[bucket.start:bucket.end]
        bucket.pending = (C.reduce_scatter_flat_async(flat, self.data_group) if self.shard
                          else C.all_reduce_async(flat, self.data_group))
        self._next += 1

    def _buffer_of(self, bucket: Bucket) -> GradBuffer:
        return self._home[id(bucket.params[0])][0]

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward passes inside only accumulate (earlier micro-batches); the one after it reduces."""
        self._sync = False
        try:
            yield
        finally:
            self._sync = True

    def finish(self) -> None:
        """Launch buckets still waiting (parameters that got no gradient count as zero), wait for all, and sum
        sequence-parallel gradients over tp. Afterwards owned_segments() hold the summed gradients. Idempotent."""
        if self._finished:
            return
        if not self._sync:
            raise RuntimeError("GradSync.finish() called inside no_sync(): finish after the last micro-batch's "
                               "backward, outside no_sync()")
        while self._next < len(self.buckets):
            self._launch(self.buckets[self._next])
        for bucket in self.buckets:
            bucket.pending.wait()
        for buf in self.buffers:
            if buf.sum_over_tp:
                for bucket in buf.buckets:
                    lo, hi = self.owned_range(bucket)
                    C.all_reduce(buf.data[lo:hi], self.tp_group)
        self._finished = True

    def all_reduce_main_grads(self, params: Iterable[torch.nn.Parameter], group) -> None:
        """Also sum these parameters' main gradients over another group (a tied embedding's copies on the first and
        last pipeline stage); after finish(). Needs whole main gradients, so not under ZeRO-1."""
        if self.shard:
            raise NotImplementedError("summing main gradients over another group needs unsharded buckets (zero 0)")
        if not self._finished:
            raise RuntimeError("all_reduce_main_grads() before finish(): the dp x ring x sp reduction must land first")
        for p in params:
            C.all_reduce(self.main_grad(p), group)

    def zero_grad(self, zero_buffers: bool = True) -> None:
        """Zero the main gradients and forget the launched buckets: call after each optimizer step (`zero_buffers`
        False: the optimizer has zeroed the buffers itself)."""
        if zero_buffers:
            for buf in self.buffers:
                buf.data.zero_()
        for bucket in self.buckets:
            bucket.ready.clear()
            bucket.pending = None
        for p in self.params:
            p.grad = None
        self._next, self._finished = 0, False

    # ------------------------------------------------------------------------------------------- optimizer side

    def owned_range(self, bucket: Bucket) -> tuple[int, int]:
        """Buffer range of the bucket that this rank reduces and updates: its chunk under ZeRO-1, else all of it."""
        if not self.shard:
            return bucket.start, bucket.end
        return bucket.chunk(self.data_group.rank, self.shards)

    def owned_segments(self) -> list[Segment]:
        """Every parameter piece whose summed gradient this rank holds after finish(), in launch order."""
        return [seg for bucket in self.buckets
                for seg in self._buffer_of(bucket).segments(bucket, *self.owned_range(bucket))]

    def buffer_range(self, p: torch.nn.Parameter) -> tuple[Bucket, int, int]:
        """p's bucket and its element range [start, end) in the bucket's buffer."""
        buf, bucket = self._home[id(p)]
        return (bucket, *buf.ranges[id(p)])

    def holds(self, p: torch.nn.Parameter) -> bool:
        """Whether p's main gradient lives in these buffers."""
        return id(p) in self._home

    def bucket_main_grads(self, bucket: Bucket) -> torch.Tensor:
        """The whole bucket's main gradients, padding included: a view of its buffer."""
        return self._buffer_of(bucket).data[bucket.start:bucket.end]

    def main_grad(self, p: torch.nn.Parameter) -> torch.Tensor:
        """p's fp32 main gradient (summed over dp x ring x sp after finish() unless sharded: then only the owned part)."""
        return self._home[id(p)][0].main_grad(p)

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """Global gradient norm (each element once across tp, pp, sp, dp); scales the gradients so it is at most
        max_norm (0 disables). Call after finish(); returns the norm before clipping."""
        segments = self.owned_segments()
        infos = {id(s.param): param_info(s.param) for s in segments}
        sq = sum_of_squares(((s.grad, infos[id(s.param)].shard is not None, self.shard)
                             for s in segments if not infos[id(s.param)].pipeline_duplicate), self.buffers[0].data.device)
        norm = global_norm(sq, self.mesh, data_split=self.shard)
        if max_norm > 0:
            scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
            for s in segments:
                s.grad.mul_(scale.to(s.grad.dtype))
        return norm
