"""Throughput accounting (model FLOPs, MFU) and MetricsLog (metrics.jsonl + progress line; see sinks.py for all)."""
from __future__ import annotations

from pathlib import Path

from megalysses.models.config import GPTConfig

from .sinks import JsonlSink, ProgressLine, close_all

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


class MetricsLog:
    """Rank 0's metrics.jsonl and progress line: MetricsSinks without wandb and TensorBoard (enabled=False: no-op)."""

    def __init__(self, run_dir: Path | str, enabled: bool, total_steps: int, start_step: int = 0):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.progress = ProgressLine(total_steps, start_step)
        self.sinks: list = [JsonlSink(run_dir), self.progress] if enabled else []

    def log(self, step: int, metrics: dict) -> None:
        for sink in self.sinks:
            sink.log(step, metrics)

    def line(self, step: int, metrics: dict) -> str:
        return self.progress.line(step, metrics)

    def close(self) -> None:
        close_all(self.sinks)
