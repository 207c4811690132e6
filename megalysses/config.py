"""Run configuration: typed dataclasses loaded from YAML (model, layout and run files) with dotted overrides.

A run file has seven sections: ``model``, ``layout``, ``memory``, ``train``, ``data``, ``checkpoint``, ``logging``.
``model`` and ``layout`` may be inline mappings or the name of another YAML file (``model: tiny`` means the bundled
``configs/models/tiny.yaml``), so changing the layout never touches the model file. Every key is checked against
the dataclass type hints: unknown keys name their dotted path and the nearest valid key, wrong types name the
expected type and the value received. Overrides ``section.key=value`` are applied before validation.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

import yaml

from megalysses.models.config import GPTConfig, MemoryConfig
from megalysses.parallel.layout import LayoutError, ParallelLayout

from .typed_config import (ConfigError, build_dataclass, convert_value, field_hints, from_dict, optional_inner,
                           to_dict, type_name, unknown_key, wrong_type)

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
"""The bundled configs (``scripts/configs`` links here): ``models/``, ``layouts/``, ``runs/``."""
REFERENCE_DIRS = {"model": "models", "layout": "layouts"}
"""Run-file sections that may name another YAML file, and the folder such files live in."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


# ----------------------------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class TrainConfig:
    """The optimisation loop: batch sizes, learning-rate schedule, AdamW, precision and stopping rules."""

    global_batch_size: int = 8
    """Sequences per optimizer step over all data-parallel ranks (= micro_batch_size * grad accumulation * dp)."""
    micro_batch_size: int = 4
    """Sequences per forward/backward pass on one rank."""
    seq_len: int = 128
    """Tokens per training sequence."""
    steps: int = 100
    """Optimizer steps to train for."""
    lr: float = 3e-3
    """Peak learning rate (reached at the end of warmup)."""
    min_lr: float = 0.0
    """Learning rate at the end of the decay (cosine and wsd schedules)."""
    warmup_steps: int = 10
    """Steps of linear warmup from 0 to lr."""
    lr_schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    """After warmup: 'cosine' decays to min_lr, 'wsd' holds lr then decays over decay_fraction, 'constant' holds lr."""
    decay_fraction: float = 0.2
    """wsd only: fraction of the steps (at the end) spent decaying from lr to min_lr."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay (applied to matrices, not to norms or biases)."""
    adam_beta1: float = 0.9
    """AdamW first-moment decay."""
    adam_beta2: float = 0.95
    """AdamW second-moment decay."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    seed: int = 1234
    """Seed for parameter initialisation and everything random in the loop."""
    init: Literal["canonical", "device"] = "canonical"
    """'canonical': each full weight drawn on the CPU from (seed, name), so every layout starts from the same weights
    (slow for billions of parameters); 'device': each rank draws its shards on its device (seconds; same
    distribution, values depend on the layout)."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Compute dtype of the forward/backward pass; master weights and optimizer state stay float32."""
    offload_optimizer: bool = False
    """Keep the fp32 master weights and AdamW moments (12 of the 18 bytes per parameter) in pinned host memory.
    zero 0/1: streamed to the GPU bucket by bucket for the step, bitwise the same result; zero 3: FSDP2 keeps the
    sharded fp32 parameters, their gradients and the optimizer state on the host and steps there."""
    fp8: Literal["none", "delayed", "current"] = "none"
    """FP8 matmuls through Transformer Engine recipes (needs model.backend 'te'): 'delayed' or 'current' scaling,
    amax reduced over every rank of a pipeline stage ('delayed' calibrates its scales on the first batch when no
    checkpoint brings them back); 'none' computes in train.dtype."""
    eval_every: int = 50
    """Steps between validation runs; 0 disables validation."""
    eval_steps: int = 4
    """Batches per validation run."""
    max_bad_steps: int = 5
    """Consecutive steps with a non-finite loss or gradient norm (each skipped) before training stops."""
    device: Literal["cpu", "cuda"] = "cpu"
    """Where to train: 'cpu' (gloo) or 'cuda' (NCCL, one GPU per rank)."""
    nproc: int = 4
    """Local CPU ranks the CPU launcher spawns when not started under torchrun."""

    def __post_init__(self):
        for name in ("global_batch_size", "micro_batch_size", "seq_len", "steps", "eval_steps", "max_bad_steps",
                     "nproc"):
            _require(getattr(self, name) >= 1, f"train.{name} = {getattr(self, name)}: must be >= 1")
        for name in ("warmup_steps", "eval_every", "lr", "min_lr", "weight_decay", "grad_clip", "adam_eps"):
            _require(getattr(self, name) >= 0, f"train.{name} = {getattr(self, name)}: must be >= 0")
        _require(self.global_batch_size % self.micro_batch_size == 0,
                 f"train.global_batch_size = {self.global_batch_size} is not a multiple of train.micro_batch_size = "
                 f"{self.micro_batch_size}")
        _require(0.0 <= self.decay_fraction <= 1.0, f"train.decay_fraction = {self.decay_fraction}: must be in [0, 1]")
        for name in ("adam_beta1", "adam_beta2"):
            _require(0.0 <= getattr(self, name) < 1.0, f"train.{name} = {getattr(self, name)}: must be in [0, 1)")


@dataclass(frozen=True)
class DataConfig:
    """Where the tokens come from and how they are split."""

    source: str = "builtin"
    """'builtin' (the small text shipped in megalysses/data/) or a path to a text file or folder."""
    tokenizer: Optional[str] = None
    """'byte' (raw UTF-8 bytes, 256 ids) or a path to a Hugging Face tokenizer.json; None: the one a preprocessed
    dataset records (byte for text sources). A tokenizer other than the recorded one is refused."""
    val_fraction: float = 0.1
    """Fraction of the tokens held out for validation."""
    seed: int = 1234
    """Seed for shuffling and the train/validation split (independent of train.seed)."""

    def __post_init__(self):
        _require(0.0 <= self.val_fraction < 1.0, f"data.val_fraction = {self.val_fraction}: must be in [0, 1)")


@dataclass(frozen=True)
class CheckpointConfig:
    """When and where checkpoints are written, and what to resume from."""

    dir: Optional[str] = None
    """Checkpoint folder; None means <logging.run_dir>/checkpoints."""
    every: int = 0
    """Steps between checkpoints; 0 writes only the final one."""
    keep_last: int = 2
    """Checkpoints kept on disk (older ones are deleted); 0 keeps all."""
    resume: str = "auto"
    """'auto' (latest checkpoint in dir, if any), 'never', or the path of a checkpoint to resume from."""
    init_from: Optional[str] = None
    """Start from these weights: a Hugging Face model folder or a megalysses checkpoint, read as weights only (a
    fresh optimizer, step 0), into any layout. Used only while the checkpoint dir holds no checkpoint of this run
    (a rerun resumes the run). A run file without a model takes the source's geometry; one with a model is checked
    against it."""
    overwrite: bool = False
    """With resume 'never': allow starting afresh in a checkpoint dir that already holds checkpoints (this run's saves
    replace them and keep_last prunes them); false refuses, naming what would be lost."""

    def __post_init__(self):
        _require(self.every >= 0, f"checkpoint.every = {self.every}: must be >= 0")
        _require(self.keep_last >= 0, f"checkpoint.keep_last = {self.keep_last}: must be >= 0")


@dataclass(frozen=True)
class LoggingConfig:
    """Where metrics go: the run directory (always), Weights & Biases and TensorBoard (optional)."""

    run_dir: str = "runs/default"
    """Folder for the resolved config.yaml, metrics.jsonl and (by default) checkpoints."""
    interval: int = 10
    """Steps between metric log lines (loss, lr, throughput, MFU, memory)."""
    wandb: bool = False
    """Also log to Weights & Biases (needs the wandb extra)."""
    wandb_project: str = "megalysses"
    """Weights & Biases project name."""
    wandb_mode: Literal["offline", "online", "auto"] = "offline"
    """'offline' writes locally, 'online' syncs, 'auto' syncs when an API key is configured."""
    tensorboard: bool = False
    """Also write TensorBoard event files into run_dir."""

    def __post_init__(self):
        _require(self.interval >= 1, f"logging.interval = {self.interval}: must be >= 1")


@dataclass(frozen=True)
class RunConfig:
    """Everything a training run needs: model geometry, parallel layout, loop, data, checkpoints, logging."""

    model: GPTConfig = field(default_factory=GPTConfig)
    """Model geometry (inline, or the name of a file in configs/models/)."""
    layout: ParallelLayout = field(default_factory=ParallelLayout)
    """Parallel degrees (inline, or the name of a file in configs/layouts/)."""
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    """Activation-memory savers (recompute, host offload, tiled MLP and loss); pass it to GPT(..., memory=...)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The optimisation loop."""
    data: DataConfig = field(default_factory=DataConfig)
    """Token source and split."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoint cadence and resume."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Metric sinks."""

    def check(self, world_size: Optional[int] = None) -> ParallelLayout:
        """Cross-check the sections (layout vs model and seq_len, batch vs dp); returns the layout, dp resolved if
        world_size is given. Not run at load time, so a layout can be edited before the model is chosen."""
        m, t = self.model, self.train
        try:
            self.layout.check_model(heads=m.num_heads, kv_heads=m.num_kv_heads, layers=m.num_layers, seq_len=t.seq_len)
            layout = self.layout.resolve(world_size) if world_size is not None else self.layout
        except LayoutError as e:
            raise ConfigError(f"layout vs model: {e}") from e
        _require(t.fp8 == "none" or m.backend == "te",
                 f"train.fp8 = {t.fp8!r} needs model.backend=te (FP8 runs in Transformer Engine layers)")
        _require(not (layout.pp > 1 and layout.zero in (1, 3) and m.tie_embeddings),
                 f"layout.zero = {layout.zero} with pp = {layout.pp} and tied embeddings is not supported: the tied "
                 "embedding's two copies need whole gradients; use zero=0 or model.tie_embeddings=false")
        _require(self.memory.offload_layers <= m.num_layers,
                 f"memory.offload_layers = {self.memory.offload_layers} exceeds model.num_layers = {m.num_layers}: set "
                 f"it to at most {m.num_layers} (or 0: every layer)")
        _require(t.seq_len <= m.max_seq_len,
                 f"train.seq_len = {t.seq_len} exceeds model.max_seq_len = {m.max_seq_len}")
        if layout.dp is not None and t.global_batch_size % (t.micro_batch_size * layout.dp):
            raise ConfigError(
                f"train.global_batch_size = {t.global_batch_size} is not a multiple of train.micro_batch_size * dp = "
                f"{t.micro_batch_size} * {layout.dp}; set train.global_batch_size="
                f"{-(-t.global_batch_size // (t.micro_batch_size * layout.dp)) * t.micro_batch_size * layout.dp}")
        return layout


# ----------------------------------------------------------------------------------------------- YAML files


def _read_yaml(path: Path | str) -> dict:
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e}") from e
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys to values, got {type(data).__name__}")
    return data


def _reference_candidates(name: str, kind_dir: str, bases: Sequence[Path]) -> list[Path]:
    """Files a reference like 'tiny' or 'layouts/sp4.yaml' may mean, in search order."""
    names = [name] if name.endswith((".yaml", ".yml")) else [name, name + ".yaml"]
    dirs: list[Path] = []
    for base in bases:
        dirs.append(base)
        if base.name == "runs":  # a runs/ folder next to models/ and layouts/, like the bundled one
            dirs.append(base.parent / kind_dir)
    dirs += [CONFIG_DIR, CONFIG_DIR / kind_dir]
    out: list[Path] = []
    for d in dirs:
        for n in names:
            candidate = d / n
            if candidate not in out:
                out.append(candidate)
    return out


def bundled(kind: str) -> list[str]:
    """Names of the bundled configs of a kind ('models', 'layouts' or 'runs')."""
    return sorted(p.stem for p in (CONFIG_DIR / kind).glob("*.yaml"))


def model_reference(name: str, where: str) -> Optional[tuple[dict, str]]:
    """A model given as a folder or a run config: a Hugging Face model folder (its config.json), a checkpoint (its
    config.yaml's model), or a resolved run config.yaml; None when `name` is none of them."""
    path = Path(name)
    if path.is_dir() and (path / "config.yaml").is_file():
        path = path / "config.yaml"
    elif path.is_dir() and (path / "config.json").is_file():
        from megalysses.models.hf import gpt_config_from_hf

        try:
            return to_dict(gpt_config_from_hf(json.loads((path / "config.json").read_text()))), str(path)
        except ValueError as e:
            raise ConfigError(f"{where}: {path / 'config.json'}: {e}") from e
    if path.is_file() and path.suffix in (".yaml", ".yml"):
        data = _read_yaml(path)
        if isinstance(data.get("model"), dict) and "layout" in data:  # a resolved run config
            return data["model"], f"{path}: model"
    return None


def init_source_model(init_from: str, where: str = "checkpoint.init_from") -> tuple[dict, str]:
    """The model section of checkpoint.init_from's source (an HF folder or a checkpoint) and where it came from."""
    found = model_reference(init_from, where)
    if found is None:
        raise ConfigError(f"{where} = {init_from!r}: neither a Hugging Face model folder (config.json) nor a "
                          "megalysses checkpoint (config.yaml); give one")
    return found


def _load_reference(section: str, name: str, bases: Sequence[Path], where: str) -> tuple[dict, str]:
    """Read the model/layout file that name refers to (a model also as an HF folder, a checkpoint, or a run's
    config.yaml); returns its dict and its path."""
    if section == "model":
        found = model_reference(name, where)
        if found is not None:
            return found
    kind_dir = REFERENCE_DIRS[section]
    tried = _reference_candidates(name, kind_dir, bases)
    for candidate in tried:
        if candidate.is_file():
            return _read_yaml(candidate), str(candidate)
    names = bundled(kind_dir)
    near = difflib.get_close_matches(Path(name).stem if name.endswith((".yaml", ".yml")) else name, names, n=1, cutoff=0.5)
    hint = f"did you mean {near[0]!r}? " if near else ""
    raise ConfigError(f"{where}: {section} file {name!r} not found; tried {', '.join(map(str, tried))}; "
                      f"{hint}bundled {kind_dir}: {', '.join(names)}")


def _load_single(section: str, cls, path: Path | str):
    where = str(path)
    if Path(path).is_file():
        data, source = _read_yaml(path), where
    else:
        data, source = _load_reference(section, str(path), [Path.cwd()], where)
    return from_dict(cls, data, source, section)


def load_model_config(path: Path | str) -> GPTConfig:
    """A model file (or a bundled name like 'tiny') as a GPTConfig."""
    return _load_single("model", GPTConfig, path)


def load_layout(path: Path | str) -> ParallelLayout:
    """A layout file (or a bundled name like 'tp2-sp2') as a ParallelLayout."""
    return _load_single("layout", ParallelLayout, path)


# ---------------------------------------------------------------------------------------------- run files


def parse_override(text: str) -> tuple[list[str], Any]:
    """'train.lr=3e-4' -> (['train', 'lr'], '3e-4'); the value is parsed with yaml.safe_load."""
    key, sep, raw = text.partition("=")
    keys = key.strip().split(".")
    if not sep or not all(keys):
        raise ConfigError(f"override {text!r}: expected section.key=value, e.g. train.lr=3e-4 or layout=sp4")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: the value is not valid YAML: {e}") from e
    return keys, value


class _RunSections:
    """The raw sections of a run file while overrides are applied: dicts plus which file each came from."""

    def __init__(self, path: Path):
        self.path = path
        self.data = dict(_read_yaml(path))
        self.model_named = "model" in self.data  # else checkpoint.init_from may supply the geometry
        if not self.data:
            raise ConfigError(f"{path}: the run file is empty (all defaults would train nothing meaningful); start "
                              f"from a bundled run file, e.g. {CONFIG_DIR / 'runs' / 'quickstart.yaml'}")
        self.origins: dict[str, str] = {}

    def section(self, name: str, where: str) -> dict:
        """The section as a mutable dict, reading a referenced file first."""
        value = self.data.get(name)
        if isinstance(value, str) and name in REFERENCE_DIRS:
            value, self.origins[name] = _load_reference(name, value, [self.path.parent], where)
        elif value is None:
            value = {}
        elif not isinstance(value, dict):
            raise wrong_type(field_hints(RunConfig)[name], value, self.origins.get(name, str(self.path)), name)
        self.data[name] = value
        return value

    def apply(self, text: str) -> None:
        keys, value = parse_override(text)
        source = f"override {text!r}"
        hint, cls = None, RunConfig
        for i, name in enumerate(keys):  # check the keys (and the value's type) before touching anything
            hints = field_hints(cls)
            if name not in hints:
                raise unknown_key(source, ".".join(keys[:i + 1]), name, list(hints))
            hint, cls = hints[name], optional_inner(hints[name])
            if i < len(keys) - 1 and not dataclasses.is_dataclass(cls):
                raise ConfigError(f"{source}: {'.'.join(keys[:i + 1])} is {type_name(hint)}, not a section "
                                  f"with a key {keys[i + 1]!r}")
        top = keys[0]
        self.model_named |= top == "model" and len(keys) == 1
        if len(keys) == 1 and isinstance(value, str) and top in REFERENCE_DIRS:
            self.data[top], origin = _load_reference(top, value, [Path.cwd(), self.path.parent], source)
            self.origins[top] = f"{origin} (from {source})"
            return
        convert_value(hint, value, source, ".".join(keys))
        if len(keys) == 1:
            self.data[top], self.origins[top] = value, source
            return
        node = self.section(top, source)
        for name in keys[1:-1]:
            if not isinstance(node.get(name), dict):
                node[name] = {}
            node = node[name]
        node[keys[-1]] = value
        self.origins[top] = f"{self.origins.get(top, str(self.path))} (with overrides)"

    def build(self) -> RunConfig:
        for name in REFERENCE_DIRS:
            if isinstance(self.data.get(name), str):
                self.section(name, f"{self.path}: {name}")
        init_from = (self.data.get("checkpoint") or {}).get("init_from") if isinstance(
            self.data.get("checkpoint"), dict) else None
        if init_from and not self.model_named:  # the source's geometry, the run's model.* overrides on top
            source, where = init_source_model(str(init_from), f"{self.path}: checkpoint.init_from")
            self.data["model"] = {**source, **(self.data.get("model") or {})}
            self.origins["model"] = f"{where} (checkpoint.init_from)"
        return build_dataclass(RunConfig, self.data, str(self.path), "", self.origins)


def load_run_config(path: Path | str, overrides: Sequence[str] = ()) -> RunConfig:
    """A run file plus dotted overrides ('train.lr=3e-4', 'layout.sp=4', 'layout=sp4') as a RunConfig.

    A bare name like 'quickstart' is looked up in the bundled configs/runs/ when no such file exists.
    """
    path = Path(path)
    if not path.is_file() and path.suffix not in (".yaml", ".yml") and (CONFIG_DIR / "runs" / f"{path}.yaml").is_file():
        path = CONFIG_DIR / "runs" / f"{path}.yaml"
    sections = _RunSections(path)
    for text in overrides:
        sections.apply(text)
    return sections.build()


def save_resolved(cfg: RunConfig, run_dir: Path | str) -> Path:
    """Write the fully resolved config to <run_dir>/config.yaml (atomically); load_run_config reads it back."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    out = run_dir / "config.yaml"
    text = "# Resolved run config (megalysses); reload with megalysses.config.load_run_config.\n"
    text += yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False)
    tmp = out.with_name(f".config.yaml.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, out)
    return out
