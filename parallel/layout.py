"""ParallelLayout: the degrees of the mesh (pp, dp, ring, sp, tp), validated with errors that say how to fix them."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal, Optional, get_args

AXES = ("pp", "dp", "ring", "sp", "tp")  # outermost -> innermost: tp innermost keeps its traffic on the fastest links
Schedule = Literal["1f1b", "gpipe", "interleaved-1f1b"]
SCHEDULES = get_args(Schedule)  # the one list of schedule names (parallel.pipeline.schedules implements each)
ZeroLevel = Literal[0, 1, 3]
ZERO_LEVELS = get_args(ZeroLevel)


class LayoutError(ValueError):
    """An invalid parallel layout: the message names the numbers, the rule and a valid alternative."""


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def ulysses_heads(sp: int, heads: Optional[int], kv_heads: int, where: str = "", detail: str = ""
                  ) -> tuple[Optional[int], int]:
    """The Ulysses head rule, (query heads, kv heads) per SP rank inside the attention region: sp divides the query
    heads, and sp divides the kv heads or is a multiple of them (each kv head then goes to the sp / kv_heads ranks
    whose queries use it). `heads` None checks the kv heads alone; `where` says whose heads in the errors, `detail` how the query heads came about."""
    candidates = _divisors(heads) if heads is not None else range(1, 2 * sp + 1)
    ok = [d for d in candidates if kv_heads % d == 0 or d % kv_heads == 0]
    beyond = "; for more sequence parallelism than that, add layout.ring (no head rule: sp x ring shards the sequence)"
    if heads is not None and heads % sp:
        raise LayoutError(f"sp = {sp} does not divide the {heads} heads{where}{detail}; Ulysses gives each SP rank whole "
                          f"heads: use sp in {ok}{beyond}")
    if kv_heads % sp and sp % kv_heads:
        raise LayoutError(f"sp = {sp} and the {kv_heads} kv heads{where} neither divide each other; Ulysses needs sp "
                          f"to divide the kv heads, or the kv heads to divide sp (then they are replicated): use sp in "
                          f"{ok}{beyond}")
    return (None if heads is None else heads // sp), max(kv_heads, sp) // sp


@dataclass(frozen=True)
class ParallelLayout:
    """Degrees of tensor, sequence (Ulysses and ring), pipeline and data parallelism; world = tp * sp * ring * pp * dp."""

    tp: int = 1
    """Tensor-parallel degree: heads, MLP columns and vocab are split over tp ranks (innermost axis)."""
    sp: int = 1
    """Ulysses sequence-parallel degree: the sequence is split over sp ranks, heads during attention."""
    pp: int = 1
    """Pipeline-parallel degree: the layers are split into pp stages (outermost axis)."""
    dp: Optional[int] = None
    """Data-parallel degree; None infers it from the world size as world / (tp * sp * ring * pp)."""
    ring: int = 1
    """Ring attention degree: the sequence is sharded over ring ranks in the zig-zag layout (rank r holds chunks r and
    2R-1-r of 2R) and k/v blocks pass around the ring; heads need not divide it. With sp > 1 each ring shard is split
    over sp (Ulysses inside, ring across: the sequence is sharded over sp x ring, the heads only over sp)."""
    vpp: int = 1
    """Virtual pipeline stages per rank (interleaved 1F1B); 1 means no interleaving."""
    schedule: Schedule = "1f1b"
    """Pipeline schedule: '1f1b', 'gpipe' or 'interleaved-1f1b' (with pp = 1: forward and backward alternate per
    micro-batch under '1f1b', all forwards first under 'gpipe')."""
    stage_layers: Optional[list[int]] = None
    """Explicit layers per pipeline stage (length pp * vpp) for uneven models; None splits evenly."""
    tp_sequence_parallel: bool = False
    """Megatron-style sequence parallelism inside the TP group: norm / residual regions sharded over tp (not Ulysses:
    that is `sp`)."""
    zero: ZeroLevel = 0
    """Optimizer sharding over dp x ring x sp: 0 none, 1 ZeRO-1 (optimizer state), 3 full sharding (FSDP2)."""

    def __post_init__(self):
        for name in ("tp", "sp", "ring", "pp", "vpp"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise LayoutError(f"layout.{name} = {value!r}: every parallel degree must be an integer >= 1")
        if self.dp is not None and (not isinstance(self.dp, int) or isinstance(self.dp, bool) or self.dp < 1):
            raise LayoutError(f"layout.dp = {self.dp!r}: must be an integer >= 1, or null to infer it from the world size")
        if self.schedule not in SCHEDULES:
            raise LayoutError(f"layout.schedule = {self.schedule!r}: must be one of {', '.join(SCHEDULES)}")
        if self.vpp > 1 and self.schedule != "interleaved-1f1b":
            raise LayoutError(
                f"layout.vpp = {self.vpp} needs schedule 'interleaved-1f1b' (got {self.schedule!r}); "
                "set layout.schedule=interleaved-1f1b or layout.vpp=1")
        if self.zero not in ZERO_LEVELS:
            raise LayoutError(f"layout.zero = {self.zero!r}: must be 0 (off), 1 (ZeRO-1) or 3 (FSDP full sharding)")
        if self.tp_sequence_parallel and self.tp == 1:
            raise LayoutError("layout.tp_sequence_parallel = true needs tp > 1 (it shards norm regions over the TP group); "
                              "set layout.tp_sequence_parallel=false or raise tp")
        if self.stage_layers is not None and len(self.stage_layers) != self.pp * self.vpp:
            raise LayoutError(
                f"layout.stage_layers has {len(self.stage_layers)} entries but pp * vpp = {self.pp} * {self.vpp} = "
                f"{self.pp * self.vpp}: give one layer count per (virtual) stage")

    @property
    def model_parallel_size(self) -> int:
        """Ranks that hold one replica of the model: tp * sp * ring * pp."""
        return self.tp * self.sp * self.ring * self.pp

    def resolve(self, world_size: int) -> "ParallelLayout":
        """Fill in dp from the world size and check tp * sp * ring * pp * dp == world_size."""
        mp = self.model_parallel_size
        axes = ("tp", "sp", "ring", "pp") if self.ring > 1 else ("tp", "sp", "pp")  # name the ring only when used
        names, values = " * ".join(axes), " * ".join(str(getattr(self, a)) for a in axes)
        if self.dp is None:
            if world_size % mp:
                fits = [d for d in _divisors(world_size)]
                raise LayoutError(
                    f"world size {world_size} is not divisible by {names} = {values} = {mp}; "
                    f"choose degrees whose product divides {world_size} (its divisors: {fits})")
            return replace(self, dp=world_size // mp)
        if mp * self.dp != world_size:
            hint = (f"set layout.dp={world_size // mp}" if world_size % mp == 0
                    else f"choose {names} dividing {world_size}")
            raise LayoutError(
                f"{names} * dp = {values} * {self.dp} = {mp * self.dp} ranks, "
                f"but the world has {world_size}; {hint}, or leave dp unset to infer it")
        return self

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        """Mesh shape in axis order (pp, dp, ring, sp, tp); needs dp resolved."""
        if self.dp is None:
            raise LayoutError("layout.dp is not resolved yet: call layout.resolve(world_size) first")
        return (self.pp, self.dp, self.ring, self.sp, self.tp)

    def check_model(self, *, heads: int, kv_heads: int, layers: int, seq_len: Optional[int] = None) -> None:
        """Check the layout against a model: heads vs tp * sp, kv heads vs tp and sp, layers vs pp, seq vs the
        sequence-shard unit (the ring adds no head rule: heads are split over tp and sp only)."""
        tp, sp = self.tp, self.sp
        if heads % tp:
            ok = [d for d in _divisors(heads) if kv_heads % d == 0]
            raise LayoutError(f"tp = {tp} does not divide the {heads} attention heads; tp must divide both heads "
                              f"and kv heads ({kv_heads}): use tp in {ok}")
        if kv_heads % tp:
            ok = [d for d in _divisors(kv_heads) if heads % d == 0]
            raise LayoutError(f"tp = {tp} does not divide the {kv_heads} kv heads (GQA groups are never split across "
                              f"TP ranks): use tp in {ok}")
        ulysses_heads(sp, heads // tp, kv_heads // tp, " per TP rank", f" ({heads} heads / tp {tp})")
        self.check_layers(layers)
        if seq_len is not None:
            unit = self.sequence_unit
            if seq_len % unit:
                raise LayoutError(
                    f"sequence length {seq_len} is not divisible by {unit} (sp {sp}"
                    f"{f' x tp {tp} with tp_sequence_parallel' if self.tp_sequence_parallel else ''}"
                    f"{f' x 2 * ring {self.ring}: two mirrored chunks per ring rank' if self.ring > 1 else ''}); "
                    f"pad it to {-(-seq_len // unit) * unit} (the data path pads and masks the padding out of the loss)")

    @property
    def sequence_unit(self) -> int:
        """What every (padded) sequence length must divide by: sp [x tp with tp_sequence_parallel] [x 2 * ring]."""
        return (self.sp * (self.tp if self.tp_sequence_parallel else 1) * (2 * self.ring if self.ring > 1 else 1))

    def check_layers(self, layers: int) -> list[int]:
        """Layers per (virtual) stage, in stage order; raises when the stages cannot split the layers."""
        stages = self.pp * self.vpp
        if self.stage_layers is not None:
            if sum(self.stage_layers) != layers or min(self.stage_layers) < 1:
                raise LayoutError(f"layout.stage_layers = {self.stage_layers} sums to {sum(self.stage_layers)} but the "
                                  f"model has {layers} layers, and every stage needs at least one")
            return list(self.stage_layers)
        if layers % stages:
            ok = [d for d in _divisors(layers)]
            raise LayoutError(
                f"{layers} layers do not split evenly into pp * vpp = {self.pp} * {self.vpp} = {stages} stages; "
                f"use pp * vpp in {ok}, or give layout.stage_layers explicitly (e.g. "
                f"{[layers // stages + (1 if i < layers % stages else 0) for i in range(stages)]})")
        return [layers // stages] * stages

    def describe(self) -> str:
        """Short name like 'tp2-sp2-dp1' (or 'ring4')."""
        parts = [f"{a}{getattr(self, a)}" for a in ("tp", "pp", "sp", "ring", "dp") if getattr(self, a) not in (1, None)]
        return "-".join(parts) or "single"
