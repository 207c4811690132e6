"""DataParallel: the one interface of the data-parallel implementations over dp x ring x sp (bucketed all-reduce, ZeRO-1,
FSDP2), each a gradient sync and its optimizer together. The trainer, the clipping and the checkpoint call it and
never ask which implementation runs."""
from __future__ import annotations

import abc
from typing import ContextManager, Iterable, Iterator, Mapping, Optional

import torch

from ..collectives import CommGroup
from .fsdp import FSDPGradSync
from .sync import GradSync
from .grads import local_values
from .zero import DistributedOptimizer, optimizer_state_bytes

ParamState = dict[str, torch.Tensor]
"""A parameter's optimizer state as checkpoints hold it: whole (TP-local) fp32 'master', 'exp_avg', 'exp_avg_sq'
shaped like the parameter, and the 0-d 'step'."""


class DataParallel(abc.ABC):
    """Gradients summed over dp x ring x sp and one optimizer step, whichever way the state is sharded.

    One step: backward passes (all but each chunk's last inside no_sync()), finish(), sum_gradients_over() for
    parameters with copies elsewhere, clip_grad_norm(), step(lr), zero_grad()."""

    params: list[torch.nn.Parameter]
    """The parameters it trains, in the order of param_states() and load_param_states()."""

    @abc.abstractmethod
    def no_sync(self) -> ContextManager:
        """Backward passes inside only accumulate gradients (the earlier micro-batches of a step)."""

    @abc.abstractmethod
    def finish(self) -> None:
        """Wait until every gradient is summed over dp x ring x sp (and over tp where ParamInfo says so)."""

    @abc.abstractmethod
    def sum_gradients_over(self, params: Iterable[torch.nn.Parameter], group: CommGroup) -> None:
        """Also sum these parameters' gradients over another group (a tied embedding's copies on the first and last
        pipeline stage); after finish()."""

    @abc.abstractmethod
    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """The global gradient norm, every element counted once; gradients scaled to at most max_norm (0: off)."""

    @abc.abstractmethod
    def step(self, lr: float) -> None:
        """One optimizer step at learning rate lr; the parameters then hold the updated values."""

    @abc.abstractmethod
    def zero_grad(self) -> None:
        """Forget this step's gradients."""

    @abc.abstractmethod
    def param_states(self) -> Iterator[tuple[torch.nn.Parameter, ParamState]]:
        """(param, its whole TP-local state) for every parameter, in order; a collective over dp x ring x sp where the
        state is sharded: iterate it on every rank, in step."""

    @abc.abstractmethod
    def load_param_states(self, states: Mapping[int, ParamState]) -> None:
        """Restore parameters and optimizer state from whole TP-local states indexed like `params` (read once per
        index, so a lazy mapping keeps memory low); no communication."""

    @abc.abstractmethod
    def state_bytes(self, keys: Optional[Iterable[str]] = None) -> int:
        """Bytes of optimizer state on this rank (all of it, or the state tensors named in keys)."""

    @abc.abstractmethod
    def host_bytes(self) -> int:
        """Bytes this rank keeps in host memory for training state (offloaded masters, moments, gradients), else 0."""


class _SyncWithOptimizer(DataParallel):
    """What both implementations do alike: a gradient sync (no_sync, finish, clip) and an optimizer stepped at lr."""

    def __init__(self, sync, optimizer):
        self.sync, self.optimizer, self.params = sync, optimizer, sync.params

    def no_sync(self) -> ContextManager:
        return self.sync.no_sync()

    def finish(self) -> None:
        self.sync.finish()

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        return self.sync.clip_grad_norm(max_norm)

    def step(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()


class BucketedDataParallel(_SyncWithOptimizer):
    """ZeRO 0 / 1: a GradSync (bucketed all-reduce, or reduce-scatter) and the DistributedOptimizer over its buffers
    (fp32 masters of the whole model, or of this rank's chunk of every bucket)."""

    def __init__(self, sync: GradSync, optimizer: DistributedOptimizer):
        super().__init__(sync, optimizer)

    def sum_gradients_over(self, params: Iterable[torch.nn.Parameter], group: CommGroup) -> None:
        self.sync.all_reduce_main_grads(params, group)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad()

    def param_states(self) -> Iterator[tuple[torch.nn.Parameter, ParamState]]:
        return self.optimizer.param_states()

    def load_param_states(self, states: Mapping[int, ParamState]) -> None:
        self.optimizer.load_state_dict({"state": states})

    def state_bytes(self, keys: Optional[Iterable[str]] = None) -> int:
        return self.optimizer.state_bytes(keys)

    def host_bytes(self) -> int:
        return self.optimizer.host_bytes()


class FullyShardedDataParallel(_SyncWithOptimizer):
    """ZeRO 3: the model under FSDP2 (fully_shard_model) and a torch optimizer on its sharded parameters."""

    def __init__(self, sync: FSDPGradSync, optimizer: torch.optim.Optimizer):
        super().__init__(sync, optimizer)

    def sum_gradients_over(self, params: Iterable[torch.nn.Parameter], group: CommGroup) -> None:
        params = list(params)
        if params and group.size > 1:
            raise NotImplementedError("summing FSDP-sharded gradients over another group (tied embeddings across "
                                      "pipeline stages) is not supported: use layout.zero=0 or untied embeddings")

    def zero_grad(self) -> None:
        self.optimizer.zero_grad()
        self.sync.zero_grad()

    def param_states(self) -> Iterator[tuple[torch.nn.Parameter, ParamState]]:
        return self.sync.param_states(self.optimizer)

    def load_param_states(self, states: Mapping[int, ParamState]) -> None:
        self.sync.load_state_dict({"state": states}, self.optimizer)

    def state_bytes(self, keys: Optional[Iterable[str]] = None) -> int:
        return optimizer_state_bytes(self.optimizer, keys)

    def host_bytes(self) -> int:
        """The sharded parameters, gradients and optimizer state FSDP's CPU offload keeps on the host."""
        if not self.sync.offload:
            return 0
        tensors = [*self.params, *(p.grad for p in self.params if p.grad is not None),
                   *(v for state in self.optimizer.state.values() for v in state.values() if torch.is_tensor(v))]
        return sum(t.numel() * t.element_size() for t in map(local_values, tensors) if t.dim() > 0)
