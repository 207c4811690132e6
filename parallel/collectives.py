"""Every torch.distributed collective the project uses, in one place (gloo/NCCL and API differences live here)."""
from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


class CommClock:
    """Exposed communication time by kind while started: how long the compute waits for each collective (CUDA
    events on the current stream, which an NCCL call makes wait for its kernel; wall clock on CPU, where gloo
    blocks the caller). Asynchronous collectives count only their wait(), i.e. what the overlap did not hide.
    Kinds: 'all_to_all' (Ulysses), 'collective' (all-reduce, all-gather, reduce-scatter, broadcast), 'p2p'
    (pipeline sends and receives; a receive's wait includes the pipeline bubble)."""

    KINDS = ("all_to_all", "collective", "p2p")

    def __init__(self, device_type: str = "cpu"):
        self.device_type, self.running = device_type, False
        self._spans: list[tuple[str, object, object]] = []
        self._seconds = dict.fromkeys(self.KINDS, 0.0)

    def start(self) -> None:
        """Zero the totals and begin timing."""
        self._spans, self._seconds, self.running = [], dict.fromkeys(self.KINDS, 0.0), True

    def stop(self) -> dict[str, float]:
        """Stop timing; returns seconds by kind (synchronises the device to read the CUDA events)."""
        self.running = False
        if self._spans:
            torch.cuda.synchronize()
            for kind, start, end in self._spans:
                self._seconds[kind] += start.elapsed_time(end) / 1e3
            self._spans = []
        return dict(self._seconds)

    @contextmanager
    def span(self, kind: str):
        """Time the enclosed communication as `kind` (a no-op unless started)."""
        if not self.running:
            yield
        elif self.device_type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._spans.append((kind, start, end))
        else:
            tic = time.perf_counter()
            yield
            self._seconds[kind] += time.perf_counter() - tic


def _timed(clock: Optional[CommClock], kind: str):
    return clock.span(kind) if clock is not None and clock.running else nullcontext()


@dataclass(frozen=True, eq=False)
class CommGroup:
    """A process group with its size, this process's rank in it, the global ranks it spans, and the mesh's clock
    (None outside a mesh) that times its collectives when started."""

    pg: Optional[dist.ProcessGroup]
    ranks: tuple[int, ...]
    rank: int
    clock: Optional[CommClock] = None

    @property
    def size(self) -> int:
        return len(self.ranks)

    @staticmethod
    def solo() -> "CommGroup":
        """A group of one: every collective over it returns its input (single-device runs)."""
        return CommGroup(pg=None, ranks=(0,), rank=0)


# torch 2.13 renamed the fused tensor collectives (the old names warn as deprecated); older torch has only the old ones
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _whole(group: CommGroup) -> bool:
    return group.size == 1


def all_reduce(x: torch.Tensor, group: CommGroup, op: str = "sum") -> torch.Tensor:
    """All-reduce in place over the group; returns x."""
    if not _whole(group):
        with _timed(group.clock, "collective"):
            dist.all_reduce(x, op=_OPS[op], group=group.pg)
    return x


def all_gather(x: torch.Tensor, group: CommGroup, dim: int = 0) -> torch.Tensor:
    """Concatenate every rank's equally shaped x along dim, in group-rank order."""
    if _whole(group):
        return x
    x = x.contiguous()
    out = torch.empty((group.size * x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    with _timed(group.clock, "collective"):
        if x.device.type == "cpu":  # gloo has no fused all-gather on every torch version: gather a list
            dist.all_gather(list(out.chunk(group.size)), x, group=group.pg)
        else:
            _all_gather_single(out, x, group=group.pg)
    if dim == 0:
        return out
    return torch.cat(out.chunk(group.size, dim=0), dim=dim)


def reduce_scatter(x: torch.Tensor, group: CommGroup, dim: int = 0) -> torch.Tensor:
    """Sum x over the group and keep this rank's chunk along dim (x.shape[dim] divisible by the group size)."""
    if _whole(group):
        return x
    if x.shape[dim] % group.size:
        raise ValueError(f"reduce_scatter: size {x.shape[dim]} of dim {dim} is not divisible by group size {group.size}")
    if dim != 0:  # stack the dim-chunks along dim 0: (p * n0, ..., n_dim / p, ...)
        x = torch.cat(x.chunk(group.size, dim=dim), dim=0)
    x = x.contiguous()
    out = torch.empty((x.shape[0] // group.size,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    with _timed(group.clock, "collective"):
        if x.device.type == "cpu":  # gloo: reduce the whole tensor, keep our chunk
            reduced = x.clone()
            dist.all_reduce(reduced, group=group.pg)
            out.copy_(reduced.chunk(group.size)[group.rank])
        else:
            _reduce_scatter_single(out, x, group=group.pg)
    return out  # chunk r of the dim-0 stack is exactly chunk r along dim


def all_to_all(x: torch.Tensor, group: CommGroup, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    """Split x into group.size chunks along scatter_dim, send chunk i to rank i, concatenate received along gather_dim."""
    if _whole(group):
        return x
    p = group.size
    if x.shape[scatter_dim] % p:
        raise ValueError(f"all_to_all: size {x.shape[scatter_dim]} of dim {scatter_dim} is not divisible by group size {p}")
    # (..., p * c, ...) -> (p, ..., c, ...): chunk i is contiguous at the front for all_to_all_single
    recv = all_to_all_stacked(torch.stack(x.chunk(p, dim=scatter_dim), dim=0), group)
    # recv[i] came from rank i: it is the i-th piece along gather_dim
    return torch.cat(recv.unbind(0), dim=gather_dim)


def all_to_all_stacked(send: torch.Tensor, group: CommGroup) -> torch.Tensor:
    """send: (p, ...) with send[i] for rank i; returns recv (p, ...) with recv[i] from rank i."""
    if _whole(group):
        return send
    send = send.contiguous()
    recv = torch.empty_like(send)
    with _timed(group.clock, "all_to_all"):
        dist.all_to_all_single(recv, send, group=group.pg)
    return recv


def broadcast(x: torch.Tensor, group: CommGroup, src_group_rank: int = 0) -> torch.Tensor:
    """Broadcast x in place from the group's rank src_group_rank."""
    if not _whole(group):
        with _timed(group.clock, "collective"):
            dist.broadcast(x, src=group.ranks[src_group_rank], group=group.pg)
    return x


def post_p2p(sends: Sequence[tuple[torch.Tensor, int]], recvs: Sequence[tuple[torch.Tensor, int]],
             clock: Optional[CommClock] = None) -> tuple[list["Pending"], list["Pending"]]:
    """Post isend/irecv (peers are global ranks) as one batch and return at once: (send handles, receive handles).

    wait() a receive handle before reading its buffer, a send handle before changing or freeing its tensor. A
    backend that coalesces a batch (NCCL) gives one handle for the whole batch: every entry waits for that one.
    The waits are timed as 'p2p' on `clock` (the mesh's) when it runs.
    """
    ops = [dist.P2POp(dist.isend, t, peer) for t, peer in sends]
    ops += [dist.P2POp(dist.irecv, t, peer) for t, peer in recvs]
    if not ops:
        return [], []
    works = dist.batch_isend_irecv(ops)
    if len(works) != len(ops):  # coalesced: one handle completes the batch
        works = [works[0]] * len(ops)
    handles = [Pending(w, clock, "p2p") for w in works]
    return handles[:len(sends)], handles[len(sends):]


def ring_pass(x: torch.Tensor, group: CommGroup) -> tuple[torch.Tensor, list["Pending"]]:
    """Ring step, started: send x to the next group rank, receive the previous rank's equally shaped tensor.

    Returns at once with (receive buffer, handles); wait() every handle before reading the buffer or changing x.
    A group of one gets x back with nothing to wait for.
    """
    if _whole(group):
        return x, []
    x = x.contiguous()
    recv = torch.empty_like(x)
    nxt = group.ranks[(group.rank + 1) % group.size]
    prev = group.ranks[(group.rank - 1) % group.size]
    sends, recvs = post_p2p([(x, nxt)], [(recv, prev)], group.clock)
    return recv, sends + recvs


def p2p_batches_coalesce(device: torch.device) -> bool:
    """Whether the default backend completes a batch of isend/irecv as a whole (NCCL) rather than op by op (gloo)."""
    return bool(dist.group.WORLD._get_backend(device).supports_coalescing)


def barrier(group: CommGroup) -> None:
    """Wait until every rank of the group arrives."""
    if not _whole(group):
        dist.barrier(group=group.pg)


# --------------------------------------------------------------------------------- asynchronous flat-buffer ops


class Pending:
    """An in-flight collective: wait() blocks until it is done (a no-op for a group of one, or when already waited);
    the wait is what a running clock counts."""

    def __init__(self, work=None, clock: Optional[CommClock] = None, kind: str = "collective"):
        self._work, self._clock, self._kind = work, clock, kind

    def wait(self) -> None:
        if self._work is not None:
            with _timed(self._clock, self._kind):
                self._work.wait()
            self._work = None


def all_reduce_async(x: torch.Tensor, group: CommGroup, op: str = "sum") -> Pending:
    """Start an in-place all-reduce of x over the group; x holds the result once the handle's wait() returns."""
    if _whole(group):
        return Pending()
    return Pending(dist.all_reduce(x, op=_OPS[op], group=group.pg, async_op=True), group.clock)


def reduce_scatter_flat_async(flat: torch.Tensor, group: CommGroup) -> Pending:
    """Start an in-place reduce-scatter (sum) of a 1-D buffer of p * n elements: after wait(), chunk `group.rank`
    (elements [rank * n, (rank + 1) * n)) holds the sum over the group; the other chunks are unspecified."""
    if _whole(group):
        return Pending()
    _check_flat("reduce_scatter_flat_async", flat, group)
    return Pending(_reduce_scatter_single(flat.chunk(group.size)[group.rank], flat, group=group.pg, async_op=True),
                   group.clock)


def all_gather_flat_async(flat: torch.Tensor, group: CommGroup) -> Pending:
    """Start an in-place all-gather of a 1-D buffer of p * n elements whose chunk `group.rank` this rank filled:
    after wait(), chunk r holds rank r's chunk."""
    if _whole(group):
        return Pending()
    _check_flat("all_gather_flat_async", flat, group)
    return Pending(_all_gather_single(flat, flat.chunk(group.size)[group.rank], group=group.pg, async_op=True),
                   group.clock)


def _check_flat(name: str, flat: torch.Tensor, group: CommGroup) -> None:
    if flat.dim() != 1 or not flat.is_contiguous() or flat.numel() % group.size:
        raise ValueError(f"{name}: needs a contiguous 1-D buffer whose length divides by the group size {group.size}; "
                         f"got shape {tuple(flat.shape)} (contiguous: {flat.is_contiguous()}); pad the buffer to a "
                         f"multiple of {group.size}")
