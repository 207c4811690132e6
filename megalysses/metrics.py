"""Throughput accounting: model FLOPs per token and the peak rates MFU is measured against (sinks.py logs them)."""
from __future__ import annotations

import time

import torch

from megalysses.config import RunConfig
from megalysses.models.config import GPTConfig

PEAK_TFLOPS = {"cuda": 989.0, "cpu": None}  # dense bf16 H100/H200; no meaningful peak on CPU


def flops_per_token(cfg: GPTConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 3x forward), causal attention counted as half.

    Forward per token: 2 * (matmul params) for the linear layers and LM head, plus per layer
    2 * 2 * seq_len * heads * head_dim / 2 for QK^T and PV under a causal mask.
    """
    d, f, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    linear = L * (d * (cfg.q_size + 2 * cfg.kv_size) + cfg.q_size * d + 3 * d * f) + cfg.vocab_size * d
    attention = L * 2 * seq_len * cfg.num_heads * cfg.head_dim
    return 3 * (2 * linear + attention)


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
        peak = PEAK_TFLOPS[self.device.type]
        return {"tokens_per_s": self.tokens_per_step * steps / elapsed, "tflops_per_device": tflops,
                "mfu": tflops / peak if peak else None,
                "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if self.device.type == "cuda" else None}
