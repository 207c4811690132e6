"""Choosing settings: the fastest memory savers predicted to fit (memory.* = 'auto'), a ranked table of layouts and
savers for a GPU count, the longest sequence that fits, and the nearest setting that fits a refused config."""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from typing import Iterator, Optional

from megalysses.config import ConfigError, RunConfig
from megalysses.models.config import AUTO, MemoryConfig
from megalysses.parallel.layout import LayoutError, ParallelLayout

from .memory import GIB, MemoryPlan, plan_memory
from .speed import StepTime, step_time

RECOMPUTE_CHOICES = ("none", "selective", "around_core", "full")
MLP_TILE_CHOICES = (1, 4, 16)
LOSS_TILE_CHOICES = (1, 8, 32)
SPEED_TIE = 0.02
"""Choices predicted within 2% of the fastest count as equally fast: the one using the least memory is taken (the
predictions are not exact, and headroom keeps a run from failing on an estimate)."""


@dataclass(frozen=True)
class Capacity:
    """What one rank may use: device bytes and host bytes (None: unchecked), and the device whose rates apply."""

    device_bytes: Optional[int]
    host_bytes: Optional[int]
    device: str = "h200"
    ranks_per_host: int = 1
    label: str = ""
    """What the capacity is, when not a GPU of `device` (e.g. the host RAM of a CPU run)."""
    host_is_device: bool = False
    """A CPU run: what is 'offloaded' stays in the same RAM as everything else."""

    def describe(self) -> str:
        host = f", host {self.host_bytes / GIB:.0f} GiB per rank" if self.host_bytes else ""
        dev = f"{self.device_bytes / GIB:.1f} GiB usable per rank" if self.device_bytes else "unchecked"
        return f"{self.label or self.device}: device {dev}{host}"


@dataclass(frozen=True)
class Candidate:
    """One setting with its predicted memory and speed."""

    cfg: RunConfig
    layout: ParallelLayout
    memory_plan: MemoryPlan
    time: StepTime

    @property
    def fits(self) -> bool:
        return self.memory_plan.fits()


def evaluate(cfg: RunConfig, world: int, capacity: Capacity) -> Candidate:
    """Memory and speed of a concrete config (no 'auto' left) on `world` ranks."""
    layout = cfg.layout.resolve(world) if cfg.layout.dp is None else cfg.layout
    plan = plan_memory(dataclasses.replace(cfg, layout=layout), world, capacity.device_bytes, capacity.host_bytes,
                       host_is_device=capacity.host_is_device)
    return Candidate(cfg, layout, plan, step_time(cfg, layout, plan.state, capacity.device))


def saver_choices(memory: MemoryConfig, local_tokens: int) -> Iterator[MemoryConfig]:
    """Every concrete MemoryConfig agreeing with memory's non-'auto' keys (tiles no more than the local tokens; the
    offloading ones keep memory.offload_layers)."""
    pick = lambda key, options: [getattr(memory, key)] if getattr(memory, key) != AUTO else list(options)
    for recompute, offload, mlp, loss, fused in itertools.product(
            pick("recompute", RECOMPUTE_CHOICES), pick("offload_activations", (False, True)),
            pick("mlp_tiles", MLP_TILE_CHOICES), pick("loss_tiles", LOSS_TILE_CHOICES), pick("fused_loss", (False, True))):
        if offload and recompute == "none":
            continue
        if max(mlp, loss) > max(1, local_tokens):
            continue
        if fused and memory.loss_tiles == AUTO and loss > 1:  # fused: loss_tiles counts chunks; 1 sizes them itself
            continue
        yield MemoryConfig(recompute=recompute, offload_activations=offload, mlp_tiles=mlp, loss_tiles=loss,
                           fused_loss=fused, offload_layers=memory.offload_layers if offload else 0)


def best_savers(cfg: RunConfig, world: int, capacity: Capacity) -> tuple[Optional[Candidate], list[Candidate]]:
    """The fastest concrete savers for cfg's layout predicted to fit (None if none fits), and every one tried."""
    layout = cfg.layout.resolve(world) if cfg.layout.dp is None else cfg.layout
    tokens = cfg.train.micro_batch_size * cfg.train.seq_len // (layout.sp * layout.ring)
    tried = [evaluate(dataclasses.replace(cfg, memory=m), world, capacity) for m in saver_choices(cfg.memory, tokens)]
    fitting = [c for c in tried if c.fits]
    if not fitting:
        return None, tried
    fastest = min(c.time.seconds for c in fitting)  # near-ties go to the one that leaves the most memory free
    return min((c for c in fitting if c.time.seconds <= fastest * (1 + SPEED_TIE)),
               key=lambda c: c.memory_plan.device_total), tried


def describe_memory(memory: MemoryConfig) -> str:
    return (f"recompute={memory.recompute} offload_activations={str(memory.offload_activations).lower()} "
            f"mlp_tiles={memory.mlp_tiles} loss_tiles={memory.loss_tiles} "
            f"fused_loss={str(memory.fused_loss).lower()}")


def resolve_auto(cfg: RunConfig, world: int, capacity: Capacity, require_fit: bool = True) -> tuple[RunConfig, str]:
    """cfg with every memory 'auto' replaced by the fastest choice predicted to fit, and why; cfg itself (and '')
    when nothing is 'auto'. When no choice fits: ConfigError, or with require_fit=False the smallest choice."""
    keys = cfg.memory.auto_keys()
    if not keys:
        return cfg, ""
    best, tried = best_savers(cfg, world, capacity)
    if best is None:
        smallest = min(tried, key=lambda c: c.memory_plan.device_total)
        if not require_fit:
            return smallest.cfg, (f"memory: {describe_memory(smallest.cfg.memory)}: no choice is predicted to fit "
                                  f"{capacity.describe()}; the smallest ({smallest.memory_plan.device_total / GIB:.1f}"
                                  " GiB) is taken")
        raise ConfigError(f"memory {', '.join(keys)} = auto: no choice fits {capacity.describe()}; the smallest, "
                          f"{describe_memory(smallest.cfg.memory)}, needs:\n{smallest.memory_plan.breakdown()}\n"
                          f"{nearest_fit(cfg, world, capacity)}\n(--skip-memory-check starts it anyway)")
    faster = sorted((c for c in tried if c.time.seconds < best.time.seconds and not c.fits),
                    key=lambda c: c.time.seconds)
    why = (f"the fastest predicted to fit ({best.memory_plan.device_total / GIB:.1f} GiB of "
           f"{capacity.device_bytes / GIB:.1f} GiB, {best.time.tokens_per_s:,.0f} tokens/s per device, "
           f"MFU {best.time.mfu:.1%})") if capacity.device_bytes else "the fastest predicted"
    if faster:
        why += (f"; faster but too large: {describe_memory(faster[0].cfg.memory)} "
                f"({faster[0].memory_plan.device_total / GIB:.1f} GiB)")
    return best.cfg, f"memory: {describe_memory(best.cfg.memory)}: {why}"


def check_fits(cfg: RunConfig, world: int, capacity: Capacity) -> Candidate:
    """The evaluated config; raises ConfigError with the breakdown and the nearest setting that fits when the
    predicted memory exceeds the capacity."""
    candidate = evaluate(cfg, world, capacity)
    if not candidate.fits:
        raise ConfigError(f"the run does not fit: predicted per rank on {world} ranks ({capacity.describe()}):\n"
                          f"{candidate.memory_plan.breakdown()}\n{nearest_fit(cfg, world, capacity)}\n"
                          "(--skip-memory-check starts it anyway)")
    return candidate


def nearest_fit(cfg: RunConfig, world: int, capacity: Capacity) -> str:
    """The closest change that is predicted to fit: other savers, else a shorter sequence, else another layout."""
    auto = dataclasses.replace(cfg, memory=MemoryConfig(*(AUTO,) * 5))
    best, _ = best_savers(auto, world, capacity)
    if best is not None and best.cfg.memory != cfg.memory:
        return (f"nearest setting that fits: {_overrides(best.cfg.memory)} (predicted "
                f"{best.memory_plan.device_total / GIB:.1f} GiB, {best.time.tokens_per_s:,.0f} tokens/s per device; "
                "memory.*=auto picks it at start)")
    longest = longest_sequence(auto, world, capacity)
    layouts = [c for c in search(cfg, world, capacity, top=50) if c.fits]
    hints = []
    if longest:
        hints.append(f"train.seq_len={longest} (the longest that fits this layout)")
    if layouts:
        hints.append(f"{_layout_overrides(layouts[0].layout)} {_overrides(layouts[0].cfg.memory)} (the fastest layout "
                     f"that fits {world} ranks)")
    if not hints:
        return "nothing tried fits: more ranks (a larger layout.zero / sp / tp / pp) or a smaller model"
    return "nearest settings that fit: " + "; or ".join(hints)


def _overrides(memory: MemoryConfig) -> str:
    return " ".join(f"memory.{k}={str(v).lower()}" for k, v in dataclasses.asdict(memory).items())


def _layout_overrides(layout: ParallelLayout) -> str:
    return " ".join(f"layout.{k}={getattr(layout, k)}" for k in ("tp", "sp", "pp", "zero"))


def longest_sequence(cfg: RunConfig, world: int, capacity: Capacity, limit: int = 1 << 23) -> Optional[int]:
    """The longest train.seq_len (a multiple of the sequence unit and of 1024) predicted to fit with the best savers
    for cfg's memory keys; None if not even 1024 tokens fit."""
    layout = cfg.layout.resolve(world) if cfg.layout.dp is None else cfg.layout
    unit = layout.sequence_unit * 1024 // _gcd(layout.sequence_unit, 1024)

    def fits(seq: int) -> bool:
        trial = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seq_len=seq),
                                    model=dataclasses.replace(cfg.model, max_seq_len=max(seq, cfg.model.max_seq_len)))
        return best_savers(trial, world, capacity)[0] is not None

    if not fits(unit):
        return None
    lo, hi = 1, 2
    while hi * unit <= limit and fits(hi * unit):
        lo, hi = hi, hi * 2
    while hi - lo > 1 and hi * unit <= limit * 2:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid * unit) else (lo, mid)
    return lo * unit


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


def candidate_layouts(cfg: RunConfig, world: int, gpus_per_node: int = 8) -> Iterator[ParallelLayout]:
    """Layouts of `world` ranks valid for the model and batch: tp inside a node (with and without tp sequence
    parallelism), Ulysses sp, pp, dp, ZeRO 0/1/3 (ring attention and interleaved schedules are not searched)."""
    m, t = cfg.model, cfg.train
    divisors = [d for d in range(1, world + 1) if world % d == 0]
    for tp, sp, pp in itertools.product(divisors, divisors, divisors):
        if tp > gpus_per_node or world % (tp * sp * pp):
            continue
        dp = world // (tp * sp * pp)
        for zero, tp_sp in itertools.product((0, 1, 3), (False, True) if tp > 1 else (False,)):
            if zero == 3 and pp > 1:
                continue
            try:
                layout = ParallelLayout(tp=tp, sp=sp, pp=pp, dp=dp, zero=zero, tp_sequence_parallel=tp_sp)
                trial = dataclasses.replace(cfg, layout=layout)
                trial.check(world)
            except (LayoutError, ConfigError):
                continue
            if t.global_batch_size % (t.micro_batch_size * dp):
                continue
            yield layout


def search(cfg: RunConfig, world: int, capacity: Capacity, top: int = 20) -> list[Candidate]:
    """Candidate layouts x savers for `world` ranks, the best savers per layout, ranked: fitting ones by predicted
    tokens/s, then the ones that do not fit by memory."""
    auto = dataclasses.replace(cfg, memory=MemoryConfig(*(AUTO,) * 5))
    rows = []
    for layout in candidate_layouts(cfg, world):
        trial = dataclasses.replace(auto, layout=layout)
        best, tried = best_savers(trial, world, capacity)
        rows.append(best or min(tried, key=lambda c: c.memory_plan.device_total))
    rows.sort(key=lambda c: (not c.fits, -c.time.tokens_per_s if c.fits else c.memory_plan.device_total))
    return rows[:top]
