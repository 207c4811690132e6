"""One build for every layout and backend: this rank's model chunks, and the inventory of the model's parameters."""
from __future__ import annotations

import dataclasses
import functools
from types import MappingProxyType
from typing import Mapping, Optional

import torch
import torch.nn as nn

from megalysses.parallel.mesh import ParallelMesh
from megalysses.parallel.pipeline import local_virtual_stages, stage_layer_ids
from megalysses.parallel.tensor import ParamInfo, param_info, update_param_info

from .config import GPTConfig, MemoryConfig
from .cores import resolve_auto_core
from .gpt import GPT
from .spec import TORCH_SPEC, LayerSpec, layer_spec


def build_model(cfg: GPTConfig, mesh: ParallelMesh, memory: MemoryConfig = MemoryConfig(),
                spec: Optional[LayerSpec] = None) -> nn.ModuleList:
    """This rank's model chunks, one per virtual pipeline stage it runs (the whole model when pp = vpp = 1), every
    one built with the layers of cfg.backend (or `spec`). Chunk c is virtual stage c * pp + rank: the embedding on
    virtual stage 0, final norm + head + loss on the last, which also holds the tied embedding (a pipeline duplicate:
    its gradient is summed with the first stage's copy, which alone is counted and saved). Parameters are not
    initialised: call init_weights / init_on_device."""
    spec = spec or layer_spec(cfg.backend)
    cfg = resolve_auto_core(cfg)  # once for every chunk
    pp, vpp = mesh.size("pp"), mesh.layout.vpp
    layers = stage_layer_ids(mesh.layout, cfg.num_layers)
    last = pp * vpp - 1
    chunks = [GPT(cfg, mesh, spec, layer_ids=layers[v], pre_process=v == 0, post_process=v == last, memory=memory)
              for v in local_virtual_stages(pp, vpp, mesh.rank("pp"))]
    for c in chunks:
        if c.post_process and not c.pre_process and cfg.tie_embeddings:
            update_param_info(c.embed.weight, pipeline_duplicate=True)
    return nn.ModuleList(chunks)


@functools.lru_cache(maxsize=32)
def model_inventory(cfg: GPTConfig) -> Mapping[str, ParamInfo]:
    """Every parameter of the whole model, canonical name -> ParamInfo (full shape, how tp splits it), in model
    order: what checkpoints hold, what conversion and the HF adapters map. Read off the model itself, built once on
    the meta device (no memory) with the torch layers, whose names are the canonical ones of every backend."""
    torch_cfg = dataclasses.replace(cfg, backend="torch", attention_core="sdpa")
    with torch.device("meta"):
        model = GPT(torch_cfg, ParallelMesh.single_device(), TORCH_SPEC)
    return MappingProxyType({name: param_info(p) for name, p in model.canonical_parameters()})


def same_parameters(a: GPTConfig, b: GPTConfig) -> bool:
    """Whether two model configs have the same parameters (names and full shapes): weights of one load into the
    other, however each is sharded."""
    return ([(n, i.full_shape) for n, i in model_inventory(a).items()] ==
            [(n, i.full_shape) for n, i in model_inventory(b).items()])
