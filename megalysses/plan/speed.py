"""Step time of a run config on a device: the FLOPs megalysses.metrics counts at the device's measured rates, the
elementwise traffic at its memory bandwidth, and each layout's exposed communication, pipeline bubble, recompute
and host copies. Predicts tokens/s and MFU."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Union

import yaml

from megalysses.config import RunConfig
from megalysses.metrics import flops_per_token, forward_flops_per_token, recomputed_forwards
from megalysses.parallel.layout import AXES, ParallelLayout
from megalysses.parallel.pipeline.schedules import ideal_bubble_fraction

from .activations import Shapes
from .memory import activation_dtype_bytes, offload_optimizer
from .state import MOMENT_BYTES, FP32, StateBytes

RATES_FILE = Path(__file__).with_name("rates.yaml")
ATTENTION_BACKWARD = 2.5
"""Attention backward FLOPs / forward FLOPs, the convention the attention rates were measured in."""
OVERLAPPED_BACKWARD = 0.8
"""Share of the backward compute that bucketed / FSDP gradient collectives can hide under."""


@functools.lru_cache(maxsize=None)
def device_rates(device: str) -> Mapping[str, object]:
    """The rates of a device ('h200', 'h100') from rates.yaml: name -> value (a number or a size -> rate table)."""
    table = yaml.safe_load(RATES_FILE.read_text())
    if device not in table:
        raise ValueError(f"device {device!r}: no rates in {RATES_FILE}; known: {', '.join(table)}")
    return {k: v if "value" not in v else v["value"] for k, v in _flatten(table[device]).items()}


def _flatten(section: dict) -> dict:
    out = {}
    for key, value in section.items():
        if isinstance(value, dict) and "value" not in value:
            out.update({f"{key}.{k}": v for k, v in _flatten(value).items()})
        else:
            out[key] = value
    return out


def rate_sources(device: str) -> dict[str, str]:
    """Where each rate of a device comes from (its provenance line in rates.yaml)."""
    table = _flatten(yaml.safe_load(RATES_FILE.read_text())[device])
    return {k: v.get("source", "") for k, v in table.items()}


def interpolate(table: Union[float, Mapping[int, float]], size: float) -> float:
    """A rate that depends on a size (message bytes, head_dim): the nearest measured point at or below it, else the
    smallest."""
    if not isinstance(table, Mapping):
        return float(table)
    points = sorted((int(k), float(v)) for k, v in table.items())
    below = [v for k, v in points if k <= size]
    return below[-1] if below else points[0][1]


def crosses_nodes(layout: ParallelLayout, axes: tuple[str, ...], gpus_per_node: int) -> bool:
    """Whether a group over `axes` spans several nodes: the mesh is (pp, dp, ring, sp, tp), tp innermost."""
    sizes = dict(zip(AXES, layout.shape))
    inner = AXES.index(min(axes, key=AXES.index))
    span = 1
    for axis in AXES[inner:]:
        span *= sizes[axis]
    return span > gpus_per_node


@dataclass(frozen=True)
class StepTime:
    """Seconds of one optimizer step by part, tokens/s per device and MFU."""

    parts: dict[str, float]
    tokens_per_step: int
    world: int
    model_flops: float
    peak_tflops: float

    @property
    def seconds(self) -> float:
        return sum(self.parts.values())

    @property
    def tokens_per_s(self) -> float:
        """Per device."""
        return self.tokens_per_step / self.seconds / self.world

    @property
    def mfu(self) -> float:
        return self.model_flops / self.seconds / self.world / (self.peak_tflops * 1e12)


class _Comm:
    """Collective times on this layout: NVLink rates inside a node, the network across nodes."""

    def __init__(self, layout: ParallelLayout, rates: Mapping):
        self.layout, self.rates = layout, rates
        self.per_node = int(rates["gpus_per_node"])

    def _bw(self, table: str, axes: tuple[str, ...], nbytes: float) -> float:
        if crosses_nodes(self.layout, axes, self.per_node):
            return float(self.rates["inter_node_gbps"]) * 1e9
        return interpolate(self.rates[table], nbytes) * 1e9

    def all_to_all(self, nbytes: float, axes=("sp",)) -> float:
        n = self._size(axes)
        return 0.0 if n == 1 else nbytes * (n - 1) / n / self._bw("all_to_all_gbps", axes, nbytes)

    def all_reduce(self, nbytes: float, axes: tuple[str, ...]) -> float:
        n = self._size(axes)
        return 0.0 if n == 1 else 2 * nbytes * (n - 1) / n / self._bw("all_reduce_gbps", axes, nbytes)

    def send(self, nbytes: float, axes: tuple[str, ...]) -> float:
        """A point-to-point send to a neighbour (the stage boundary's activations and their gradients)."""
        return nbytes / self._bw("all_reduce_gbps", axes, nbytes)

    def gather_or_scatter(self, nbytes: float, axes: tuple[str, ...]) -> float:
        """An all-gather or reduce-scatter whose whole (unsharded) buffer is nbytes."""
        return self.all_reduce(nbytes, axes) / 2

    def _size(self, axes) -> int:
        sizes = dict(zip(AXES, self.layout.shape))
        out = 1
        for a in axes:
            out *= sizes[a]
        return out


def step_time(cfg: RunConfig, layout: ParallelLayout, state: StateBytes, device: str = "h200") -> StepTime:
    """Predicted step time of cfg (memory resolved) on `layout` (dp resolved) with this rank's model state."""
    rates = device_rates(device)
    m, t, memory = cfg.model, cfg.train, cfg.memory
    comm = _Comm(layout, rates)
    act = activation_dtype_bytes(cfg)
    world = layout.tp * layout.sp * layout.ring * layout.pp * layout.dp
    seq = -(-t.seq_len // layout.sequence_unit) * layout.sequence_unit
    micro = t.global_batch_size // (t.micro_batch_size * layout.dp)
    shapes = Shapes(m, layout, t.micro_batch_size, seq, act, eager=False)
    tokens = shapes.tokens  # per micro-batch on this rank (sequence-sharded)
    stage = 1 / layout.pp  # share of the layers on one pipeline rank (even split)
    fwd, redo = forward_flops_per_token(m, seq), recomputed_forwards(memory)
    mm = tokens / layout.tp * ((fwd["attn_proj"] + fwd["mlp"]) * stage * 3 + fwd["head"] * 3 / layout.pp
                               + (fwd["attn_proj"] * redo["attn_proj"] + fwd["mlp"] * redo["mlp"]) * stage
                               + fwd["head"] * redo["head"] / layout.pp)
    attn_rate = interpolate(rates[f"attention_tflops.{_core(m)}"], m.head_dim) * 1e12
    core = tokens / layout.tp * fwd["attn_core"] * stage * (1 + ATTENTION_BACKWARD + redo["attn_core"])
    compute = mm / (float(rates["matmul_tflops"]) * 1e12) + core / attn_rate
    layers = m.num_layers * stage
    elementwise = _elementwise_bytes(shapes, memory, layers, layout) / (float(rates["elementwise_gbps"]) * 1e9)
    per_micro = {"matmuls + attention": compute, "elementwise": elementwise,
                 "Ulysses all-to-all": _ulysses(shapes, memory, layers, comm,
                                                float(rates["elementwise_gbps"]) * 1e9),
                 "tensor-parallel collectives": _tensor_parallel(shapes, memory, layers, comm)}
    parts = {k: v * micro for k, v in per_micro.items()}
    busy = sum(parts.values())
    parts["pipeline bubble"] = busy * ideal_bubble_fraction(layout.schedule, layout.pp, layout.vpp, micro) \
        if layout.pp > 1 else 0.0
    parts["pipeline p2p"] = micro * layout.vpp * comm.send(2 * shapes.sizes()["x"], ("pp",)) if layout.pp > 1 else 0.0
    params = state.params / act if state.params else (state.host_params / FP32)
    parts["gradient accumulation"] = micro * params * (act + 2 * FP32) / (float(rates["elementwise_gbps"]) * 1e9)
    parts["data-parallel sync (exposed)"] = _data_parallel(state, layout, comm, busy * 2 / 3)
    parts["optimizer"] = _optimizer(state, cfg, rates, busy / 3)
    parts["activation offload (exposed)"] = _offload(shapes, memory, layers, rates, busy, micro)
    tokens_step = t.global_batch_size * seq
    model = flops_per_token(m, seq) * tokens_step
    return StepTime(parts, tokens_step, world, model, float(rates["peak_tflops"]))


def _core(m) -> str:
    return "flash" if m.attention_core == "auto" else m.attention_core


def _elementwise_bytes(shapes: Shapes, memory, layers: float, layout: ParallelLayout) -> float:
    """Bytes the memory-bound kernels move per micro-batch: every activation a block makes written once and read
    about twice (forward, backward), again for each recomputed part; the logits' passes of the loss."""
    s = shapes.sizes()
    block = sum(s[n] for n in shapes.attention_saves() | shapes.mlp_saves())
    redo = recomputed_forwards(memory)
    passes = 3 + (redo["mlp"] + redo["attn_proj"]) / 2
    vocab = -(-shapes.model.vocab_size // layout.tp)
    logits = shapes.tokens * vocab * shapes.act * (4 + 2 * redo["head"]) / layout.pp
    return block * passes * layers + logits


def _ulysses(shapes: Shapes, memory, layers: float, comm: _Comm, copy_bytes_per_s: float) -> float:
    """All-to-alls per micro-batch: q, k, v and the output, forward and backward (full recompute re-runs the forward
    ones), each with its pack and unpack copies (a read and a write of the buffer each: about as long as NCCL itself
    at 32K, scripts/BENCH_NOTES.md)."""
    if shapes.layout.sp == 1:
        return 0.0
    s = shapes.sizes()
    qkv, out = s["core.q"] + s["core.k"] + s["core.v"], s["attn.output"]
    passes = 2 + (1 if memory.recompute == "full" else 0)
    copies = 4 * (qkv + out) / copy_bytes_per_s
    return layers * passes * (comm.all_to_all(qkv) + comm.all_to_all(out) + copies)


def _tensor_parallel(shapes: Shapes, memory, layers: float, comm: _Comm) -> float:
    """Two all-reduces (or gather + reduce-scatter pairs under tp_sequence_parallel) per block forward and two in
    backward; recompute of the projections re-runs the forward ones."""
    if shapes.layout.tp == 1:
        return 0.0
    size = shapes.tokens * shapes.model.hidden_size * shapes.act
    one = comm.all_reduce(size, ("tp",))
    redo = recomputed_forwards(memory)["attn_proj"]
    return layers * 2 * (2 + redo) * one


def _data_parallel(state: StateBytes, layout: ParallelLayout, comm: _Comm, backward: float) -> float:
    """Exposed gradient reduction: what the backward cannot hide, and at least the last bucket's; under ZeRO-1 the
    parameter all-gather after the step; under ZeRO-3 the per-unit gathers and reduce-scatters beyond the compute."""
    axes = ("dp", "ring", "sp")
    if layout.zero == 3:
        params = (state.params or state.host_params) // FP32  # sharded elements
        total = params * comm._size(axes)
        traffic = comm.gather_or_scatter(total * 2, axes) * 2 + comm.gather_or_scatter(total * FP32, axes)
        return max(0.0, traffic - backward * OVERLAPPED_BACKWARD * 1.5)
    grads = state.main_grads
    reduce = comm.gather_or_scatter(grads, axes) if layout.zero == 1 else comm.all_reduce(grads, axes)
    last = comm.all_reduce(state.largest_bucket * FP32, axes)
    exposed = max(last, reduce - backward * OVERLAPPED_BACKWARD)
    if layout.zero == 1:
        exposed += comm.gather_or_scatter(state.params, axes)
    return exposed


def _optimizer(state: StateBytes, cfg: RunConfig, rates: Mapping, forward: float) -> float:
    """AdamW over the owned elements (memory-bound: masters, moments, gradients read and written); with the optimizer
    state offloaded, its host round trip beyond the next forward it overlaps (the step is deferred bucket by bucket,
    parallel/dp/zero.py)."""
    owned = (state.masters + state.host_masters) // FP32 or (state.moments + state.host_moments) // MOMENT_BYTES
    hbm = float(rates["elementwise_gbps"]) * 1e9
    update = owned * (2 * FP32 + 2 * MOMENT_BYTES + FP32 + activation_dtype_bytes(cfg)) / hbm
    if offload_optimizer(cfg):
        copies = owned * 2 * (FP32 + MOMENT_BYTES) / (float(rates["host_copy_gbps"]) * 1e9)
        update += max(0.0, copies - forward)
    return update


def _offload(shapes: Shapes, memory, layers: float, rates: Mapping, busy: float, micro: int) -> float:
    """Activation copies: to the host on a side stream during the forward (hidden up to the forward's share of the
    compute), back on the compute stream in backward (models/memory.py's unpack hook: exposed)."""
    if not memory.offload_activations:
        return 0.0
    from .activations import block_memory

    share = 1.0 if not memory.offload_layers else min(1.0, memory.offload_layers / shapes.model.num_layers)
    seconds = (sum(block_memory(shapes, memory).host.values()) * layers * share * micro
               / (float(rates["host_copy_gbps"]) * 1e9))
    return seconds + max(0.0, seconds - busy / 3)
