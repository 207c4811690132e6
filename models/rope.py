"""Rotary position embeddings (RoPE), with Llama-3 frequency scaling; positions are always global."""
from __future__ import annotations

import math
from typing import Optional

import torch

from megalysses.parallel.kernel_fusion import fused

from .config import RopeScaling


def rope_inv_freq(head_dim: int, theta: float, scaling: Optional[RopeScaling] = None) -> torch.Tensor:
    """Inverse frequencies (head_dim / 2,), float32, Llama-3-scaled when `scaling` is given."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv_freq
    old_len = scaling.original_max_position_embeddings
    low_wavelen, high_wavelen = old_len / scaling.low_freq_factor, old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_cos_sin(position_ids: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    """cos, sin of shape (b, s, 1, head_dim) for (b, s) integer positions."""
    freqs = position_ids.unsqueeze(-1).float() * inv_freq.to(position_ids.device)  # (b, s, head_dim / 2)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype).unsqueeze(2), emb.sin().to(dtype).unsqueeze(2)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


@fused
def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (b, s, h, head_dim) by the angles in cos / sin (b, s, 1, head_dim); half-split (HF) convention.
    The result keeps x's dtype (under autocast x may be bf16 while cos / sin are float32). One kernel on CUDA."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + _rotate_half(x) * sin
