"""Communication plan: what each action receives before it runs and sends after, derived from the actions alone.

Both ends of every message are derived from the same rule, so sender and receiver agree on it; `simulate.py`
checks that every (src, dst) channel also carries its messages in the order the receiver asks for them (gloo and
NCCL match point-to-point messages per channel in posting order; NCCL ignores tags).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .schedules import Action


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
