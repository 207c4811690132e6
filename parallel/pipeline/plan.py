"""Communication plan: what each action receives before it runs and sends after, derived from the actions alone,
and the rounds a rank runs them in: one batch of sends and receives, then at most one action.

Both ends of every message are derived from the same rule, so sender and receiver agree on it; `simulate.py`
checks that every (src, dst) channel also carries its messages in the order the receiver asks for them (gloo and
NCCL match point-to-point messages per channel in posting order; NCCL ignores tags).

Two ways to cut steps into rounds. `rounds_of` (gloo, where each send completes on its own): round i sends step
i - 1's output and receives step i's input. `plan_lockstep` (NCCL, where a batch completes only as a whole): every
rank runs the same rounds, and a message is sent and received in the same round on both ends, so a rank's k-th
batch pairs only with its neighbours' k-th batches and no batch can wait on a later one (Megatron's rounds).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .schedules import Action, ScheduleError, forward_only, schedule_actions


class PipelineHangError(ScheduleError):
    """A schedule that would deadlock, or leave a message unmatched or matched to the wrong receive."""


@dataclass(frozen=True)
class Message:
    """An activation ('act') into virtual stage `stage`'s forward, or a gradient ('grad') into its backward."""

    kind: str  # 'act' or 'grad'
    stage: int  # the receiving virtual stage
    mb: int


@dataclass(frozen=True)
class Step:
    """An action with its communication: receive `recv` from pipeline rank `src` first, send `send` to `dst` after."""

    action: Action
    stage: int  # virtual stage = chunk * pp + rank
    recv: Optional[Message] = None
    src: Optional[int] = None
    send: Optional[Message] = None
    dst: Optional[int] = None


@dataclass(frozen=True)
class Round:
    """One batch of p2p ops, then at most one step. sends: (message, destination rank), outputs of earlier steps;
    recvs: (message, source rank), kept until the step that consumes them."""

    sends: tuple[tuple[Message, int], ...] = ()
    recvs: tuple[tuple[Message, int], ...] = ()
    step: Optional[Step] = None


def virtual_stage(chunk: int, rank: int, pp: int) -> int:
    """Megatron's interleaved assignment: chunk c of pipeline rank r is virtual stage c * pp + r."""
    return chunk * pp + rank


def plan_steps(actions: list[Action], rank: int, pp: int, vpp: int) -> list[Step]:
    """Attach to each action its incoming and outgoing message (none at the pipeline's two ends)."""
    last = pp * vpp - 1
    steps = []
    for a in actions:
        v = virtual_stage(a.chunk, rank, pp)
        if a.kind == "F":  # activation in from v - 1, out to v + 1
            recv = Message("act", v, a.mb) if v > 0 else None
            send = Message("act", v + 1, a.mb) if v < last else None
            src, dst = (v - 1) % pp, (v + 1) % pp
        else:  # gradient in from v + 1, out to v - 1
            recv = Message("grad", v, a.mb) if v < last else None
            send = Message("grad", v - 1, a.mb) if v > 0 else None
            src, dst = (v + 1) % pp, (v - 1) % pp
        steps.append(Step(a, v, recv, src if recv else None, send, dst if send else None))
    return steps


def rounds_of(steps: list[Step]) -> list[Round]:
    """One rank's steps as rounds, each send posted with the next receive: round i sends step i - 1's output and
    receives step i's input; a last round sends the last output. Proved for gloo, not for batches that complete as
    a whole (NCCL): use plan_lockstep there."""
    rounds, before = [], None
    for step in steps + [None]:
        sends = ((before.send, before.dst),) if before is not None and before.send is not None else ()
        recvs = ((step.recv, step.src),) if step is not None and step.recv is not None else ()
        rounds.append(Round(sends, recvs, step))
        before = step
    return rounds


def plan_lockstep(steps: list[list[Step]]) -> list[list[Round]]:
    """Every rank's steps (steps[rank]) as the same number of rounds: each step runs in its unit-time slot (the
    earliest after its rank's previous step and after the step producing its input), and a message goes out, on
    both ends, in the round right after the slot that produced it. A rank's k-th batch then holds only ops whose
    other ends sit in its neighbours' k-th batch: under any timing, the batches complete round by round."""
    slots = _unit_slots(steps)
    at = [dict(zip(times, rank)) for times, rank in zip(slots, steps)]  # rank -> slot -> step
    count = 2 + max((times[-1] for times in slots if times), default=-1)  # last slot's sends go out in a round too
    plans = []
    for r in range(len(steps)):
        plan = []
        for t in range(count):
            before = at[r].get(t - 1)
            sends = ((before.send, before.dst),) if before is not None and before.send is not None else ()
            recvs = tuple((s.send, q) for q, s in enumerate(a.get(t - 1) for a in at)
                          if s is not None and s.send is not None and s.dst == r)
            plan.append(Round(sends, recvs, at[r].get(t)))
        plans.append(plan)
    return plans


def _unit_slots(steps: list[list[Step]]) -> list[list[int]]:
    """Start time of every step when each takes one unit and a message arrives the moment its step ends."""
    produced: dict[Message, int] = {}  # message -> slot of the step that sends it
    slots: list[list[int]] = [[] for _ in steps]
    progress = True
    while progress:
        progress = False
        for r, rank in enumerate(steps):
            while len(slots[r]) < len(rank):
                step = rank[len(slots[r])]
                if step.recv is not None and step.recv not in produced:
                    break  # its input comes from a step not placed yet
                slots[r].append(max([slots[r][-1] + 1 if slots[r] else 0] +
                                    ([produced[step.recv] + 1] if step.recv is not None else [])))
                if step.send is not None:
                    produced[step.send] = slots[r][-1]
                progress = True
    stuck = [f"rank {r} at {rank[len(slots[r])].action.label()}" for r, rank in enumerate(steps)
             if len(slots[r]) < len(rank)]
    if stuck:
        raise PipelineHangError("deadlock: no step can run next on " + "; ".join(stuck))
    return slots


def plan_pipeline(name: str, pp: int, vpp: int, micro_batches: int, backward: bool = True,
                  lockstep: bool = False) -> list[list[Round]]:
    """Every rank's rounds under the named schedule (unproved: simulate.plan_rank proves them before use)."""
    steps = []
    for r in range(pp):
        actions = schedule_actions(name, pp, vpp, micro_batches, r)
        steps.append(plan_steps(actions if backward else forward_only(actions), r, pp, vpp))
    return plan_lockstep(steps) if lockstep else [rounds_of(s) for s in steps]
