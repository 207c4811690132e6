"""The memory of one rank from a run config and a world size: model state plus activations at the peak of a step,
on the device and on the host, against their capacities."""
from __future__ import annotations

import dataclasses

import functools
from dataclasses import dataclass
from typing import Optional

from megalysses.config import RunConfig
from megalysses.parallel.layout import ParallelLayout
from megalysses.parallel.pipeline import stage_layer_ids
from megalysses.parallel.pipeline.schedules import schedule_actions

from .activations import INT64, Shapes, block_memory
from .state import StateBytes, state_bytes

GIB = 2**30


def offload_optimizer(cfg: RunConfig) -> bool:
    """train.offload_optimizer (False where the key does not exist yet)."""
    return bool(getattr(cfg.train, "offload_optimizer", False))


def in_flight_micro_batches(layout: ParallelLayout, micro_batches: int, pp_rank: int) -> int:
    """Most chunk forwards whose backward has not run yet on this pipeline rank, over the step's schedule (1 under
    1F1B with pp = 1; every micro-batch under GPipe; up to pp on the first stage under 1F1B)."""
    return _in_flight(layout.schedule, layout.pp, layout.vpp, micro_batches, pp_rank)


@functools.lru_cache(maxsize=4096)
def _in_flight(schedule: str, pp: int, vpp: int, micro_batches: int, pp_rank: int) -> int:
    live = peak = 0
    for action in schedule_actions(schedule, pp, vpp, micro_batches, pp_rank):
        live += 1 if action.kind == "F" else -1
        peak = max(peak, live)
    return peak


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes of one rank (the fullest pipeline rank) by term, on the device and on the host, with the capacities."""

    device: dict[str, int]
    host: dict[str, int]
    device_capacity: Optional[int]
    host_capacity: Optional[int]
    pp_rank: int
    state: StateBytes
    host_is_device: bool = False
    """A CPU run: 'device' and host memory are the same RAM, checked together against the device capacity."""

    @property
    def device_total(self) -> int:
        return sum(self.device.values())

    @property
    def host_total(self) -> int:
        return sum(self.host.values())

    def fits(self) -> bool:
        used = self.device_total + (self.host_total if self.host_is_device else 0)
        ok_device = self.device_capacity is None or used <= self.device_capacity
        return ok_device and (self.host_capacity is None or self.host_total <= self.host_capacity)

    def breakdown(self) -> str:
        """The terms as aligned lines in GiB, device then host, with totals against capacity."""
        lines = []
        for where, terms, total, cap in (("device", self.device, self.device_total, self.device_capacity),
                                         ("host", self.host, self.host_total, self.host_capacity)):
            if not terms and where == "host":
                continue
            cap_text = f" of {cap / GIB:.1f} GiB usable" if cap else ""
            used = total + (self.host_total if self.host_is_device and where == "device" else 0)
            if used != total:
                cap_text += f" (with the host terms, same RAM: {used / GIB:.2f} GiB)"
            verdict = "" if cap is None else ("  fits" if used <= cap else "  DOES NOT FIT")
            lines.append(f"  {where} per rank (pipeline rank {self.pp_rank}): {total / GIB:.2f} GiB{cap_text}{verdict}")
            for name, value in terms.items():
                if value:
                    lines.append(f"    {name:<34} {value / GIB:9.3f} GiB")
        return "\n".join(lines)


def activation_dtype_bytes(cfg: RunConfig) -> int:
    return 2 if cfg.train.dtype == "bfloat16" else 4


def _rank_plan(cfg: RunConfig, layout: ParallelLayout, pp_rank: int, eager: bool, cuda: bool) -> tuple:
    m, t, memory = cfg.model, cfg.train, cfg.memory
    act = activation_dtype_bytes(cfg)
    state = state_bytes(m, layout, act, pp_rank=pp_rank, cuda=cuda, offload_optimizer=offload_optimizer(cfg))
    shapes = Shapes(m, layout, t.micro_batch_size, _padded(t.seq_len, layout.sequence_unit), act, eager)
    block = block_memory(shapes, memory)
    kept_block = block_memory(shapes, dataclasses.replace(memory, offload_activations=False, offload_layers=0)) \
        if memory.offload_activations else block  # a layer past memory.offload_layers keeps its inputs
    layers = stage_layer_ids(layout, m.num_layers)
    chunks = [layers[c * layout.pp + pp_rank] for c in range(layout.vpp)]
    last_stage = pp_rank == layout.pp - 1
    micro = t.global_batch_size // (t.micro_batch_size * layout.dp)
    live = in_flight_micro_batches(layout, micro, pp_rank)
    layers_live = live * max(len(c) for c in chunks)  # chunk-micro-batches in flight x layers of a chunk
    sizes = shapes.sizes()
    per_mb = sizes["cos_sin"] + shapes.tokens * INT64 * 2  # shared cos / sin, ids and positions
    if layout.pp > 1:
        per_mb += 2 * sizes["x"]  # the stage's input (received) and output (kept for its backward)
    head = sum(shapes.head_saves(memory).values()) * live if last_stage else 0
    working = max(block.working, shapes.loss_working(memory) if last_stage else 0)
    offloaded = max(sum(memory.offloads_layer(i) for i in c) for c in chunks)  # the chunk holding the most
    kept = max(sum(not memory.offloads_layer(i) for i in c) for c in chunks)
    blocks_device = live * (offloaded * sum(block.device.values()) + kept * sum(kept_block.device.values()))
    activations = blocks_device + live * per_mb + head + working
    grads = {"main gradients (fp32)": state.main_grads}
    if layout.zero == 3:  # sharded gradients appear as backward ends (activations gone); unsharded ones, kept in
        # fp32 by FSDP across the micro-batches of a step (no reduce-scatter inside no_sync), are all there at once
        unsharded = state.gathered_grads_fp32 if micro > 1 else 0
        grads = {"unsharded gradients (micro-batches)": unsharded,
                 "sharded gradients beyond activations": max(0, state.main_grads - activations - unsharded)}
    device = {"parameters": state.params, **grads,
              "master weights (fp32)": state.masters, "AdamW moments (fp32)": state.moments + state.optimizer_steps,
              "optimizer staging": state.staging, "gathered FSDP units": state.gathered_units,
              "largest parameter gradient": state.largest_param_grad,
              f"activations: {layers_live} block(s) x micro-batch": blocks_device,
              "activations: per micro-batch (rope, ids, stage I/O)": live * per_mb,
              "head + loss saved": head,
              "working set at the peak": working}
    host = {"offloaded activations": live * offloaded * sum(block.host.values()),
            "master weights (fp32)": state.host_masters, "AdamW moments (fp32)": state.host_moments,
            "sharded parameters (fp32)": state.host_params, "sharded gradients (fp32)": state.host_grads}
    return device, {k: v for k, v in host.items() if v}, state


def _padded(seq_len: int, unit: int) -> int:
    return -(-seq_len // unit) * unit


def plan_memory(cfg: RunConfig, world: int, device_capacity: Optional[int] = None,
                host_capacity: Optional[int] = None, eager: Optional[bool] = None,
                host_is_device: bool = False) -> MemoryPlan:
    """The fullest pipeline rank's memory for cfg on `world` ranks (cfg.memory resolved, no 'auto'). eager: the
    elementwise chains run unfused (CPU; default from train.device)."""
    cfg.memory.require_resolved()
    layout = cfg.layout.resolve(world) if cfg.layout.dp is None else cfg.layout
    cuda = cfg.train.device == "cuda"
    eager = (not cuda) if eager is None else eager
    best = None
    # evenly split stages: the first rank (embedding, most micro-batches in flight) or the last (head, loss) is fullest
    ranks = range(layout.pp) if layout.stage_layers is not None else sorted({0, layout.pp - 1})
    for pp_rank in ranks:
        device, host, state = _rank_plan(cfg, layout, pp_rank, eager, cuda)
        if best is None or sum(device.values()) > sum(best[0].values()):
            best = (device, host, state, pp_rank)
    device, host, state, pp_rank = best
    return MemoryPlan(device, host, device_capacity, host_capacity, pp_rank, state, host_is_device)
