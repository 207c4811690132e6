"""checkpoint.init_from: start a run from released weights (a Hugging Face folder) or another run's checkpoint: the
weights only (fresh optimizer, step 0), streamed one parameter at a time into any layout, and only while the run
has no checkpoint of its own, so that a rerun resumes the run instead of starting over."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional, Sequence

import torch

from megalysses.config import ConfigError, RunConfig, from_dict, init_source_model
from megalysses.models.build import model_inventory, same_parameters
from megalysses.models.config import GPTConfig

from .files import CONFIG, CheckpointError
from .hf_files import CONFIG_JSON, HFFolder, HFFolderError
from .state import model_key


def is_hf_folder(path: Path) -> bool:
    return (path / CONFIG_JSON).is_file() and not (path / CONFIG).is_file()


def source_model(init_from: str) -> GPTConfig:
    """The model geometry of an init_from source: an HF folder's config.json, or a checkpoint's config.yaml."""
    data, where = init_source_model(init_from)
    return from_dict(GPTConfig, data, where, "model")


def check_init_from(cfg: RunConfig) -> None:
    """Before any rank starts: the source exists, and its parameters (names, full shapes) are the run's model's."""
    c = cfg.checkpoint
    if c.init_from is None:
        return
    if c.resume not in ("auto", "never"):
        raise ConfigError(f"checkpoint.init_from = {c.init_from!r} and checkpoint.resume = {c.resume!r} both name "
                          "where the weights come from: resume continues a run exactly, init_from starts a new one "
                          "from weights; keep one")
    source = source_model(c.init_from)
    if not same_parameters(source, cfg.model):
        theirs, mine = dataclasses.asdict(source), dataclasses.asdict(cfg.model)
        differ = "; ".join(f"model.{k}: source {theirs[k]!r}, run {mine[k]!r}" for k in mine if mine[k] != theirs[k])
        raise ConfigError(f"checkpoint.init_from = {c.init_from!r} holds another model geometry ({differ}): leave "
                          "the run's model out to take the source's, or name a model that matches it")


class HFWeights:
    """An HF folder read as our full tensors (TensorReader's interface for weights): 'model.<name>' keys, q/k/v and
    gate/up stacked as ours, one parameter at a time."""

    def __init__(self, folder: Path | str, model: GPTConfig):
        from megalysses.models.hf import hf_to_ours

        self.folder, self.model, self._to_ours = HFFolder(folder), model, hf_to_ours
        self.shapes = {model_key(n): i.full_shape for n, i in model_inventory(model).items()}

    def __contains__(self, key: str) -> bool:
        return key in self.shapes

    def expect(self, key: str, shape: Sequence[int]) -> None:
        if self.shapes.get(key) != tuple(shape):
            raise CheckpointError(f"{self.folder.folder}: {key!r} has shape {self.shapes.get(key)}, the model needs "
                                  f"{tuple(shape)}")

    def read(self, keys: Sequence[str], dtype: Optional[torch.dtype] = None) -> dict[str, torch.Tensor]:
        names = {k[len("model."):]: k for k in keys}
        try:
            tensors = dict(self._to_ours(self.folder.get, self.model, only=names))
        except (KeyError, ValueError, HFFolderError) as e:
            raise CheckpointError(f"{self.folder.folder}: {e}") from e
        return {names[n]: t if dtype is None else t.to(dtype) for n, t in tensors.items()}
