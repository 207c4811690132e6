"""AdamW with weight-decay exclusions, the data-parallel gradient sync + optimizer per ZeRO level, and the
learning-rate schedules."""
from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence

import torch

from megalysses.parallel import ParallelMesh
from megalysses.parallel.dp import (BucketedDataParallel, DataParallel, DistributedOptimizer, FullyShardedDataParallel,
                                    GradSync, fully_shard_model)

from .config import TrainConfig

DEFAULT_BUCKET_MB = 25.0
"""Main-gradient bucket size (fp32 MB) of the overlapped gradient reduction (PyTorch DDP's default)."""


def param_groups(params: Iterable[torch.nn.Parameter], weight_decay: float) -> list[dict]:
    """AdamW groups: matrices (ndim >= 2) decay; norm weights and biases (1-D) do not."""
    params = [p for p in params if p.requires_grad]
    return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]


def _adamw_kwargs(cfg: TrainConfig, device_type: str) -> dict:
    """lr, betas, eps, and fused=True when training on CUDA (the fused kernel; also on the host for state offloaded
    there). CPU runs keep torch's default kernel, with or without offload, so the two agree bitwise."""
    return dict(lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
                fused=True if device_type == "cuda" else None)


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, device_type: str) -> torch.optim.AdamW:
    """AdamW (fused when training on CUDA) on the model's own parameters; norms and biases (1-D params) get no
    weight decay."""
    return torch.optim.AdamW(param_groups(model.parameters(), cfg.weight_decay), **_adamw_kwargs(cfg, device_type))


def build_data_parallel(model: torch.nn.Module, mesh: ParallelMesh, cfg: TrainConfig,
                        shard_modules: Sequence[torch.nn.Module] = (), bucket_mb: float = DEFAULT_BUCKET_MB
                        ) -> DataParallel:
    """The gradient sync + AdamW for mesh.layout.zero; call after init_weights, with the model in float32.

    zero 0: bucketed all-reduce over dp x ring x sp overlapped with backward; fp32 masters of the whole model.
    zero 1: bucketed reduce-scatter; masters and AdamW state sharded over dp x ring x sp; params all-gathered after step.
    zero 3: FSDP2 over dp x ring x sp, one unit per `shard_modules` entry (e.g. the blocks); AdamW on the sharded params.
    train.dtype 'bfloat16' makes the parameters bf16 (masters, main gradients and optimizer state stay fp32).
    train.offload_optimizer keeps the fp32 masters and AdamW moments in host memory (zero 0/1: streamed through the
    device for the step, bitwise as without; zero 3: FSDP2's CPU offload, stepped on the host).
    """
    param_dtype: Optional[torch.dtype] = torch.bfloat16 if cfg.dtype == "bfloat16" else None
    if mesh.layout.zero == 3:
        sync = fully_shard_model(model, mesh, shard_modules, param_dtype, offload=cfg.offload_optimizer)
        return FullyShardedDataParallel(sync, build_optimizer(model, cfg, mesh.device_type))
    sync = GradSync(model.parameters(), mesh, bucket_mb=bucket_mb, shard=mesh.layout.zero == 1)
    groups = param_groups(model.parameters(), cfg.weight_decay)
    optimizer = DistributedOptimizer(groups, sync, torch.optim.AdamW, param_dtype=param_dtype,
                                     offload=cfg.offload_optimizer, **_adamw_kwargs(cfg, mesh.device_type))
    if cfg.offload_optimizer:  # the next forward waits only for the step of the layer it runs
        optimizer.wait_for_step(model.modules())
    return BucketedDataParallel(sync, optimizer)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup to lr at step warmup_steps - 1, then cosine
    or wsd (both reach min_lr at the last step, steps - 1) or constant."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    if cfg.lr_schedule == "cosine":
        progress = (step + 1 - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)  # 1 at the last step
        return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))
    decay_steps = max(1, int(cfg.steps * cfg.decay_fraction))  # wsd: stable, then linear decay at the end
    into_decay = step - (cfg.steps - decay_steps)
    if into_decay < 0:
        return cfg.lr
    return cfg.lr + (cfg.min_lr - cfg.lr) * min(1.0, (into_decay + 1) / decay_steps)
