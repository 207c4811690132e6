"""Discrete-event simulation of a schedule: proves it finishes, that every channel matches, and draws its timeline.

The model is the executor's: a send is posted the moment its action ends and never blocks (gloo); a receive blocks
until the message is there. Messages on a (src, dst) channel match in posting order, as in gloo and NCCL, so the
k-th receive on a channel gets the k-th send: if that is not the message the receiver wanted, the run would
silently mix up tensors, and the simulation raises instead. With `coalesced` a batch of sends and receives
completes only as a whole (NCCL): a send then also waits until its receiver has posted the matching receive.
"""
from __future__ import annotations

import functools
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable

from .plan import Message, Step, plan_steps
from .schedules import Action, ScheduleError, forward_only, ideal_bubble_fraction, schedule_actions


class PipelineHangError(ScheduleError):
    """A schedule that would deadlock, or leave a message unmatched or matched to the wrong receive."""


@dataclass(frozen=True)
class Event:
    """One action on one rank, from start to end (in the simulation's time units)."""

    start: float
    end: float
    action: Action


@dataclass
class Timeline:
    """Every rank's events; the step takes `makespan`, each rank computes for `busy` of it."""

    name: str
    pp: int
    vpp: int
    micro_batches: int
    events: list[list[Event]]

    @property
    def makespan(self) -> float:
        return max(e.end for rank in self.events for e in rank) if any(self.events) else 0.0

    @property
    def busy(self) -> float:
        return max(sum(e.end - e.start for e in rank) for rank in self.events)

    @property
    def bubble_fraction(self) -> float:
        """Idle time / compute time of a rank over the whole step (Megatron's definition)."""
        return self.makespan / self.busy - 1.0 if self.busy else 0.0

    def format(self) -> str:
        """One row per rank, one column per time unit: 'F3' forward of micro-batch 3 ('F3.1': through chunk 1),
        '.' idle; an action longer than one unit continues with '-'."""
        labels = [e.action.label(self.vpp) for rank in self.events for e in rank]
        width = max(map(len, labels), default=1) + 1
        cells = int(round(self.makespan))
        rows = []
        for r, rank in enumerate(self.events):
            row = ["."] * cells
            for e in rank:
                first, last = int(round(e.start)), int(round(e.end))
                row[first:last] = [e.action.label(self.vpp)] + ["-"] * (last - first - 1)
            rows.append(f"rank {r} | " + "".join(c.ljust(width) for c in row).rstrip())
        ideal = ideal_bubble_fraction(self.name, self.pp, self.vpp, self.micro_batches)
        head = (f"{self.name}: pp={self.pp} vpp={self.vpp} micro_batches={self.micro_batches}  "
                f"bubble {self.bubble_fraction:.3f} (ideal {ideal:.3f})")
        return "\n".join([head] + rows)


def unit_time(action: Action) -> float:
    """Forward and backward of a chunk both take one time unit."""
    return 1.0


def simulate_steps(steps: list[list[Step]], duration: Callable[[Action], float] = unit_time,
                   coalesced: bool = False) -> list[list[Event]]:
    """Run every rank's steps against each other; raises PipelineHangError on deadlock or a mismatched channel.

    Before step i a rank posts one batch: step i - 1's send and step i's receive (and after its last step, the last
    send). It waits for the receive only; with `coalesced` (NCCL, which completes a batch as a whole) also until
    the peer has posted the receive that matches its send.
    """
    pp = len(steps)
    sent: dict[tuple[int, int], list[tuple[Message, float]]] = defaultdict(list)  # channel -> posted sends
    wanted: dict[tuple[int, int], list[float]] = defaultdict(list)  # channel -> post times of its receives
    done, clock, mine = [0] * pp, [0.0] * pp, [None] * pp  # mine: this batch's (receive #, send #) once posted
    events: list[list[Event]] = [[] for _ in range(pp)]
    progress = True
    while progress:
        progress = False
        for r in range(pp):
            while done[r] <= len(steps[r]):
                i = done[r]
                step = steps[r][i] if i < len(steps[r]) else None
                before = steps[r][i - 1] if i > 0 else None
                if mine[r] is None:  # post the batch
                    k = j = None
                    if step is not None and step.recv is not None:
                        k = len(wanted[(step.src, r)])
                        wanted[(step.src, r)].append(clock[r])
                    if before is not None and before.send is not None:
                        j = len(sent[(r, before.dst)])
                        sent[(r, before.dst)].append((before.send, clock[r]))
                    mine[r] = (k, j)
                k, j = mine[r]
                start = clock[r]
                if k is not None:
                    channel = (step.src, r)
                    if k >= len(sent[channel]):
                        break  # blocked: the message is not sent yet
                    message, at = sent[channel][k]
                    if message != step.recv:
                        raise PipelineHangError(
                            f"rank {r} step {i} ({step.action.label()}) expects {step.recv} as receive #{k} "
                            f"from rank {step.src}, but send #{k} on that channel is {message}")
                    start = max(start, at)
                if coalesced and j is not None:
                    if j >= len(wanted[(r, before.dst)]):
                        break  # blocked: the peer has not posted the matching receive
                    start = max(start, wanted[(r, before.dst)][j])
                if step is not None:
                    events[r].append(Event(start, start + duration(step.action), step.action))
                    start = events[r][-1].end
                clock[r], done[r], mine[r], progress = start, i + 1, None, True
    _check_finished(steps, done, mine)
    for channel, messages in sent.items():
        if len(wanted[channel]) != len(messages):
            raise PipelineHangError(f"channel {channel[0]} -> {channel[1]}: {len(messages)} sends but "
                                    f"{len(wanted[channel])} receives")
    return events


def _check_finished(steps: list[list[Step]], done: list[int], mine: list) -> None:
    stuck = [r for r in range(len(steps)) if done[r] <= len(steps[r])]
    if stuck:
        raise PipelineHangError("deadlock: " + "; ".join(_waiting(steps[r], done[r], mine[r], r) for r in stuck))


def _waiting(steps: list[Step], i: int, mine, r: int) -> str:
    """What rank r is blocked on before its step i."""
    k, j = mine
    at = f"rank {r} at {steps[i].action.label()}" if i < len(steps) else f"rank {r} after its last step"
    waits = [f"{steps[i].recv} from rank {steps[i].src}"] if k is not None else []
    waits += [f"rank {steps[i - 1].dst} to receive {steps[i - 1].send}"] if j is not None else []
    return f"{at} waits for " + " or ".join(waits)


def simulate(name: str, pp: int, vpp: int, micro_batches: int, duration: Callable[[Action], float] = unit_time,
             forwards_only: bool = False, coalesced: bool = False) -> Timeline:
    """Simulate the named schedule on all pp ranks; the result prints as a per-rank timeline."""
    steps = []
    for r in range(pp):
        actions = schedule_actions(name, pp, vpp, micro_batches, r)
        steps.append(plan_steps(forward_only(actions) if forwards_only else actions, r, pp, vpp))
    return Timeline(name, pp, vpp, micro_batches, simulate_steps(steps, duration, coalesced))


def plan_rank(name: str, pp: int, vpp: int, micro_batches: int, rank: int, backward: bool = True,
              coalesced: bool = False) -> list[Step]:
    """This rank's steps under the named schedule, once the simulation has proved the whole pipeline's plan for
    this backend's p2p semantics (`coalesced`: a batch completes as a whole, as on NCCL)."""
    _prove(name, pp, vpp, micro_batches, backward, coalesced)
    actions = schedule_actions(name, pp, vpp, micro_batches, rank)
    return plan_steps(actions if backward else forward_only(actions), rank, pp, vpp)


@functools.lru_cache(maxsize=256)
def _prove(name: str, pp: int, vpp: int, micro_batches: int, backward: bool, coalesced: bool) -> None:
    try:
        simulate(name, pp, vpp, micro_batches, forwards_only=not backward, coalesced=coalesced)
    except PipelineHangError as err:
        if not coalesced:
            raise
        raise PipelineHangError(
            f"{name} with pp={pp} vpp={vpp} micro_batches={micro_batches} would deadlock where a batch of sends and "
            f"receives completes only as a whole (NCCL): {err}. Use schedule '1f1b' or 'gpipe' on this backend "
            "(proved safe on the whole grid)") from None
