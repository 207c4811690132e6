"""checkpoint.init_from: start a run from released weights (a Hugging Face folder) or another run's checkpoint: the
weights only (fresh optimizer, step 0), streamed one parameter at a time into any layout, and only while the run
has no checkpoint of its own, so that a rerun resumes the run instead of starting over."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import torch

from megalysses.config import ConfigError, RunConfig, load_run_config
from megalysses.models.build import model_inventory
from megalysses.models.config import GPTConfig

from .files import CONFIG, CheckpointError, is_checkpoint
from .hf_files import CONFIG_JSON, HFFolder, HFFolderError
from .state import model_key


def is_hf_folder(path: Path) -> bool:
    return (path / CONFIG_JSON).is_file() and not (path / CONFIG).is_file()


def source_model(init_from: str) -> GPTConfig:
    """The model geometry of an init_from source: an HF folder's config.json, or a checkpoint's config.yaml."""
    path = Path(init_from)
    if is_hf_folder(path):
        from megalysses.models.hf import gpt_config_from_hf

        try:
            return gpt_config_from_hf(json.loads((path / CONFIG_JSON).read_text()))
        except ValueError as e:
            raise ConfigError(f"checkpoint.init_from = {init_from!r}: {path / CONFIG_JSON}: {e}") from e
    if is_checkpoint(path):
        return load_run_config(path / CONFIG).model
    raise ConfigError(f"checkpoint.init_from = {init_from!r}: neither a Hugging Face model folder (config.json + "
                      "safetensors) nor a megalysses checkpoint (a step-N folder with manifest.json); give one")


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
    mine, theirs = model_inventory(cfg.model), model_inventory(source)
    if [(n, i.full_shape) for n, i in mine.items()] != [(n, i.full_shape) for n, i in theirs.items()]:
        fields = [f for f in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                              "intermediate_size", "tie_embeddings", "qkv_bias", "qk_norm")
                  if getattr(source, f) != getattr(cfg.model, f)]
        differ = "; ".join(f"model.{f}: source {getattr(source, f)!r}, run {getattr(cfg.model, f)!r}" for f in fields)
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
