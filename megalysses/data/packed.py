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

Datasets with a loss mask (chat / instruction data: `IndexedDataset.loss_mask`) are packed whole: a conversation is
never split across rows and gets no EOS appended (its template wrote its own end-of-turn tokens).
- 'pack': the conversations, in one seeded order (fixed for the run), fill rows greedily, each row as many whole
  conversations as fit in seq_len tokens, then padding; each epoch visits the rows in a new seeded order.
  'pad': one conversation per row. samples_per_epoch = the number of rows.
- position_ids restart at 0 at each conversation, so attention never crosses conversations.
- A target is trained when it is in the input's conversation and the mask marks it trained (assistant turns and
  their end of turn); labels are IGNORE_INDEX everywhere else, so the token-weighted loss needs nothing more.
- A conversation longer than seq_len is refused, naming its document index (its record index in the
  preprocessed inputs) and length: raise train.seq_len, or preprocess with --max-tokens / --too-long truncate.
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
        self.whole = data.loss_mask is not None  # chat data: whole conversations, their mask, no EOS appended
        self.stream_tokens = tokens + (0 if self.whole else len(documents))  # T: every document (and its EOS)
        if self.whole:
            self.rows = WholeRows.build(data, documents, seq_len, seed, mode)
            self.samples_per_epoch = self.rows.count
        elif mode == "pack":
            self.samples_per_epoch = -(-(self.stream_tokens - 1) // seq_len)
        else:
            self.samples_per_epoch = len(documents)
        self._plans: dict[int, EpochPlan] = {}
        self._orders: dict[int, torch.Tensor] = {}

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
        if self.whole:
            return self._whole_row(self.rows.documents(self._row_order(epoch)[i]))
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

    def _row_order(self, epoch: int) -> torch.Tensor:
        """The epoch's order of the whole-document rows (the last two epochs are cached)."""
        if epoch not in self._orders:
            self._orders = {e: o for e, o in self._orders.items() if e == epoch - 1}
            self._orders[epoch] = self.rows.order(epoch)
        return self._orders[epoch]

    def _whole_row(self, docs: torch.Tensor) -> Batch:
        """Whole documents side by side from the row start, then padding: inputs, masked targets, positions."""
        length = self.data.lengths[docs]                                            # (k,)
        n, s = int(length.sum()), self.seq_len
        slot = torch.repeat_interleave(torch.arange(len(docs)), length)             # (n,) document of each token
        offset = torch.arange(n) - (torch.cumsum(length, 0) - length)[slot]          # (n,) position within it
        where = self.data.offsets[docs][slot] + offset                               # (n,) absolute .bin position
        pad = s + 1 - n                                                              # >= 1: documents fit in s
        ids = torch.cat([self.data.gather(where), torch.full((pad,), self.data.eos_id)])            # (s + 1,)
        trained = torch.cat([self.data.trained(where), torch.zeros(pad, dtype=torch.bool)])         # (s + 1,)
        slot = torch.cat([slot, torch.full((pad,), -1)])                                            # (s + 1,)
        last = int(offset[-1]) if n else -1
        position = torch.cat([offset, last + 1 + torch.arange(pad)])           # padding continues the last document
        mask = trained[1:] & (slot[1:] == slot[:-1])                           # (s,) trained target in input's doc
        labels = torch.where(mask, ids[1:], IGNORE_INDEX)
        return Batch(ids[:-1], labels, position[:-1], mask)

    def describe(self) -> dict[str, Any]:
        """What determines the samples; a checkpoint's loader state must match it to resume."""
        described = {"kind": "packed", "mode": self.mode, "seq_len": self.seq_len, "seed": self.seed,
                     "documents": len(self.documents), "stream_tokens": self.stream_tokens,
                     "samples_per_epoch": self.samples_per_epoch, "eos_id": self.data.eos_id}
        if self.whole:
            described.update(packing="whole documents", loss_mask=True)
        return described

    def position(self, consumed: int) -> dict[str, int]:
        """Where `consumed` samples leave the stream: epoch and sample within it."""
        epoch, i = divmod(consumed, self.samples_per_epoch)
        return {"epoch": epoch, "sample_in_epoch": i}


@dataclass(frozen=True)
class WholeRows:
    """Whole documents grouped into rows once per run: the documents in row order, where each row starts."""

    seed: int
    ordered: torch.Tensor  # (n,) document ids, row after row
    starts: torch.Tensor   # (rows + 1,) index into `ordered` where each row starts, then n

    @classmethod
    def build(cls, data: IndexedDataset, documents: torch.Tensor, seq_len: int, seed: int, mode: str) -> "WholeRows":
        """'pack': a seeded order filled greedily into rows of seq_len tokens; 'pad': one document per row."""
        lengths = data.lengths[documents]
        too_long = (lengths > seq_len).nonzero()
        if len(too_long):
            doc, n = int(documents[too_long[0, 0]]), int(lengths[too_long[0, 0]])
            raise ValueError(f"{data.prefix!r}: document {doc} (record {doc} of the preprocessed inputs) has {n} "
                             f"tokens, more than seq_len = {seq_len} ({len(too_long)} such): conversations are "
                             f"packed whole, never split across rows; set train.seq_len >= {n}, or preprocess "
                             f"again with --max-tokens {seq_len} (--too-long truncate to cut them)")
        if mode == "pad":
            return cls(seed, documents, torch.arange(len(documents) + 1))
        ordered = documents[torch.randperm(len(documents), generator=seeded_generator(seed, -2))]
        return cls(seed, ordered, torch.tensor(greedy_rows(data.lengths[ordered].tolist(), seq_len)))

    @property
    def count(self) -> int:
        return len(self.starts) - 1

    def order(self, epoch: int) -> torch.Tensor:
        """The epoch's seeded order of the rows, (rows,)."""
        return torch.randperm(self.count, generator=seeded_generator(self.seed, epoch, 0))

    def documents(self, row: Any) -> torch.Tensor:
        """The documents of row `row`, in place order."""
        return self.ordered[int(self.starts[int(row)]):int(self.starts[int(row) + 1])]


def greedy_rows(lengths: Sequence[int], seq_len: int) -> list[int]:
    """Row starts (then len(lengths)) filling rows of seq_len with consecutive items, each <= seq_len, in order."""
    starts, used = [0], 0
    for i, n in enumerate(lengths):
        if used + n > seq_len and used > 0:
            starts.append(i)
            used = 0
        used += n
    return starts + [len(lengths)]
