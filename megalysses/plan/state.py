"""Model state of one rank: parameters, fp32 main gradients, fp32 masters and AdamW moments, by ZeRO level.

Read off the model's own inventory (models.build.model_inventory: every parameter's full shape and tensor-parallel
split) and the data-parallel code's own rules: the GradBuffer bucket layout is built for real on the meta device (no
memory), so the padding and ownership are the trainer's, not a copy of them.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch

from megalysses.models.build import model_inventory
from megalysses.models.config import GPTConfig
from megalysses.models.spec import norm_grad_sums_over_tp
from megalysses.parallel.dp.buffers import ALIGN, GradBuffer
from megalysses.parallel.dp.offload import SLOTS
from megalysses.parallel.dp.zero import PIECE_NUMEL
from megalysses.parallel.layout import ParallelLayout
from megalysses.parallel.pipeline import local_virtual_stages, stage_layer_ids

FP32 = 4
MOMENT_BYTES = 2 * FP32  # AdamW exp_avg + exp_avg_sq per owned element


@dataclass(frozen=True)
class LocalParam:
    """One parameter as this rank holds it: canonical name, local (tp-sharded) shape, chunk, whether its gradient is
    also summed over tp (GradSync keeps those in a second buffer)."""

    name: str
    shape: tuple[int, ...]
    chunk: int
    sums_over_tp: bool

    @property
    def numel(self) -> int:
        return int(torch.Size(self.shape).numel())

    @property
    def in_block(self) -> bool:
        return self.name.startswith("blocks.")


def _tp_local_shape(info, tp: int) -> tuple[int, ...]:
    shape = list(info.full_shape)
    if info.shard is not None:
        shape[info.shard.dim] = info.shard.local_size(tp)
    return tuple(shape)


def _chunk_holds(name: str, layers: list[int], pre: bool, post: bool, tied: bool) -> bool:
    """Whether a virtual stage's chunk has this canonical parameter (models.build.build_model's split)."""
    if name.startswith("embed."):
        return pre or (post and tied)
    if name.startswith("blocks."):
        return int(name.split(".")[1]) in layers
    return post  # final norm, untied head


def stage_parameters(model: GPTConfig, layout: ParallelLayout, pp_rank: int = 0) -> list[LocalParam]:
    """The parameters of pipeline rank `pp_rank`, chunk by chunk in model order (what model.parameters() yields)."""
    inventory = model_inventory(model)
    layers = stage_layer_ids(layout, model.num_layers)
    last = layout.pp * layout.vpp - 1
    out = []
    for chunk, v in enumerate(local_virtual_stages(layout.pp, layout.vpp, pp_rank)):
        for name, info in inventory.items():
            if _chunk_holds(name, layers[v], v == 0, v == last, model.tie_embeddings):
                per_head = name.endswith(("q_norm.weight", "k_norm.weight"))
                sums = name.endswith("norm.weight") and norm_grad_sums_over_tp(layout.tp, layout.tp_sequence_parallel,
                                                                               per_head)
                out.append(LocalParam(name, _tp_local_shape(info, layout.tp), chunk, sums))
    return out


@functools.lru_cache(maxsize=256)
def _grad_buffers(shapes: tuple[tuple[tuple[int, ...], bool, int], ...], bucket_numel: int, pad_to: int):
    """GradSync's buffers over meta-device stand-ins of the parameters: [(GradBuffer, [stand-ins])]."""
    params = [torch.nn.Parameter(torch.empty(shape, device="meta")) for shape, _, _ in shapes]
    for p, (_, sums, ndim) in zip(params, shapes):
        p.sums_over_tp, p.decays = sums, ndim >= 2
    ordered = params[::-1]  # GradSync: backward order, roughly
    buffers = []
    for sums in (False, True):
        members = [p for p in ordered if p.sums_over_tp == sums]
        if members:
            buffers.append(GradBuffer(members, bucket_numel, pad_to, sums))
    return buffers


@dataclass(frozen=True)
class StateBytes:
    """Bytes of model state on one rank, on the device and on the host (pinned), by term."""

    params: int = 0
    main_grads: int = 0
    masters: int = 0
    moments: int = 0
    optimizer_steps: int = 0
    staging: int = 0
    host_params: int = 0
    host_grads: int = 0
    host_masters: int = 0
    host_moments: int = 0
    largest_bucket: int = 0
    """Elements of the largest gradient bucket (the unit of the overlapped reduction)."""
    gathered_units: int = 0
    """ZeRO-3: bytes of all-gathered parameter units and their unsharded gradients in flight at once."""
    gathered_grads_fp32: int = 0
    """ZeRO-3: bytes of every unit's unsharded fp32 gradient (held across the micro-batches of a step)."""
    largest_param_grad: int = 0
    """Bytes of the largest parameter gradient in the compute dtype (exists until folded into its main gradient)."""

    @property
    def device(self) -> int:
        return (self.params + self.main_grads + self.masters + self.moments + self.optimizer_steps + self.staging
                + self.gathered_units)

    @property
    def host(self) -> int:
        return self.host_params + self.host_grads + self.host_masters + self.host_moments

    def terms(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in ("largest_bucket", "largest_param_grad", "gathered_grads_fp32")}


def data_shards(layout: ParallelLayout) -> int:
    """Ranks the optimizer state is sharded over under ZeRO: dp x ring x sp."""
    return layout.dp * layout.ring * layout.sp


def state_bytes(model: GPTConfig, layout: ParallelLayout, param_dtype_bytes: int, pp_rank: int = 0,
                data_rank: int = 0, bucket_mb: float = 25.0, cuda: bool = True,
                offload_optimizer: bool = False) -> StateBytes:
    """Model state of rank (pp_rank, data_rank of dp x ring x sp) for layout.zero; layout.dp must be resolved."""
    frozen = dataclasses.replace(layout, stage_layers=None if layout.stage_layers is None else
                                 tuple(layout.stage_layers))
    return _state_bytes(model, frozen, param_dtype_bytes, pp_rank, data_rank, bucket_mb, cuda, offload_optimizer)


@functools.lru_cache(maxsize=1024)
def _state_bytes(model: GPTConfig, layout: ParallelLayout, param_dtype_bytes: int, pp_rank: int, data_rank: int,
                 bucket_mb: float, cuda: bool, offload_optimizer: bool) -> StateBytes:
    params = stage_parameters(model, layout, pp_rank)
    if layout.zero == 3:
        return _fsdp_state(params, layout, param_dtype_bytes, offload_optimizer, data_rank)
    shards = data_shards(layout) if layout.zero == 1 else 1
    bucket_numel = max(1, int(bucket_mb * 2**20 / 4))
    key = tuple((p.shape, p.sums_over_tp, len(p.shape)) for p in params)
    buffers = _grad_buffers(key, bucket_numel, shards * (ALIGN if cuda else 1))
    grads = sum(b.data.numel() for b in buffers) * FP32
    owned_padded = owned = runs = largest = 0
    chunks = []  # owned elements of each bucket
    for buf in buffers:
        for bucket in buf.buckets:
            largest = max(largest, bucket.end - bucket.start)
            lo, hi = bucket.chunk(data_rank, shards)
            chunks.append(hi - lo)
            owned_padded += hi - lo
            segments = buf.segments(bucket, lo, hi)
            owned += sum(s.hi - s.lo for s in segments)
            runs += sum(1 for i, s in enumerate(segments) if i == 0 or s.param.decays != segments[i - 1].param.decays)
    state = dict(params=sum(p.numel for p in params) * param_dtype_bytes, main_grads=grads,
                 largest_bucket=largest, largest_param_grad=max(p.numel for p in params) * param_dtype_bytes)
    masters, moments = owned_padded * FP32, owned * MOMENT_BYTES
    if offload_optimizer:  # one host block (master, exp_avg, exp_avg_sq) per owned bucket chunk, padding included;
        # the device keeps SLOTS staging buffers of the largest piece's block (stepping, fetching, writing back)
        piece = min(max(chunks), PIECE_NUMEL)
        staging = SLOTS * piece * (FP32 + MOMENT_BYTES) if cuda else 0  # a CPU run steps the host blocks
        return StateBytes(**state, host_masters=masters, host_moments=owned_padded * MOMENT_BYTES,
                          optimizer_steps=runs * FP32, staging=staging)
    return StateBytes(**state, masters=masters, moments=moments, optimizer_steps=runs * FP32)


def _fsdp_rows(dim0: int, shards: int, rank: int) -> tuple[int, int]:
    """(padded, held) rows of dim 0 on one rank under FSDP2's even split (torch.chunk, padded to the largest)."""
    per = -(-dim0 // shards)
    return per, max(0, min(per, dim0 - rank * per))


def _fsdp_state(params: list[LocalParam], layout: ParallelLayout, param_dtype_bytes: int,
                offload: bool, data_rank: int = 0) -> StateBytes:
    """ZeRO-3 (FSDP2): fp32 sharded parameters (padded storage) and gradients, AdamW moments on the held rows; in
    flight, the root unit (embedding, final norm, head: kept gathered from forward to backward) and two block units
    (one computing, one prefetched) in the compute dtype, plus one block unit's unsharded gradient (compute dtype and
    an fp32 copy for the reduce-scatter; the root unit's gradients are reduced after the activations are gone)."""
    shards = data_shards(layout)
    padded = held = 0
    for p in params:
        rest = p.numel // p.shape[0]
        rows_padded, rows_held = _fsdp_rows(p.shape[0], shards, data_rank)
        padded += rows_padded * rest
        held += rows_held * rest
    root = sum(p.numel for p in params if not p.in_block)
    block_units: dict[str, int] = {}
    for p in params:
        if p.in_block:
            unit = ".".join(p.name.split(".")[:2])
            block_units[unit] = block_units.get(unit, 0) + p.numel
    unit = max(block_units.values(), default=0)
    gathered = (root + 2 * unit) * param_dtype_bytes + unit * (param_dtype_bytes + FP32)
    common = dict(gathered_units=gathered, optimizer_steps=len(params) * FP32,
                  gathered_grads_fp32=sum(p.numel for p in params) * FP32,
                  largest_param_grad=max(p.numel for p in params) * param_dtype_bytes)
    if offload:  # CPUOffloadPolicy: sharded parameters, gradients and moments live on the host
        return StateBytes(**common, host_params=held * FP32, host_grads=held * FP32,
                          host_moments=held * MOMENT_BYTES)
    return StateBytes(**common, params=padded * FP32, main_grads=held * FP32, moments=held * MOMENT_BYTES)
