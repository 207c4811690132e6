"""Throughput accounting (model FLOPs, MFU) and the metrics sinks: progress line and metrics.jsonl."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

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


class MetricsLog:
    """Rank 0 writes one JSON object per logged step to metrics.jsonl and prints a progress line."""

    def __init__(self, run_dir: Path, enabled: bool, total_steps: int):
        self.enabled, self.total_steps = enabled, total_steps
        self.path = Path(run_dir) / "metrics.jsonl"
        self.start = time.monotonic()
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file = self.path.open("a")

    def log(self, step: int, metrics: dict, eta_steps: Optional[int] = None) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.monotonic() - self.start, 3), **metrics}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        print(self.line(step, metrics), flush=True)

    def line(self, step: int, m: dict) -> str:
        elapsed = time.monotonic() - self.start
        eta = elapsed / max(step, 1) * (self.total_steps - step)
        parts = [f"step {step:>5}/{self.total_steps}"]
        for key, fmt in (("loss", "loss {:.4f}"), ("val_loss", "val {:.4f}"), ("lr", "lr {:.2e}"),
                         ("grad_norm", "gnorm {:.3f}"), ("tokens_per_s", "{:,.0f} tok/s"),
                         ("tflops_per_device", "{:.3g} TFLOP/s/dev"), ("mfu", "MFU {:.1%}"),
                         ("peak_mem_gib", "mem {:.2f} GiB")):
            if m.get(key) is not None:
                parts.append(fmt.format(m[key]))
        parts.append(f"ETA {eta:,.0f}s")
        return " | ".join(parts)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
