"""Throughput accounting: model and hardware FLOPs per token, and the peak rates MFU is measured against.

FLOP counting (BENCHMARKS.md repeats it): a matmul of (m, k) by (k, n) is 2mkn FLOPs. Forward, per token:
  attention projections  L * 2 * d * (q + 2 kv + q)        q = heads * head_dim, kv = kv_heads * head_dim
  attention core         L * 2 * S * heads * head_dim      QK^T and PV, 4 S heads head_dim, halved by the causal mask
  MLP (SwiGLU)           L * 2 * 3 * d * f
  LM head                2 * d * vocab
Model FLOPs (MFU) = 3x forward (backward = 2x forward), whatever is recomputed. Hardware FLOPs add each forward that
the memory savers re-run: full recompute one more block forward, around_core one more block forward except the
attention core, selective one more attention core, MLP tiles one more MLP (on top of a recomputed block too: the
tiles nest), loss tiles one more LM head. Norms, RoPE, softmax and the flash-attention backward's own recomputation
of the scores are not counted.
"""
from __future__ import annotations

import time

import torch

from megalysses.config import RunConfig
from megalysses.models.config import GPTConfig, MemoryConfig

PEAK_TFLOPS = {"cuda": 989.0, "cpu": None}  # dense bf16 H100/H200; no meaningful peak on CPU


def mfu(tflops_per_device: float, device_type: str):
    """Model FLOPs utilisation against the dense bf16 peak of the device type (None where there is none: CPU)."""
    peak = PEAK_TFLOPS[device_type]
    return tflops_per_device / peak if peak else None


def forward_flops_per_token(cfg: GPTConfig, seq_len: int) -> dict[str, float]:
    """Forward FLOPs per token by part: attention projections, attention core (causal), MLP, LM head."""
    d, f, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    return {"attn_proj": L * 2 * d * (2 * cfg.q_size + 2 * cfg.kv_size),
            "attn_core": L * 2 * seq_len * cfg.num_heads * cfg.head_dim,
            "mlp": L * 2 * 3 * d * f,
            "head": 2 * d * cfg.vocab_size}


def flops_per_token(cfg: GPTConfig, seq_len: int) -> float:
    """Model training FLOPs per token: 3x the forward (forward + backward), causal attention counted as half."""
    return 3 * sum(forward_flops_per_token(cfg, seq_len).values())


def recomputed_forwards(memory: MemoryConfig) -> dict[str, int]:
    """Extra forwards of each part that the memory savers re-run in backward (the tiles nest inside a recomputed
    block: an MLP in tiles under full recompute runs three forwards)."""
    redo = dict.fromkeys(("attn_proj", "attn_core", "mlp", "head"), 0)
    if memory.recompute in ("full", "around_core"):
        redo["attn_proj"] += 1
        redo["mlp"] += 1
    if memory.recompute in ("full", "selective"):
        redo["attn_core"] += 1
    if memory.mlp_tiles > 1:
        redo["mlp"] += 1
    if memory.loss_tiles > 1 and not memory.fused_loss:  # the fused head + loss forms its gradients in forward
        redo["head"] += 1
    return redo


def hardware_flops_per_token(cfg: GPTConfig, memory: MemoryConfig, seq_len: int) -> float:
    """Training FLOPs per token the device executes: the model FLOPs plus the forwards the memory savers re-run."""
    fwd = forward_flops_per_token(cfg, seq_len)
    redo = recomputed_forwards(memory)
    return flops_per_token(cfg, seq_len) + sum(fwd[part] * n for part, n in redo.items())


def matmul_tflops(device: torch.device, n: int = 8192, iters: int = 30) -> float:
    """Measured dense bf16 matmul rate (n x n x n) on this GPU: the practical ceiling MFU is also reported against."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    torch.cuda.synchronize(device)
    tic = time.perf_counter()
    for _ in range(iters):
        a @ b
    torch.cuda.synchronize(device)
    return 2 * n ** 3 * iters / (time.perf_counter() - tic) / 1e12


class Throughput:
    """Tokens/s, model TFLOP/s and MFU per device, and peak memory, over the steps since the last call."""

    def __init__(self, cfg: RunConfig, world: int, device: torch.device):
        self.world, self.device = world, device
        self.tokens_per_step = cfg.train.global_batch_size * cfg.train.seq_len
        self.flops_per_step = flops_per_token(cfg.model, cfg.train.seq_len) * self.tokens_per_step
        self.last_step, self.tic = 0, time.monotonic()

    def since_last(self, step: int) -> dict:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        elapsed, steps = time.monotonic() - self.tic, step - self.last_step
        self.last_step, self.tic = step, time.monotonic()
        tflops = self.flops_per_step * steps / elapsed / self.world / 1e12
        return {"tokens_per_s": self.tokens_per_step * steps / elapsed, "tflops_per_device": tflops,
                "mfu": mfu(tflops, self.device.type),
                "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if self.device.type == "cuda" else None}
