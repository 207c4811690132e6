"""Hugging Face adapters (Llama, Mistral, Qwen2, Qwen3): config.json <-> GPTConfig, and state dicts streamed name by name.

RoPE layout: our `apply_rope` uses the half-split (`rotate_half`) convention, the same as transformers, so HF
q_proj / k_proj weights are used as they are. Only Meta's original checkpoints (`consolidated.*.pth`) rotate
interleaved pairs and need `permute_for_rope` (Meta -> HF/ours) first; `unpermute` goes back.

Fusions: our `attn.qkv` is [q; k; v] stacked on the output rows, our `mlp.gate_up` is [gate; up].
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, Container, Iterator, Mapping, Optional

import torch

from megalysses.parallel.tensor import param_info, shard

from .build import model_inventory
from .config import GPTConfig, RopeScaling
from .gpt import GPT

FAMILIES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
            "qwen3": "Qwen3ForCausalLM"}
"""Supported HF model_type -> its architecture class name."""

FAMILY_FEATURES = {"llama": dict(qkv_bias=False, qk_norm=False), "mistral": dict(qkv_bias=False, qk_norm=False),
                   "qwen2": dict(qkv_bias=True, qk_norm=False), "qwen3": dict(qkv_bias=False, qk_norm=True)}
"""The GPTConfig options each family's attention always has (Qwen2: a q/k/v bias; Qwen3: per-head q/k RMSNorm)."""

_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


# ----------------------------------------------------------------------------------------------------------- config

def _rope_from_hf(hf: Mapping[str, Any]) -> tuple[float, Optional[RopeScaling]]:
    """(rope_theta, scaling) from the transformers-5 `rope_parameters` dict or the older top-level
    `rope_theta` + `rope_scaling` pair."""
    params = hf.get("rope_parameters")
    if isinstance(params, Mapping) and isinstance(params.get("full_attention"), Mapping):
        params = params["full_attention"]  # per-layer-type form; all our layers are full attention
    if not params:
        params = hf.get("rope_scaling") or {}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type")) or "default"
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"partial_rotary_factor {params['partial_rotary_factor']} is not supported (full rotary only)")
    if rope_type == "default":
        return float(theta), None
    if rope_type != "llama3":
        raise ValueError(f"RoPE type {rope_type!r} is not supported; supported: 'default', 'llama3'")
    values = {k: params.get(k) for k in _LLAMA3_KEYS}
    if values["original_max_position_embeddings"] is None:  # HF falls back to max_position_embeddings too
        values["original_max_position_embeddings"] = hf.get("max_position_embeddings")
    missing = [k for k, v in values.items() if v is None]
    if missing:
        raise ValueError(f"llama3 RoPE scaling is missing {missing}")
    return float(theta), RopeScaling(factor=float(values["factor"]), low_freq_factor=float(values["low_freq_factor"]),
                                     high_freq_factor=float(values["high_freq_factor"]),
                                     original_max_position_embeddings=int(values["original_max_position_embeddings"]))


def _check_supported_features(hf: Mapping[str, Any], family: str) -> None:
    """Reject HF options our model does not implement, naming the option and its value."""
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {hf['hidden_act']!r} is not supported (SwiGLU with silu only)")
    if family in ("llama", "qwen3") and hf.get("attention_bias", False):
        raise ValueError(f"{family} attention_bias=True is not supported: it also puts a bias on o_proj, which our "
                         "attention output projection does not have")
    if hf.get("mlp_bias", False):
        raise ValueError("mlp_bias=True is not supported (the MLP projections have no bias)")
    if family in ("qwen2", "qwen3") and hf.get("use_sliding_window", False):
        raise ValueError(f"{family} use_sliding_window=True (sliding_window {hf.get('sliding_window')}) is not "
                         "supported: sliding-window attention is not implemented")
    if family == "mistral" and hf.get("sliding_window") is not None:
        raise ValueError(f"mistral sliding_window {hf['sliding_window']} is not supported: sliding-window attention "
                         "is not implemented (only sliding_window null)")
    other = sorted({t for t in hf.get("layer_types") or () if t != "full_attention"})
    if other:
        raise ValueError(f"layer_types {other} are not supported (full_attention only)")


def gpt_config_from_hf(hf_config: Any, **overrides) -> GPTConfig:
    """A GPTConfig from an HF config.json dict (or a transformers config object); `overrides` set fields that HF
    does not describe (e.g. attention_core)."""
    hf = hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(hf_config)
    family = hf.get("model_type")
    if family not in FAMILIES:
        raise ValueError(f"model_type {family!r} is not supported; supported: {sorted(FAMILIES)}")
    _check_supported_features(hf, family)
    required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    missing = [k for k in required if hf.get(k) is None]
    if missing:
        raise ValueError(f"{family} config is missing {missing}")
    theta, scaling = _rope_from_hf(hf)
    fields = dict(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"], num_kv_heads=hf.get("num_key_value_heads"),
        head_dim=hf.get("head_dim"), intermediate_size=hf["intermediate_size"],
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=theta, rope_scaling=scaling,
        max_seq_len=hf.get("max_position_embeddings", GPTConfig.max_seq_len),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), **FAMILY_FEATURES[family],
        init_std=hf.get("initializer_range", GPTConfig.init_std))
    fields.update(overrides)
    return GPTConfig(**fields)


def family_fits(cfg: GPTConfig, family: str) -> bool:
    """Whether `cfg` has exactly the attention options of the HF family."""
    return all(getattr(cfg, k) == v for k, v in FAMILY_FEATURES[family].items())


def family_for(cfg: GPTConfig) -> Optional[str]:
    """The first HF family (in FAMILIES order) whose attention options `cfg` has; None if none has them."""
    return next((f for f in FAMILIES if family_fits(cfg, f)), None)


_EXPRESSED_FIELDS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                     "intermediate_size", "rms_norm_eps", "rope_theta", "rope_scaling", "max_seq_len",
                     "tie_embeddings", "qkv_bias", "qk_norm", "init_std", "softmax_scale")
"""GPTConfig fields an HF config expresses (qkv_bias / qk_norm through the family; softmax_scale only at its
default); every other field must sit at its default or be a runtime choice."""
_RUNTIME_FIELDS = ("attention_core", "backend")
"""GPTConfig fields that pick kernels and layers, not the math: an export leaves them behind."""


def _check_expressible(cfg: GPTConfig, family: str) -> None:
    """Refuse, by name, a setting that changes the model's outputs and that a `family` config cannot hold."""
    default_scale = cfg.head_dim ** -0.5
    if cfg.softmax_scale is not None and not math.isclose(cfg.softmax_scale, default_scale, rel_tol=1e-7):
        raise ValueError(f"model.softmax_scale = {cfg.softmax_scale} cannot be expressed as a {family} model: "
                         f"Hugging Face scales attention scores by 1/sqrt(head_dim) = {default_scale:.8g} and has no "
                         "setting for another scale, so the export's logits would differ; export a model trained "
                         f"with model.softmax_scale null (or {default_scale:.8g})")
    for field in dataclasses.fields(cfg):
        if field.name in _EXPRESSED_FIELDS + _RUNTIME_FIELDS or getattr(cfg, field.name) == field.default:
            continue
        raise ValueError(f"model.{field.name} = {getattr(cfg, field.name)!r} has no {family} config.json "
                         "equivalent, so the export would compute something else; export a model trained with "
                         f"model.{field.name} = {field.default!r}, or teach models.hf.hf_config_from_gpt to write it")


def hf_config_from_gpt(cfg: GPTConfig, family: str) -> dict:
    """An HF config.json dict for `cfg` as a `family` model (`LlamaConfig(**d)`, `AutoConfig.for_model(**d)`); a
    setting that the family cannot express is refused by name (ValueError), never dropped.

    RoPE is written in both the transformers-5 form (`rope_parameters`) and the older one (`rope_theta` +
    `rope_scaling`), so either generation of transformers reads it."""
    if family not in FAMILIES:
        raise ValueError(f"family {family!r} is not supported; supported: {sorted(FAMILIES)}")
    _check_expressible(cfg, family)
    features = {k: getattr(cfg, k) for k in FAMILY_FEATURES[family]}
    if features != FAMILY_FEATURES[family]:
        raise ValueError(f"{', '.join(f'{k}={v}' for k, v in features.items())} cannot be expressed as a {family} "
                         f"model, which has {FAMILY_FEATURES[family]} (llama's attention_bias also biases o_proj); "
                         f"families that fit: {[f for f in FAMILIES if family_fits(cfg, f)]}")
    scaling = None
    if cfg.rope_scaling is not None:
        s = cfg.rope_scaling
        scaling = {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                   "high_freq_factor": s.high_freq_factor,
                   "original_max_position_embeddings": s.original_max_position_embeddings}
    rope_parameters = {**(scaling or {"rope_type": "default"}), "rope_theta": cfg.rope_theta}
    d = {
        "architectures": [FAMILIES[family]], "model_type": family,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len, "initializer_range": cfg.init_std,
        "rms_norm_eps": cfg.rms_norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
        "rope_parameters": rope_parameters, "rope_theta": cfg.rope_theta, "rope_scaling": scaling,
        "attention_dropout": 0.0, "dtype": "float32", "torch_dtype": "float32",
    }
    if family == "llama":
        d.update(attention_bias=False, mlp_bias=False)
    elif family == "mistral":
        d.update(sliding_window=None)
    else:
        d.update(use_sliding_window=False, sliding_window=None)
    if family == "qwen3":
        d.update(attention_bias=False)
    return d


# ------------------------------------------------------------------------------------------------------ state dicts

HF_PARTS: dict[str, tuple[str, ...]] = {
    "embed.weight": ("model.embed_tokens.weight",),
    "blocks.{i}.attn_norm.weight": ("model.layers.{i}.input_layernorm.weight",),
    "blocks.{i}.attn.qkv.weight": tuple(f"model.layers.{{i}}.self_attn.{x}_proj.weight" for x in "qkv"),
    "blocks.{i}.attn.qkv.bias": tuple(f"model.layers.{{i}}.self_attn.{x}_proj.bias" for x in "qkv"),
    "blocks.{i}.attn.q_norm.weight": ("model.layers.{i}.self_attn.q_norm.weight",),
    "blocks.{i}.attn.k_norm.weight": ("model.layers.{i}.self_attn.k_norm.weight",),
    "blocks.{i}.attn.out.weight": ("model.layers.{i}.self_attn.o_proj.weight",),
    "blocks.{i}.mlp_norm.weight": ("model.layers.{i}.post_attention_layernorm.weight",),
    "blocks.{i}.mlp.gate_up.weight": ("model.layers.{i}.mlp.gate_proj.weight", "model.layers.{i}.mlp.up_proj.weight"),
    "blocks.{i}.mlp.down.weight": ("model.layers.{i}.mlp.down_proj.weight",),
    "norm.weight": ("model.norm.weight",),
    "head.weight": ("lm_head.weight",),
}
"""Our canonical name (a block's with {i}) -> the HF tensors it holds, stacked on dim 0 in the order of its ShardSpec
sections (q | k | v, gate | up). Names and shapes come from the model's own inventory; this table only maps them."""

_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)")


def _layout(cfg: GPTConfig) -> Iterator[tuple[str, list[tuple[str, tuple[int, ...]]]]]:
    """(our name, [(HF name, HF shape), ...]) for every parameter of the model's inventory, in model order."""
    for ours, info in model_inventory(cfg).items():
        block = _BLOCK.fullmatch(ours)
        key = f"blocks.{{i}}.{block[2]}" if block else ours
        if key not in HF_PARTS:
            raise KeyError(f"parameter {ours!r} has no Hugging Face name: add {key!r} to models.hf.HF_PARTS")
        names = [n.format(i=block[1]) if block else n for n in HF_PARTS[key]]
        if len(names) == 1:
            yield ours, [(names[0], info.full_shape)]
            continue
        sections = info.shard.sections  # the stacked parts, in order
        if len(sections) != len(names):
            raise ValueError(f"parameter {ours!r} stacks {len(sections)} parts, HF_PARTS names {len(names)}")
        yield ours, [(n, (rows,) + info.full_shape[1:]) for n, rows in zip(names, sections)]


def _stacked_shape(parts: list[tuple[str, tuple[int, ...]]]) -> tuple[int, ...]:
    return (sum(shape[0] for _, shape in parts),) + parts[0][1][1:]


def hf_names(cfg: GPTConfig) -> list[str]:
    """HF tensor names a checkpoint of `cfg` holds (no `lm_head.weight` when the embeddings are tied)."""
    return [name for _, parts in _layout(cfg) for name, _ in parts]


def our_names(cfg: GPTConfig) -> list[str]:
    """Our full (unsharded) parameter names for `cfg`: its inventory's."""
    return list(model_inventory(cfg))


def _fetch(get: Callable[[str], torch.Tensor], name: str, shape: tuple[int, ...], source: str) -> torch.Tensor:
    try:
        t = get(name)
    except KeyError:
        raise KeyError(f"{source} state dict is missing tensor {name!r} (expected shape {shape})") from None
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{source} tensor {name!r} has the wrong shape: expected {tuple(shape)}, got {tuple(t.shape)}")
    return t


def hf_to_ours(get_hf: Callable[[str], torch.Tensor], cfg: GPTConfig,
               only: Optional[Container[str]] = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream (our name, full tensor) from an HF getter (`state.__getitem__`, safetensors `get_tensor`), fusing
    q,k,v and gate,up; with `only`, HF tensors behind other names are never read."""
    for ours, parts in _layout(cfg):
        if only is not None and ours not in only:
            continue
        tensors = [_fetch(get_hf, name, shape, "HF") for name, shape in parts]
        yield ours, tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=0)


def ours_to_hf(get_ours: Callable[[str], torch.Tensor], cfg: GPTConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream (HF name, tensor) from a getter of our full tensors, splitting qkv and gate_up (the split parts are
    copies, so safetensors never sees shared storage)."""
    for ours, parts in _layout(cfg):
        t = _fetch(get_ours, ours, _stacked_shape(parts), "our")
        if len(parts) == 1:
            yield parts[0][0], t
            continue
        for (name, _), piece in zip(parts, t.split([shape[0] for _, shape in parts], dim=0)):
            yield name, piece.clone()


# -------------------------------------------------------------------------------------------- Meta RoPE layout

def permute_for_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta's interleaved-pair q/k rows (per head: re0, im0, re1, im1, ...) -> the half-split HF/our layout
    (per head: re0, re1, ..., im0, im1, ...). Works on weights (rows, in) and biases (rows,)."""
    rows = w.shape[0]
    hd = rows // n_heads
    return w.reshape(n_heads, hd // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of `permute_for_rope`: HF/our half-split q/k rows -> Meta's interleaved pairs."""
    rows = w.shape[0]
    hd = rows // n_heads
    return w.reshape(n_heads, 2, hd // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


# ------------------------------------------------------------------------------------------------- convenience

_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # persistent buffers of old checkpoints; recomputed from the config


@torch.no_grad()
def load_hf_state_dict_into(model: GPT, hf_state: Mapping[str, torch.Tensor], strict: bool = True) -> None:
    """Copy an HF state dict into `model` (single device, TP-sharded, or one pipeline stage): each parameter the
    model holds gets its shard of the converted full tensor. `strict` rejects HF tensors we would drop."""
    cfg = model.cfg
    if strict:
        known = set(hf_names(cfg)) | ({"lm_head.weight"} if cfg.tie_embeddings else set())
        unexpected = sorted(k for k in hf_state if k not in known and not k.endswith(_IGNORED_SUFFIXES))
        if unexpected:
            raise ValueError(f"HF state dict has tensors this {type(model).__name__} has no place for: "
                             f"{unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    params = dict(model.canonical_parameters())
    tp = model.tp_group
    loaded = set()
    for name, full in hf_to_ours(hf_state.__getitem__, cfg, only=params):
        p = params[name]
        info = param_info(p)
        if tuple(full.shape) != info.full_shape:
            raise ValueError(f"parameter {name!r}: expected full shape {info.full_shape}, got {tuple(full.shape)}")
        p.copy_(shard(full, info.shard, tp.rank, tp.size))
        loaded.add(name)
    left = sorted(set(params) - loaded)
    if left:
        raise KeyError(f"parameters not covered by the HF layout: {left}")


@torch.no_grad()
def gpt_state_to_hf(model: GPT) -> dict[str, torch.Tensor]:
    """The HF state dict of a single-device, whole (all layers) model; tensors that are not split alias the
    model's parameters, like `state_dict()`."""
    if model.tp_group.size != 1:
        raise ValueError(f"gpt_state_to_hf needs a single-device model, got tp={model.tp_group.size}: gather the "
                         "shards first (parallel.tensor.gather_full) and call ours_to_hf")
    params = {name: p.detach() for name, p in model.canonical_parameters()}
    missing = [n for n in our_names(model.cfg) if n not in params]
    if missing:
        raise ValueError(f"gpt_state_to_hf needs the whole model; this one lacks {missing[:4]} (a pipeline stage?)")
    return dict(ours_to_hf(params.__getitem__, model.cfg))
