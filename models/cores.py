"""Local attention cores (run inside the Ulysses head-sharded region) and packed-document masks."""
from __future__ import annotations

from dataclasses import dataclass, field
import dataclasses
import functools
import logging
from typing import Optional

import torch
import torch.nn.functional as F

from megalysses.parallel.sequence.ring import REFERENCE_CORE, BlockCore
from megalysses.parallel.sequence.ring_cores import FlashBlockCore, FlexBlockCore

from .config import ATTENTION_CORES

logger = logging.getLogger("megalysses")


@dataclass
class Documents:
    """Which document each token of the whole sequence belongs to, derived from global position_ids.

    A document starts wherever a position does not continue the previous one (position_ids reset at the start
    of each packed document). `doc_ids` is None when every row is one document (plain causal attention).
    """

    doc_ids: Optional[torch.Tensor]  # (b, s) int, or None
    _mask: Optional[torch.Tensor] = field(default=None, repr=False)
    _cu: Optional[tuple[torch.Tensor, int]] = field(default=None, repr=False)

    @staticmethod
    def from_positions(position_ids: torch.Tensor) -> "Documents":
        starts = position_ids[:, 1:] != position_ids[:, :-1] + 1  # (b, s - 1)
        if not bool(starts.any()):
            return Documents(None)
        doc_ids = torch.cat([torch.zeros_like(position_ids[:, :1]), starts.long().cumsum(dim=1)], dim=1)
        return Documents(doc_ids)

    def causal_mask(self) -> torch.Tensor:
        """Block-diagonal causal mask (b, 1, s, s): token i sees token j <= i of its own document."""
        if self._mask is None:
            d = self.doc_ids
            s = d.shape[1]
            causal = torch.ones(s, s, dtype=torch.bool, device=d.device).tril()
            self._mask = (causal & (d.unsqueeze(2) == d.unsqueeze(1))).unsqueeze(1)
        return self._mask

    def cu_seqlens(self) -> tuple[torch.Tensor, int]:
        """Cumulative document lengths over the flattened (b * s) tokens, and the longest document (varlen kernels);
        computed once per forward and shared by every layer."""
        if self._cu is None:
            b, s = self.doc_ids.shape
            flat = (self.doc_ids + torch.arange(b, device=self.doc_ids.device).unsqueeze(1) * (s + 1)).reshape(-1)
            lengths = torch.unique_consecutive(flat, return_counts=True)[1]
            cu = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).to(torch.int32)
            self._cu = (cu, int(lengths.max()))
        return self._cu


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, docs: Optional[Documents] = None,
                   scale: Optional[float] = None) -> torch.Tensor:
    """Causal attention with torch SDPA (cuDNN / flash / math kernels): (b, s, hq, d), (b, s, hk, d) -> (b, s, hq, d)."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (b, h, s, d)
    gqa = q.shape[1] != k.shape[1]
    if docs is None or docs.doc_ids is None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=docs.causal_mask(), scale=scale, enable_gqa=gqa)
    return out.transpose(1, 2)


class FlashAttentionUnavailable(RuntimeError):
    """flash-attn was requested where it is not installed or cannot run."""


def find_flash_attn():
    """(name, dense fn, varlen fn) of the installed flash-attn: flash-attn-4's CuTe interface (Hopper and newer)
    or the classic flash-attn 2/3 functions; None when neither imports."""
    try:
        from flash_attn.cute import flash_attn_func, flash_attn_varlen_func
        return "flash-attn-4", flash_attn_func, flash_attn_varlen_func
    except (ImportError, OSError, RuntimeError):
        pass
    try:
        from flash_attn import flash_attn_func, flash_attn_varlen_func
        return "flash-attn-2", flash_attn_func, flash_attn_varlen_func
    except (ImportError, OSError, RuntimeError):
        return None


class FlashAttention:
    """flash-attn on the head-sharded tensors: native (b, s, h, d) layout, GQA without repeating kv heads, and
    packed documents through cu_seqlens (varlen)."""

    def __init__(self, found):
        self.name, self.dense, self.varlen = found

    def __call__(self, q, k, v, docs: Optional[Documents] = None, scale: Optional[float] = None):
        if docs is None or docs.doc_ids is None:
            return _first(self.dense(q, k, v, softmax_scale=scale, causal=True))
        b, s, h, d = q.shape
        cu, longest = docs.cu_seqlens()
        flat = [t.reshape(b * s, t.shape[2], d) for t in (q, k, v)]  # documents back to back
        out = self.varlen(*flat, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=longest, max_seqlen_k=longest,
                          softmax_scale=scale, causal=True)
        return _first(out).view(b, s, h, d)


def _first(out):
    return out[0] if isinstance(out, tuple) else out  # flash-attn-4 also returns the log-sum-exp


def flash_core():
    """The flash-attn core, or a clear error saying why it cannot run here."""
    if not torch.cuda.is_available():
        raise FlashAttentionUnavailable("attention_core 'flash' needs a CUDA GPU and none is visible; use 'sdpa'")
    found = find_flash_attn()
    if found is None:
        raise FlashAttentionUnavailable(
            "attention_core 'flash' needs flash-attn: `pip install flash-attn-4` (Hopper and newer) or "
            "`pip install --no-build-isolation flash-attn` (flash-attn 2); or use 'sdpa' or 'auto'")
    if found[0] == "flash-attn-4" and torch.cuda.get_device_capability()[0] < 9:
        raise FlashAttentionUnavailable(f"flash-attn-4 needs compute capability 9.0 or newer (Hopper); this GPU has "
                                        f"{torch.cuda.get_device_capability()}: use 'sdpa' or install flash-attn 2")
    return FlashAttention(found)


def choose_auto_core() -> tuple[str, str]:
    """(core name, reason) for 'auto': flash-attn-4 on Hopper when installed (fastest measured), else SDPA."""
    if not torch.cuda.is_available():
        return "sdpa", "no CUDA device"
    found = find_flash_attn()
    if found is None:
        return "sdpa", "flash-attn is not installed"
    if found[0] == "flash-attn-4" and torch.cuda.get_device_capability()[0] >= 9:
        return "flash", "flash-attn-4 on a Hopper-class GPU"
    return "sdpa", f"{found[0]} is installed, but SDPA's cuDNN kernels are faster on this GPU"


def resolve_auto_core(cfg):
    """The model config with attention_core 'auto' replaced by the core it picks, logging which and why (the one
    place 'auto' is decided)."""
    if cfg.attention_core != "auto":
        return cfg
    name, reason = choose_auto_core()
    logger.info("attention core: %s (%s)", name, reason)
    return dataclasses.replace(cfg, attention_core=name)


def build_attention_core(name: str, heads: int, kv_heads: int, head_dim: int, scale: Optional[float] = None):
    """The local attention core for a config name (not 'auto': resolve_auto_core first), built for `heads` /
    `kv_heads` per rank inside the Ulysses head-sharded region."""
    if name == "sdpa":
        return sdpa_attention
    if name == "flash":
        return flash_core()
    if name == "te":
        from .te import TEAttentionCore

        return TEAttentionCore(heads, kv_heads, head_dim, scale)
    if name in RING_ONLY_CORES:
        raise ValueError(f"attention_core = {name!r} is a ring block core: it runs only under layout.ring > 1; "
                         "without a ring choose 'sdpa', 'flash', 'te' or 'auto'")
    raise ValueError(f"attention_core = {name!r}: choose one of {', '.join(c for c in ATTENTION_CORES if c != 'auto')} "
                     "(resolve 'auto' with resolve_auto_core(cfg) first)")


# ------------------------------------------------------------------------------------- the ring's block cores

RING_ONLY_CORES = ("flex", "reference")


def ring_block_core_name(name: str, cuda: bool) -> str:
    """Which block core a (resolved) attention_core runs under a ring: 'sdpa' is torch's own, FlexAttention on CUDA
    and the fp32 reference on CPU (SDPA returns no log-sum-exp); 'te' is refused (no log-sum-exp either)."""
    if name == "sdpa":
        return "flex" if cuda else "reference"
    if name == "te":
        raise ValueError("attention_core = 'te' cannot run under layout.ring: Transformer Engine's fused attention "
                         "returns no log-sum-exp for the ring's merge; use 'auto', 'flash', 'flex' or 'reference'")
    if name not in ("flash",) + RING_ONLY_CORES:
        raise ValueError(f"attention_core = {name!r} under layout.ring: choose one of sdpa, flash, flex, reference, "
                         "auto (resolve 'auto' with resolve_auto_core(cfg) first)")
    return name


@functools.lru_cache(maxsize=None)
def build_ring_block_core(name: str) -> BlockCore:
    """The ring's block core for a resolved attention_core name, one per process (FlexAttention compiles once), or a
    clear error saying why it cannot run here."""
    cuda = torch.cuda.is_available()
    chosen = ring_block_core_name(name, cuda)
    logger.info("ring block core: %s (attention_core %s, %s)", chosen, name, "CUDA" if cuda else "no CUDA device")
    if chosen == "reference":
        return REFERENCE_CORE
    if chosen == "flex":
        return FlexBlockCore()
    found = find_flash_attn() if cuda else None
    if found is None or found[0] != "flash-attn-4" or torch.cuda.get_device_capability()[0] < 9:
        raise FlashAttentionUnavailable(
            "attention_core 'flash' under layout.ring needs flash-attn-4 (its log-sum-exp and backward) on a "
            "Hopper-class CUDA GPU: `pip install flash-attn-4`; or use 'auto', 'flex' or 'reference'")
    try:
        return FlashBlockCore(documents=FlexBlockCore())
    except (ImportError, AttributeError) as e:  # a flash-attn-4 without the backward entry point the ring calls
        raise FlashAttentionUnavailable(f"attention_core 'flash' under layout.ring: this flash-attn-4 lacks "
                                        f"flash_attn.cute.interface._flash_attn_bwd ({e}); use 'flex'") from e
