"""Fixed-length training samples cut from whole documents: packed with EOS between them, or one per row, padded.

An epoch is a seeded permutation of the documents, laid end to end with an EOS after each one: the epoch's
*stream* of T = tokens + documents ids. Sample i of the epoch is stream window w = order[i] (a second seeded
permutation), the seq_len + 1 ids at [w * seq_len, w * seq_len + seq_len + 1): input_ids = window[:-1],
labels = window[1:]. Consecutive windows overlap by one id, so every stream id is a label target exactly once per
epoch (the first id, a document start, is never predicted) and an input exactly once (all but the final EOS); the
last window is padded. samples_per_epoch = ceil((T - 1) / seq_len).

- position_ids count from 0 at each document start and at the row start: a document continued from the previous
  window restarts at 0. Under RoPE attention depends only on position differences, and a row never sees the part
  of its document in the previous window, so nothing is lost; positions stay < seq_len (no float drift on very long
  documents, no positions past model.max_seq_len). The model's `Documents.from_positions` turns each reset into a
  document boundary, so attention never crosses documents.
- loss_mask (and labels = IGNORE_INDEX where it is False): a target is trained when it belongs to the input's
  document. The EOS closing a document is predicted from its last token; the first token of the next document is
  not predicted from the previous EOS (it would be guessed with no context). A document of n tokens thus trains
  n targets (its tokens 2..n and its EOS); an empty document trains none. Padding is never trained.
- mode 'pad': sample i is document order[i] alone, truncated to seq_len + 1 ids (document + EOS), padded after;
  tokens past seq_len + 1 of a longer document are dropped. samples_per_epoch = number of documents.

Padding ids are the EOS id; padding positions continue the last document's positions (as `pad_sequence_batch`).
Samples are addressed by a global index (epoch = index // samples_per_epoch), so any sample is reproducible from
(seed, index) alone; orders come from `torch.randperm` and are stable for a given torch version.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from megalysses.parallel.sequence import IGNORE_INDEX

from .indexed import IndexedDataset

MODES = ("pack", "pad")


def seeded_generator(*parts: int) -> torch.Generator:
    """A CPU generator seeded from integers, stable across runs and processes (no Python hash randomisation)."""
    digest = hashlib.blake2b(repr(tuple(int(p) for p in parts)).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


@dataclass
class Batch:
    """Training rows, each (b, s) (or (s,) for one sample); int64 ids, labels and positions, bool loss_mask."""

    input_ids: torch.Tensor     # (b, s)
    labels: torch.Tensor        # (b, s) next-token targets, IGNORE_INDEX where loss_mask is False
    position_ids: torch.Tensor  # (b, s) 0 at each document start and at the row start
    loss_mask: torch.Tensor     # (b, s) True where the label is trained

    @classmethod
    def stack(cls, rows: Sequence["Batch"]) -> "Batch":
        """(s,) samples -> one (b, s) batch."""
        return cls(*(torch.stack([getattr(r, f) for r in rows]) for f in
                     ("input_ids", "labels", "position_ids", "loss_mask")))


@dataclass(frozen=True)
class EpochPlan:
    """One epoch's order: the document in each stream slot, where each slot ends, and which window each sample is."""

    documents: torch.Tensor  # (n,) document id of each slot
    ends: torch.Tensor       # (n,) stream offset just past each slot's EOS
    samples: torch.Tensor    # (samples_per_epoch,) 'pack': window of each sample; 'pad': slot of each sample


class PackedDataset:
    """Fixed-length samples from whole documents in a seeded order per epoch, each document followed by EOS."""

    def __init__(self, data: IndexedDataset, seq_len: int, seed: int = 0, documents: Optional[torch.Tensor] = None,
                 mode: str = "pack"):
        if seq_len < 1:
            raise ValueError(f"seq_len = {seq_len}: must be >= 1")
        if mode not in MODES:
            raise ValueError(f"mode = {mode!r}: must be one of {MODES} ('pack' fills rows with whole documents, "
                             "'pad' puts one document per row)")
        documents = torch.arange(data.num_documents) if documents is None else torch.as_tensor(documents).long()
        if documents.ndim != 1 or len(documents) == 0:
            raise ValueError(f"documents: expected a non-empty 1-D list of document ids, got shape "
                             f"{tuple(documents.shape)}")
        if int(documents.min()) < 0 or int(documents.max()) >= data.num_documents:
            raise ValueError(f"documents: ids must be in [0, {data.num_documents}) for {data.prefix!r}, got "
                             f"[{int(documents.min())}, {int(documents.max())}]")
        self.data, self.seq_len, self.seed, self.mode, self.documents = data, seq_len, seed, mode, documents
        tokens = int(data.lengths[documents].sum())
        if tokens == 0:
            raise ValueError(f"{data.prefix!r}: the {len(documents)} selected documents are all empty: nothing to "
                             "train on; preprocess non-empty text")
        self.stream_tokens = tokens + len(documents)  # T: every document and its EOS
        if mode == "pack":
            self.samples_per_epoch = -(-(self.stream_tokens - 1) // seq_len)
        else:
            self.samples_per_epoch = len(documents)
        self._plans: dict[int, EpochPlan] = {}

    def plan(self, epoch: int) -> EpochPlan:
        """The epoch's document order and sample order (the last two epochs are cached)."""
        if epoch not in self._plans:
            n = len(self.documents)
            order = self.documents[torch.randperm(n, generator=seeded_generator(self.seed, epoch, 0))]
            ends = torch.cumsum(self.data.lengths[order] + 1, dim=0)
            samples = (torch.randperm(self.samples_per_epoch, generator=seeded_generator(self.seed, epoch, 1))
                       if self.mode == "pack" else torch.arange(n))
            self._plans = {e: p for e, p in self._plans.items() if e == epoch - 1}
            self._plans[epoch] = EpochPlan(order, ends, samples)
        return self._plans[epoch]

    def __getitem__(self, index: int) -> Batch:
        """Sample `index` of the endless sequence of epochs: a Batch of (seq_len,) tensors."""
        if index < 0:
            raise IndexError(f"sample index {index}: must be >= 0")
        epoch, i = divmod(index, self.samples_per_epoch)
        plan = self.plan(epoch)
        k = int(plan.samples[i])
        if self.mode == "pack":
            return self._window(plan, k * self.seq_len, self.stream_tokens)
        end = int(plan.ends[k])
        return self._window(plan, end - int(self.data.lengths[plan.documents[k]]) - 1, end)

    def _window(self, plan: EpochPlan, start: int, limit: int) -> Batch:
        """The seq_len + 1 stream ids from `start`, those at or past `limit` padding, as inputs and targets."""
        p = start + torch.arange(self.seq_len + 1)                                 # (s + 1,) stream offsets
        valid = p < limit
        slot = torch.searchsorted(plan.ends, p.clamp(max=limit - 1), right=True)  # (s + 1,) document slot
        doc = plan.documents[slot]
        length = self.data.lengths[doc]
        offset = p - (plan.ends[slot] - length - 1)                  # within the document; its EOS sits at = length
        in_doc = valid & (offset < length)
        ids = self.data.gather(torch.where(in_doc, self.data.offsets[doc] + offset, 0))
        ids = torch.where(in_doc, ids, self.data.eos_id)                              # EOS and padding
        position = torch.where(slot == slot[0], offset - offset[0], offset)           # row start counts as a start
        mask = valid[1:] & (slot[1:] == slot[:-1])                                    # (s,) target in input's doc
        labels = torch.where(mask, ids[1:], IGNORE_INDEX)
        return Batch(ids[:-1], labels, position[:-1], mask)

    def describe(self) -> dict[str, Any]:
        """What determines the samples; a checkpoint's loader state must match it to resume."""
        return {"kind": "packed", "mode": self.mode, "seq_len": self.seq_len, "seed": self.seed,
                "documents": len(self.documents), "stream_tokens": self.stream_tokens,
                "samples_per_epoch": self.samples_per_epoch, "eos_id": self.data.eos_id}

    def position(self, consumed: int) -> dict[str, int]:
        """Where `consumed` samples leave the stream: epoch and sample within it."""
        epoch, i = divmod(consumed, self.samples_per_epoch)
        return {"epoch": epoch, "sample_in_epoch": i}
