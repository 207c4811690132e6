"""Local attention cores (run inside the Ulysses head-sharded region) and packed-document masks."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F


@dataclass
class Documents:
    """Which document each token of the whole sequence belongs to, derived from global position_ids.

    A document starts wherever a position does not continue the previous one (position_ids reset at the start
    of each packed document). `doc_ids` is None when every row is one document (plain causal attention).
    """

    doc_ids: Optional[torch.Tensor]  # (b, s) int, or None
    _mask: Optional[torch.Tensor] = field(default=None, repr=False)

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
        """Cumulative document lengths over the flattened (b * s) tokens, and the longest document (varlen kernels)."""
        b, s = self.doc_ids.shape
        flat = (self.doc_ids + torch.arange(b, device=self.doc_ids.device).unsqueeze(1) * (s + 1)).reshape(-1)
        lengths = torch.unique_consecutive(flat, return_counts=True)[1]
        cu = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).to(torch.int32)
        return cu, int(lengths.max())


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


ATTENTION_CORES = {"sdpa": sdpa_attention}


def attention_core(name: str):
    """The attention function for a config name; unknown names list the available ones."""
    if name not in ATTENTION_CORES:
        raise ValueError(f"attention_core = {name!r} is not available here; choose one of {sorted(ATTENTION_CORES)}")
    return ATTENTION_CORES[name]
