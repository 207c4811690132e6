"""Discrete-event simulation of a schedule: proves it finishes, that every channel matches, and draws its timeline.

The model is the executor's: a rank runs rounds, each a batch of sends and receives and then at most one action
(plan.Round); a send is posted with its round and never blocks (gloo); a receive blocks until the message is
there. Messages on a (src, dst) channel match in posting order, as in gloo and NCCL, so the k-th receive on a
channel gets the k-th send: if that is not the message the receiver wanted, the run would silently mix up
tensors, and the simulation raises instead. With `coalesced` a batch of sends and receives
completes only as a whole (NCCL): a send then also waits until its receiver has posted the matching receive.
Where rounds are posted as in `rounds_of` that deadlocks for interleaved 1F1B; the lockstep plan never does.
"""
from __future__ import annotations

import functools
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Optional

from .plan import Message, PipelineHangError, Round, Step, plan_pipeline
from .schedules import Action, ideal_bubble_fraction


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


def simulate_rounds(rounds: list[list[Round]], duration: Callable[[Action], float] = unit_time,
                    coalesced: bool = False) -> list[list[Event]]:
    """Run every rank's rounds against each other; raises PipelineHangError on deadlock, on a mismatched channel,
    or on a step whose input has not arrived.

    Each round posts one batch and waits for its receives; with `coalesced` (NCCL, which completes a batch as a
    whole) also until each send's receiver has posted the matching receive. Then the round's step runs.
    """
    pp = len(rounds)
    posted: dict[str, dict] = {"send": defaultdict(list), "recv": defaultdict(list)}  # channel -> [(message, time)]
    done, clock, mine = [0] * pp, [0.0] * pp, [None] * pp  # mine: the posted batch's ops, as (channel, index)
    held: list[set[Message]] = [set() for _ in range(pp)]  # received, not yet consumed
    events: list[list[Event]] = [[] for _ in range(pp)]
    progress = True
    while progress:
        progress = False
        for r in range(pp):
            while done[r] < len(rounds[r]):
                rnd = rounds[r][done[r]]
                if mine[r] is None:
                    mine[r] = _post(r, rnd, clock[r], posted)
                start = _batch_done(r, done[r], rnd, mine[r], clock[r], posted, coalesced)
                if start is None:
                    break  # blocked on a peer
                held[r] |= {message for message, _ in rnd.recvs}
                if rnd.step is not None:
                    _consume(r, done[r], rnd.step, held[r])
                    events[r].append(Event(start, start + duration(rnd.step.action), rnd.step.action))
                    start = events[r][-1].end
                clock[r], done[r], mine[r], progress = start, done[r] + 1, None, True
    _check_finished(rounds, done, mine, posted)
    for channel, messages in posted["send"].items():
        if len(posted["recv"][channel]) != len(messages):
            raise PipelineHangError(f"channel {channel[0]} -> {channel[1]}: {len(messages)} sends but "
                                    f"{len(posted['recv'][channel])} receives")
    return events


def _post(r: int, rnd: Round, now: float, posted: dict) -> tuple[list, list]:
    """Post a round's batch: its receives' and sends' (channel, index on that channel)."""
    ops = []
    for kind, pairs, channel_of in (("recv", rnd.recvs, lambda q: (q, r)), ("send", rnd.sends, lambda q: (r, q))):
        mine = []
        for message, q in pairs:
            channel = channel_of(q)
            mine.append((channel, len(posted[kind][channel])))
            posted[kind][channel].append((message, now))
        ops.append(mine)
    return ops[0], ops[1]


def _batch_done(r: int, i: int, rnd: Round, mine: tuple[list, list], now: float, posted: dict,
                coalesced: bool) -> Optional[float]:
    """When rank r's posted batch completes, or None while it waits for a peer; checks every receive's message."""
    recvs, sends = mine
    for (channel, k), (wanted, _) in zip(recvs, rnd.recvs):
        if k >= len(posted["send"][channel]):
            return None  # the message is not sent yet
        message, at = posted["send"][channel][k]
        if message != wanted:
            raise PipelineHangError(
                f"rank {r} {_where(rnd, i)} expects {wanted} as receive #{k} from rank {channel[0]}, but send #{k} "
                f"on that channel is {message}")
        now = max(now, at)
    for channel, j in sends if coalesced else []:
        if j >= len(posted["recv"][channel]):
            return None  # the peer has not posted the matching receive
        now = max(now, posted["recv"][channel][j][1])
    return now


def _consume(r: int, i: int, step: Step, held: set[Message]) -> None:
    if step.recv is not None:
        if step.recv not in held:
            raise PipelineHangError(f"rank {r} round {i} ({step.action.label()}) needs {step.recv}, which no round "
                                    "up to this one receives")
        held.remove(step.recv)


def _where(rnd: Round, i: int) -> str:
    return f"round {i} ({rnd.step.action.label()})" if rnd.step is not None else f"round {i}"


def _check_finished(rounds: list[list[Round]], done: list[int], mine: list, posted: dict) -> None:
    stuck = [r for r in range(len(rounds)) if done[r] < len(rounds[r])]
    if stuck:
        raise PipelineHangError("deadlock: " + "; ".join(_waiting(rounds[r], done[r], mine[r], r, posted)
                                                         for r in stuck))


def _waiting(rounds: list[Round], i: int, mine, r: int, posted: dict) -> str:
    """What rank r is blocked on in its round i: the receives not sent yet, the sends not received yet."""
    rnd = rounds[i]
    at = f"rank {r} at {rnd.step.action.label()}" if rnd.step is not None else f"rank {r} in round {i}"
    recvs, sends = mine
    waits = [f"{m} from rank {q}" for (channel, k), (m, q) in zip(recvs, rnd.recvs)
             if k >= len(posted["send"][channel])]
    waits += [f"rank {q} to receive {m}" for (channel, j), (m, q) in zip(sends, rnd.sends)
              if j >= len(posted["recv"][channel])]
    return f"{at} waits for " + " and ".join(waits)


def simulate(name: str, pp: int, vpp: int, micro_batches: int, duration: Callable[[Action], float] = unit_time,
             forwards_only: bool = False, coalesced: bool = False, lockstep: Optional[bool] = None) -> Timeline:
    """Simulate the named schedule on all pp ranks; the result prints as a per-rank timeline. lockstep: run the
    lockstep plan (plan_lockstep) rather than the per-rank one (rounds_of); by default where `coalesced`, as
    plan_rank does."""
    rounds = plan_pipeline(name, pp, vpp, micro_batches, not forwards_only, coalesced if lockstep is None else lockstep)
    return Timeline(name, pp, vpp, micro_batches, simulate_rounds(rounds, duration, coalesced))


def plan_rank(name: str, pp: int, vpp: int, micro_batches: int, rank: int, backward: bool = True,
              coalesced: bool = False) -> list[Round]:
    """This rank's rounds under the named schedule, once the simulation has proved the whole pipeline's plan for
    this backend's p2p semantics. coalesced (a batch completes as a whole, as on NCCL): the lockstep plan."""
    return list(_proved(name, pp, vpp, micro_batches, backward, coalesced)[rank])


@functools.lru_cache(maxsize=256)
def _proved(name: str, pp: int, vpp: int, micro_batches: int, backward: bool,
            coalesced: bool) -> tuple[tuple[Round, ...], ...]:
    rounds = plan_pipeline(name, pp, vpp, micro_batches, backward, lockstep=coalesced)
    simulate_rounds(rounds, coalesced=coalesced)  # raises PipelineHangError
    return tuple(tuple(rank) for rank in rounds)
