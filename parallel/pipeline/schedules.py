"""Pipeline schedules as pure functions: (pp, vpp, micro_batches, rank) -> this rank's ordered list of actions.

A rank holds `vpp` model chunks; chunk c of rank r is virtual stage c * pp + r (Megatron's interleaved assignment),
so activations travel r -> r + 1 -> ... -> pp - 1 -> 0 (next chunk) -> ... and gradients the reverse way.
Communication is not part of a schedule: `plan.py` derives it from the actions of every rank.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from ..layout import SCHEDULES as SCHEDULE_NAMES
from ..layout import LayoutError


class ScheduleError(LayoutError):
    """A schedule that cannot run with these numbers; the message names them, the rule and a valid alternative."""


@dataclass(frozen=True)
class Action:
    """One compute step of a rank: forward ('F') or backward ('B') of micro-batch `mb` through local `chunk`."""

    kind: str  # 'F' or 'B'
    chunk: int
    mb: int

    def label(self, vpp: int = 1) -> str:
        """'F3' (one chunk per rank) or 'F3.1' (micro-batch 3 through chunk 1)."""
        return f"{self.kind}{self.mb}" + (f".{self.chunk}" if vpp > 1 else "")


def forward(chunk: int, mb: int) -> Action:
    return Action("F", chunk, mb)


def backward(chunk: int, mb: int) -> Action:
    return Action("B", chunk, mb)


def gpipe(pp: int, vpp: int, micro_batches: int, rank: int) -> list[Action]:
    """GPipe: every micro-batch forward, then every micro-batch backward (activations of all m stay alive)."""
    _check_common("gpipe", pp, vpp, micro_batches, rank)
    return ([forward(0, mb) for mb in range(micro_batches)] +
            [backward(0, mb) for mb in range(micro_batches)])


def one_f_one_b(pp: int, vpp: int, micro_batches: int, rank: int) -> list[Action]:
    """1F1B (PipeDream-Flush): pp - rank - 1 warm-up forwards, then one forward / one backward, then the
    remaining backwards; at most pp - rank micro-batches in flight."""
    _check_common("1f1b", pp, vpp, micro_batches, rank)
    warmup = min(pp - rank - 1, micro_batches)
    return _warmup_steady_cooldown([forward(0, mb) for mb in range(micro_batches)],
                                   [backward(0, mb) for mb in range(micro_batches)], warmup)


def interleaved_1f1b(pp: int, vpp: int, micro_batches: int, rank: int) -> list[Action]:
    """Interleaved 1F1B (Megatron, Narayanan et al. 2021): micro-batches go through the chunks in groups of pp;
    2 (pp - rank - 1) + (vpp - 1) pp warm-up forwards, then 1F1B over (chunk, micro-batch) pairs."""
    _check_common("interleaved-1f1b", pp, vpp, micro_batches, rank)
    if vpp == 1:
        return one_f_one_b(pp, 1, micro_batches, rank)
    total = vpp * micro_batches

    def step(k: int, reverse: bool) -> tuple[int, int]:  # k-th forward (or backward) -> (chunk, micro-batch)
        group, within = divmod(k, pp * vpp)
        chunk = within // pp
        return (vpp - 1 - chunk if reverse else chunk), group * pp + within % pp

    warmup = min(2 * (pp - rank - 1) + (vpp - 1) * pp, total)
    return _warmup_steady_cooldown([forward(*step(k, False)) for k in range(total)],
                                   [backward(*step(k, True)) for k in range(total)], warmup)


def _warmup_steady_cooldown(forwards: list[Action], backwards: list[Action], warmup: int) -> list[Action]:
    """`warmup` forwards, then alternate forward / backward while forwards remain, then the rest of the backwards."""
    out = forwards[:warmup]
    for f, b in zip(forwards[warmup:], backwards):
        out += [f, b]
    return out + backwards[len(forwards) - warmup:]


SCHEDULES: dict[str, Callable[[int, int, int, int], list[Action]]] = {
    "gpipe": gpipe, "1f1b": one_f_one_b, "interleaved-1f1b": interleaved_1f1b}
"""The implementation of each schedule name of the layout (parallel.layout.Schedule, the one list of names)."""
if set(SCHEDULES) != set(SCHEDULE_NAMES):  # pragma: no cover - a name added on one side only
    raise ImportError(f"schedules implemented {sorted(SCHEDULES)} differ from the layout's {sorted(SCHEDULE_NAMES)}")


def schedule_actions(name: str, pp: int, vpp: int, micro_batches: int, rank: int) -> list[Action]:
    """The actions of pipeline rank `rank` under the named schedule."""
    if name not in SCHEDULES:
        raise ScheduleError(f"pipeline schedule {name!r} is unknown: choose one of {', '.join(SCHEDULES)}")
    return SCHEDULES[name](pp, vpp, micro_batches, rank)


def forward_only(actions: list[Action]) -> list[Action]:
    """The forwards of a schedule, in order (evaluation: same communication order, no backward)."""
    return [a for a in actions if a.kind == "F"]


def ideal_bubble_fraction(name: str, pp: int, vpp: int, micro_batches: int) -> float:
    """Idle time / compute time per rank with free communication: (pp - 1) / m, or (pp - 1) / (vpp m) interleaved."""
    return (pp - 1) / ((vpp if name == "interleaved-1f1b" else 1) * micro_batches)


def micro_batch_count(global_batch: int, micro_batch_size: int, dp: int, configured: Optional[int] = None) -> int:
    """Micro-batches per step per pipeline: global_batch / (micro_batch_size * dp); checks a configured count."""
    per_step = micro_batch_size * dp
    if global_batch % per_step:
        raise ScheduleError(
            f"global batch {global_batch} is not divisible by micro_batch_size * dp = {micro_batch_size} * {dp} = "
            f"{per_step}; use a global batch that is a multiple of {per_step} (e.g. {max(1, global_batch // per_step) * per_step})")
    count = global_batch // per_step
    if configured is not None and configured != count:
        raise ScheduleError(
            f"layout.micro_batches = {configured} but global batch {global_batch} / (micro_batch_size {micro_batch_size} "
            f"* dp {dp}) gives {count} micro-batches; set layout.micro_batches={count} or leave it unset")
    return count


def _check_common(name: str, pp: int, vpp: int, micro_batches: int, rank: int) -> None:
    for what, value in (("pp", pp), ("vpp", vpp), ("micro_batches", micro_batches)):
        if not isinstance(value, int) or value < 1:
            raise ScheduleError(f"{name}: {what} = {value!r} must be an integer >= 1")
    if not 0 <= rank < pp:
        raise ScheduleError(f"{name}: pipeline rank {rank} is outside 0..{pp - 1} (pp = {pp})")
    if name != "interleaved-1f1b" and vpp != 1:
        raise ScheduleError(f"schedule {name!r} runs one chunk per rank but vpp = {vpp}; "
                            "use schedule 'interleaved-1f1b' for virtual stages, or vpp = 1")
    if name == "interleaved-1f1b" and vpp > 1:
        if pp == 1:
            raise ScheduleError(f"interleaved-1f1b with vpp = {vpp} needs pp >= 2 (with pp = 1 there is no pipeline "
                                "to interleave); use vpp = 1, or pp >= 2")
        if micro_batches % pp:
            near = max(pp, micro_batches // pp * pp)
            raise ScheduleError(
                f"interleaved-1f1b runs micro-batches in groups of pp: micro_batches = {micro_batches} is not a "
                f"multiple of pp = {pp}; use a multiple such as {near} or {near + pp} (micro_batches = global batch / "
                f"(micro_batch_size * dp)), or vpp = 1")
