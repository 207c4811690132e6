"""Graceful stop: SIGTERM / SIGINT set a flag that the training loop polls, so it can finish the step, checkpoint, exit.

    with stop_on_signals() as stop:
        for step in range(start, steps):
            train_step(...)
            if stop_agreed(stop, device):                # every rank must stop at the same step
                save_checkpoint(...)
                break

Launchers deliver a stop signal more than once (a terminal's Ctrl-C reaches torchrun and its workers; torchrun then
forwards it again), so repeats are harmless: the flag stays set. torchrun SIGKILLs workers --shutdown-timeout
seconds (default 30) after it forwarded the signal; give it more when the final checkpoint takes longer.
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Iterator, Optional, Sequence

import torch
import torch.distributed as dist

from megalysses.parallel import collectives as C

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """Whether a stop was asked for (`requested`) and by which signal; `installed` is False off the main thread."""

    def __init__(self, installed: bool = False):
        self.requested, self.signum, self.installed = False, None, installed

    def request(self, signum: Optional[int] = None) -> None:
        """Ask the loop to stop after the current step (what the signal handler does)."""
        if not self.requested:
            self.requested, self.signum = True, signum

    @property
    def signal_name(self) -> Optional[str]:
        return signal.Signals(self.signum).name if self.signum is not None else None


@contextlib.contextmanager
def stop_on_signals(signals: Sequence[int] = STOP_SIGNALS, announce: bool = True) -> Iterator[StopRequest]:
    """Within the block, the given signals set `stop.requested` instead of raising or killing; the previous handlers
    come back on exit. Off the main thread (where Python cannot install handlers) nothing is installed."""
    if threading.current_thread() is not threading.main_thread():
        yield StopRequest(installed=False)
        return
    stop = StopRequest(installed=True)

    def handler(signum, frame):
        if announce and not stop.requested:  # os.write, not print: a handler may run in the middle of a print
            os.write(2, f"megalysses: {signal.Signals(signum).name} received, stopping after this step\n".encode())
        stop.request(signum)

    previous = {s: signal.signal(s, handler) for s in signals}
    try:
        yield stop
    finally:
        for s, old in previous.items():
            signal.signal(s, old if old is not None else signal.SIG_DFL)


def world_group() -> C.CommGroup:
    """Every rank of the default process group (a group of one when torch.distributed is not initialised)."""
    if not dist.is_initialized():
        return C.CommGroup.solo()
    return C.CommGroup(None, tuple(range(dist.get_world_size())), dist.get_rank())


def stop_agreed(stop: StopRequest, device: torch.device, group: Optional[C.CommGroup] = None) -> bool:
    """True on every rank (of group; default: all ranks) when any rank's stop was requested, by one tiny max
    all-reduce: signals reach ranks at different steps, and a rank stopping alone would leave the rest hanging."""
    group = group or world_group()
    flag = torch.tensor([1.0 if stop.requested else 0.0], device=device)
    return bool(C.all_reduce(flag, group, op="max").item())
