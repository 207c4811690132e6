"""Optimizer state in host memory: pinned host blocks of (master, exp_avg, exp_avg_sq) streamed to the device and back,
one bucket at a time, with the next bucket's copy in flight while the current one steps."""
from __future__ import annotations

import contextlib
import weakref
from typing import Iterator, Optional, Sequence

import torch

STATE_ROWS = ("master", "exp_avg", "exp_avg_sq")
"""The rows of a state block: the fp32 master weights and AdamW's two moments of one owned bucket chunk."""


REGISTER_CHUNK_BYTES = 16 * 2**30
"""Page-lock a host arena in pieces of at most this size (one driver registration of hundreds of GiB can fail)."""


class HostArena:
    """One fp32 host buffer of exactly the requested size, page-locked (cudaHostRegister) when the device is a GPU so
    copies to and from it run asynchronously on copy engines. torch's pinned allocator would round each request up
    to a power of two: 90 GiB of optimizer state would pin 128 GiB."""

    def __init__(self, numel: int, device: torch.device):
        self.data = torch.zeros(numel, dtype=torch.float32)  # (numel,), pageable until registered
        self._pinned: list[int] = []  # base addresses registered with the driver
        if device.type == "cuda" and numel:
            self._pin()
            weakref.finalize(self, _unpin, list(self._pinned), self.data)  # the buffer lives until unregistered

    def _pin(self) -> None:
        cudart, base, nbytes = torch.cuda.cudart(), self.data.data_ptr(), self.data.numel() * 4
        for start in range(0, nbytes, REGISTER_CHUNK_BYTES):
            size = min(REGISTER_CHUNK_BYTES, nbytes - start)
            err = cudart.cudaHostRegister(base + start, size, 0)
            if int(err) != 0:
                _unpin(self._pinned, self.data)
                raise RuntimeError(f"page-locking {nbytes / 2**30:.1f} GiB of host memory for the offloaded optimizer "
                                   f"state failed (CUDA error {int(err)}) after {start / 2**30:.1f} GiB: the host "
                                   "lacks that much lockable memory (see `ulimit -l` and free memory); train with "
                                   "train.offload_optimizer=false, or spread the state over more ranks (ZeRO-1)")
            self._pinned.append(base + start)

    def blocks(self, lengths: Sequence[int]) -> list[torch.Tensor]:
        """Consecutive (len(STATE_ROWS), n) views of the arena, one per length (the arena holds their sum x 3)."""
        out, offset = [], 0
        for n in lengths:
            out.append(self.data[offset:offset + len(STATE_ROWS) * n].view(len(STATE_ROWS), n))
            offset += len(STATE_ROWS) * n
        return out


def _unpin(addresses: list[int], _buffer: torch.Tensor) -> None:
    """Unregister the arena's pieces (the buffer argument keeps its memory alive until then)."""
    cudart = torch.cuda.cudart()
    while addresses:
        cudart.cudaHostUnregister(addresses.pop())


SLOTS = 3
"""Device staging buffers: one being fetched, one stepping, one being written back."""


class StagedBlock:
    """A state block's device copy in staging slot `slot`; `ready` is the event its host-to-device copy records."""

    def __init__(self, device_block: torch.Tensor, ready: Optional[torch.cuda.Event], slot: int):
        self.block, self.ready, self.slot = device_block, ready, slot


class HostStaging:
    """Streams state blocks between host and device through SLOTS fixed device buffers: host-to-device on one side
    stream, device-to-host on another, so the next bucket's fetch, the current bucket's step and the previous
    bucket's write-back overlap. The ordering lives on the GPU (a slot is refilled only after its write-back has
    read it), so the host never waits and the device holds at most SLOTS blocks however far the host runs ahead.

    On a CPU device the same calls run as plain copies (no streams), so CPU tests walk the same path."""

    def __init__(self, device: torch.device, block_numel: int):
        self.device = device
        self.cuda = device.type == "cuda"
        self.h2d = torch.cuda.Stream(device) if self.cuda else None
        self.d2h = torch.cuda.Stream(device) if self.cuda else None
        self.side = torch.cuda.Stream(device) if self.cuda else None  # where a deferred step runs
        self.slots = ([torch.empty(block_numel, dtype=torch.float32, device=device) for _ in range(SLOTS)]
                      if self.cuda else [])  # (largest block's numel,) each
        self.emptied: list[Optional[torch.cuda.Event]] = [None] * SLOTS  # a slot's last write-back has read it
        self._turn = 0

    def begin(self) -> None:
        """Order this step's fetches after everything queued so far: the gradients, and the last step's write-backs
        into the same host blocks."""
        if self.cuda:
            self.h2d.wait_stream(torch.cuda.current_stream(self.device))
            self.h2d.wait_stream(self.d2h)

    @contextlib.contextmanager
    def stepping(self, deferred: bool) -> Iterator[None]:
        """Run the step's kernels on the compute stream, or (deferred) on the side stream after what the compute
        stream has queued, without the compute stream waiting for them: it waits per bucket (await_mark)."""
        if not (self.cuda and deferred):
            yield
            return
        self.side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.side):
            yield

    def mark(self) -> Optional[torch.cuda.Event]:
        """An event after the work queued so far on the current stream (None on a CPU)."""
        return torch.cuda.current_stream(self.device).record_event() if self.cuda else None

    def await_mark(self, mark: Optional[torch.cuda.Event]) -> None:
        """The current stream waits for a mark's work."""
        if mark is not None:
            torch.cuda.current_stream(self.device).wait_event(mark)

    def fetch(self, host: torch.Tensor) -> StagedBlock:
        """Start copying a host block into the next free slot; use it after `wait`."""
        slot, self._turn = self._turn, (self._turn + 1) % SLOTS
        if not self.cuda:
            return StagedBlock(host.clone(), None, slot)
        block = self.slots[slot][:host.numel()].view(host.shape)
        if self.emptied[slot] is not None:
            self.h2d.wait_event(self.emptied[slot])  # its previous block has been written back
        with torch.cuda.stream(self.h2d):
            block.copy_(host, non_blocking=True)
            return StagedBlock(block, self.h2d.record_event(), slot)

    def wait(self, staged: StagedBlock) -> torch.Tensor:
        """The device block, once its copy has landed (the current stream waits, not the host)."""
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(staged.ready)
        return staged.block

    def write_back(self, staged: StagedBlock, host: torch.Tensor) -> None:
        """Copy an updated device block into its host block once the current stream has written it."""
        if not self.cuda:
            host.copy_(staged.block)
            return
        self.d2h.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.d2h):
            host.copy_(staged.block, non_blocking=True)
            self.emptied[staged.slot] = self.d2h.record_event()

    def end(self) -> None:
        """Later work on the stepping stream waits for this step's write-backs (their device blocks stay alive)."""
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_stream(self.d2h)

    def settle(self) -> None:
        """Block the host until every write-back has landed (before host code reads or writes the host blocks)."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
