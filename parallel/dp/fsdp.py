"""ZeRO-3 through FSDP2 (`torch.distributed.fsdp.fully_shard`) over the dp x ring x sp ranks, next to our own TP shards."""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Mapping, Optional, Sequence

import torch
import torch.nn as nn

from .. import collectives as C
from ..mesh import ParallelMesh
from ..tensor.sharding import param_info, set_param_info
from .grads import clip_gradients, local_values
from .state import MOMENTS, check_state_shapes


def data_parallel_mesh(mesh: ParallelMesh):
    """A 1-D DeviceMesh over this rank's dp x ring x sp group: the ranks holding replicas of the same (TP-local) params."""
    from torch.distributed.device_mesh import DeviceMesh

    group = mesh.data_group()
    if group.pg is None:
        raise RuntimeError("FSDP needs torch.distributed initialised (a ParallelMesh built from a layout, not "
                           "ParallelMesh.single_device()); use layout.zero = 0 or 1 for a single process")
    return DeviceMesh.from_group(group.pg, mesh.device_type, mesh_dim_names=("dp_sp",))


def fully_shard_model(model: nn.Module, mesh: ParallelMesh, modules: Sequence[nn.Module],
                      param_dtype: Optional[torch.dtype] = None, offload: bool = False) -> "FSDPGradSync":
    """Shard every parameter over dp x ring x sp with FSDP2: each of `modules` (e.g. the transformer blocks) is one
    all-gather / reduce-scatter unit, the rest of `model` (embedding, final norm, head) the root unit.

    TP shards are ordinary tensors local to each tp rank, so FSDP shards them further along dim 0. Gradients are
    summed over dp x ring x sp (divide factor 1: the loss is already the global token-weighted mean). With `param_dtype`
    (e.g. bf16) forward/backward run in that dtype while the sharded fp32 parameters are the master weights and
    gradients are reduced in fp32. With `offload` the sharded fp32 parameters (the masters), their gradients and
    so the optimizer's state live in host memory (FSDP2's CPUOffloadPolicy, pinned on GPUs): each unit is copied to
    the device for its all-gather and its reduced gradient back, and the optimizer steps on the host.
    Call after init_weights; returns the GradSync-like handle the loop drives.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    infos = {name: param_info(p) for name, p in model.named_parameters()}  # fully_shard replaces the parameters
    dp_sp = data_parallel_mesh(mesh)
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    placement = CPUOffloadPolicy(pin_memory=mesh.device_type == "cuda") if offload else OffloadPolicy()
    # a container without forward (the ModuleList of pipeline chunks) cannot be a unit: its members are the roots
    roots = list(model.children()) if type(model).forward is nn.Module.forward else [model]
    for module in [*modules, *roots]:  # bottom-up: each call groups the params not claimed by an earlier one
        fully_shard(module, mesh=dp_sp, mp_policy=policy, offload_policy=placement)
        module.set_force_sum_reduction_for_comms(True)  # plain SUM: gloo has no PREMUL_SUM
        module.set_gradient_divide_factor(1.0)
    for name, p in model.named_parameters():
        set_param_info(p, infos[name])
    return FSDPGradSync(roots, mesh, offload)


class FSDPGradSync:
    """The GradSync interface (no_sync, finish, clip_grad_norm, zero_grad) for a model under fully_shard_model."""

    def __init__(self, roots: Sequence[nn.Module], mesh: ParallelMesh, offload: bool = False):
        self.roots, self.mesh = list(roots), mesh  # the root FSDP units (the model, or each pipeline chunk)
        self.offload = offload  # the sharded params, their gradients and the optimizer state live on the host
        self.params = [p for r in self.roots for p in r.parameters() if p.requires_grad]
        self._finished = False
        for root in self.roots:  # whichever zero_grad the loop calls, a forward starts anew
            root.register_forward_pre_hook(self._new_step)

    def _new_step(self, *_) -> None:
        self._finished = False

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward passes inside accumulate unsharded gradients without reduce-scattering (earlier micro-batches)."""
        for root in self.roots:
            root.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            for root in self.roots:
                root.set_requires_gradient_sync(True)

    def finish(self) -> None:
        """FSDP has reduce-scattered by the end of backward; sequence-parallel params also need their sum over tp.
        Idempotent until the next forward."""
        if self._finished:
            return
        for p in self.params:
            if param_info(p).grad_sum_over_tp and p.grad is not None:
                grad = local_values(p.grad)  # in host memory under offload: reduced through the device
                grad.copy_(C.all_reduce(grad.to(self.mesh.device), self.mesh.group("tp")))
        self._finished = True

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """Global norm over the sharded gradients (each element once); clip to max_norm (0 disables)."""
        return clip_gradients(self.params, max_norm, self.mesh)

    def zero_grad(self) -> None:
        """Drop the sharded gradients (the optimizer's zero_grad does the same)."""
        for p in self.params:
            p.grad = None
        self._finished = False

    # ------------------------------------------------------------------------------------ checkpoint state

    @torch.no_grad()
    def param_states(self, optimizer: torch.optim.Optimizer
                     ) -> Iterator[tuple[nn.Parameter, dict[str, torch.Tensor]]]:
        """(param, {'master': the whole (TP-local) fp32 parameter, 'exp_avg', 'exp_avg_sq', 'step'}) for each of
        self.params, its dp x ring x sp shards all-gathered: a collective, iterate it on every rank in step. Before the
        first step the moments are 0 and step is 0."""
        device = self.mesh.device
        for p in self.params:
            state = optimizer.state.get(p, {})
            out = {"master": whole(p, device).float()}
            for key in MOMENTS:
                out[key] = whole(state[key], device) if key in state else torch.zeros_like(out["master"])
            step = state.get("step")
            out["step"] = torch.tensor(0.0) if step is None else step.detach().to("cpu", torch.float32).clone()
            yield p, out

    def state_dict(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """{'state': {i: param_states() entry of self.params[i]}}: whole TP-local tensors, loadable under any dp x ring x sp
        size or ZeRO level. A collective."""
        return {"state": dict(enumerate(s for _, s in self.param_states(optimizer)))}

    @torch.no_grad()
    def load_state_dict(self, state_dict: Mapping[str, Any], optimizer: torch.optim.Optimizer) -> None:
        """Restore parameters and AdamW state from whole per-parameter tensors (the `state_dict()` form; `state` may
        be any mapping, read once per index): each rank keeps its dp x ring x sp shard. No communication."""
        states = state_dict["state"]
        step_on_device = any(g.get("fused") or g.get("capturable") for g in optimizer.param_groups)
        check_state_shapes("FSDPGradSync", states, self.params)
        for i, p in enumerate(self.params):
            s = states[i]
            p.to_local().copy_(shard_like(s["master"], p).to_local())
            step = s["step"].detach().to(p.device if step_on_device else "cpu", torch.float32).clone()  # its own:
            optimizer.state[p] = {"step": step, **{k: shard_like(s[k], p) for k in MOMENTS}}  # incremented in place


def whole(t, device: torch.device) -> torch.Tensor:
    """The whole (TP-local) tensor of a dp x ring x sp-sharded DTensor, gathered on `device` (its shards may live in
    host memory under offload, where the collective cannot read them)."""
    from torch.distributed.tensor import DTensor

    local = t.to_local()
    if local.device != device:
        t = DTensor.from_local(local.to(device), t.device_mesh, t.placements, run_check=False, shape=t.shape,
                               stride=t.stride())
    return t.full_tensor()


def shard_like(full: torch.Tensor, param) -> torch.Tensor:
    """A whole (TP-local) tensor cut into `param`'s dp x ring x sp DTensor shard, as fully_shard cuts it, held where
    param's shard is held (device, or host under offload); no communication."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    home = param.to_local().device
    full = full.to(device=param.device_mesh.device_type, dtype=torch.float32)
    shard = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
    if shard.to_local().device == home:
        return shard
    return DTensor.from_local(shard.to_local().to(home), param.device_mesh, param.placements, run_check=False,
                              shape=param.shape, stride=param.stride())
