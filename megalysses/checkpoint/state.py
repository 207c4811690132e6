"""Training state <-> layout-independent tensors: every parameter (its fp32 master value) and its AdamW state under
the parameter's canonical name, in the full (unsharded, unpadded) shape, whatever the tp / sp / pp / dp layout and the
ZeRO level. Saving gathers over dp x ring x sp (ZeRO-1 / FSDP shards) and tp; loading cuts this rank's pieces back out."""
from __future__ import annotations

from typing import Iterable, Iterator, Optional, Sequence

import torch

from megalysses.parallel import ParallelMesh
from megalysses.parallel.dp import DataParallel
from megalysses.parallel.dp.fsdp import shard_like
from megalysses.parallel.dp.grads import local_values
from megalysses.parallel.dp.state import MOMENTS
from megalysses.parallel.tensor import gather_full, param_info, shard

from .tensors import TensorReader

OPTIMIZER_KINDS = (*MOMENTS, "step")


def model_key(name: str) -> str:
    """Storage key of a parameter's value: 'model.<canonical name>'."""
    return f"model.{name}"


def optimizer_key(name: str, kind: str) -> str:
    """Storage key of a parameter's AdamW state: 'optim.<canonical name>.exp_avg' / '.exp_avg_sq' / '.step'."""
    return f"optim.{name}.{kind}"


class TrainingState:
    """This rank's model chunks, their canonical names, and the data-parallel optimizer whose state goes with them
    (None: weights only)."""

    def __init__(self, chunks: Iterable[torch.nn.Module], mesh: ParallelMesh, dp: Optional[DataParallel] = None):
        self.mesh, self.dp = mesh, dp
        self.names: dict[int, str] = {}
        self.params: list[torch.nn.Parameter] = []
        for chunk in chunks:
            for name, p in chunk.canonical_parameters():
                if id(p) not in self.names:
                    self.names[id(p)] = name
                    self.params.append(p)
        self.tp = mesh.group("tp")
        self.stage = mesh.stage_group()  # the ranks that hold the same parameters (one pipeline rank)

    def written_names(self) -> list[str]:
        """Canonical names this pipeline rank saves: all but a second copy of the tied embedding."""
        return sorted({self.names[id(p)] for p in self.params if not param_info(p).pipeline_duplicate})

    # ------------------------------------------------------------------------------------------------- saving

    def param_states(self) -> Iterator[tuple[torch.nn.Parameter, dict[str, torch.Tensor]]]:
        """(param, whole TP-local fp32 'master' [+ moments, 'step']) per parameter; collectives over dp x ring x sp."""
        if self.dp is not None:
            yield from self.dp.param_states()
        else:
            for p in self.params:
                yield p, {"master": (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().float()}

    def gather_to_writers(self) -> dict[str, torch.Tensor]:
        """Collective over this pipeline rank's dp x ring x sp x tp ranks: every full tensor, kept only by the one rank
        chosen to write it (sizes balanced over the ranks). Returns this rank's {key: full CPU tensor}."""
        sizes = {self.names[id(p)]: _numel(p) for p in self.params if not param_info(p).pipeline_duplicate}
        writer = assign_writers(sizes, self.stage.size)
        mine: dict[str, torch.Tensor] = {}
        for p, state in self.param_states():
            name = self.names[id(p)]
            if param_info(p).pipeline_duplicate:
                continue  # the same on every rank of this stage: skipped in step
            keep = writer[name] == self.stage.rank
            for kind, local in state.items():
                full = local if kind == "step" else gather_full(local, param_info(p).shard, self.tp)
                if keep:
                    mine[model_key(name) if kind == "master" else optimizer_key(name, kind)] = full.detach().cpu()
        return mine

    # ------------------------------------------------------------------------------------------------ loading

    def check_against(self, reader: TensorReader, with_optimizer: bool) -> None:
        """Every tensor this rank needs is stored with the full shape the model expects (clear error if not)."""
        for p in self.params:
            name = self.names[id(p)]
            reader.expect(model_key(name), param_info(p).full_shape)
            if with_optimizer:
                for kind in MOMENTS:
                    reader.expect(optimizer_key(name, kind), param_info(p).full_shape)
                reader.expect(optimizer_key(name, "step"), ())

    def load(self, reader: TensorReader, with_optimizer: bool = True) -> None:
        """Set every parameter (and, with_optimizer, the AdamW state and fp32 masters) from the stored full tensors;
        without optimizer state in use, masters are refreshed from the loaded weights. No communication."""
        self.check_against(reader, with_optimizer)
        states = _LazyStates(self, reader, with_optimizer)
        if self.dp is not None:
            self.dp.load_param_states(states.indexed(self.dp.params))
        else:
            with torch.no_grad():
                for p in self.params:
                    value = states[p]["master"]
                    if hasattr(p, "device_mesh"):  # an FSDP shard without an optimizer to restore
                        value = shard_like(value, p).to_local()
                    local_values(p).copy_(value)


class _LazyStates:
    """Per-parameter whole TP-local tensors, read from the checkpoint when first asked for (one parameter at a time:
    memory stays near the largest parameter). With no stored optimizer state, moments are 0 and step 0."""

    def __init__(self, state: TrainingState, reader: TensorReader, with_optimizer: bool):
        self.state, self.reader, self.with_optimizer = state, reader, with_optimizer

    def __getitem__(self, p: torch.nn.Parameter) -> dict[str, torch.Tensor]:
        name, tp = self.state.names[id(p)], self.state.tp
        kinds = OPTIMIZER_KINDS if self.with_optimizer else ()
        keys = {"master": model_key(name), **{k: optimizer_key(name, k) for k in kinds}}
        full = self.reader.read(list(keys.values()), dtype=torch.float32)
        device = local_values(p).device
        out = {kind: full[key] if kind == "step" else shard(full[key], param_info(p).shard, tp.rank, tp.size).to(device)
               for kind, key in keys.items()}
        if not self.with_optimizer:
            out.update({k: torch.zeros_like(out["master"]) for k in MOMENTS}, step=torch.tensor(0.0))
        return out

    def indexed(self, params: Sequence[torch.nn.Parameter]) -> "_Indexed":
        return _Indexed(self, params)


class _Indexed:
    """_LazyStates addressed by position in a list of parameters (the optimizer's `state_dict()` indexing)."""

    def __init__(self, states: _LazyStates, params: Sequence[torch.nn.Parameter]):
        self.states, self.params = states, params

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.states[self.params[i]]


def assign_writers(sizes: dict[str, int], writers: int) -> dict[str, int]:
    """Each name to one of `writers` ranks, largest first onto the least-loaded (ties: lowest rank, then name):
    the same answer on every rank, and balanced bytes."""
    load = [0] * writers
    out = {}
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        w = min(range(writers), key=lambda r: (load[r], r))
        out[name] = w
        load[w] += sizes[name]
    return out


def _numel(p: torch.nn.Parameter) -> int:
    n = 1
    for d in param_info(p).full_shape:
        n *= d
    return n


def optimizer_present(reader: TensorReader, names: Iterable[str]) -> bool:
    """Whether the checkpoint holds AdamW state for these parameters (a converted model has weights only)."""
    return all(optimizer_key(n, "exp_avg") in reader for n in names)
