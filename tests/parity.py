"""The core check: a sharded model reproduces the single-device loss and every gradient (same seed, fp32)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from megalysses.parallel.tensor import param_info
from megalysses.models.config import GPTConfig
from megalysses.models.gpt import GPT
from megalysses.parallel import ParallelLayout, ParallelMesh
from megalysses.parallel import collectives as C
from megalysses.parallel.dp import all_reduce_gradients
from megalysses.parallel.sequence import (IGNORE_INDEX, count_valid_tokens, pad_sequence_batch, shard_ring_sequence,
                                          token_weighted_loss)
from megalysses.parallel.tensor import gather_full

SEED = 1234


@dataclass
class Batch:
    input_ids: torch.Tensor      # (B, S)
    labels: torch.Tensor         # (B, S), IGNORE_INDEX where not trained
    position_ids: Optional[torch.Tensor] = None  # (B, S), resets at document starts when packed


def make_batch(cfg: GPTConfig, batch: int, seq: int, seed: int = 0, packed: bool = False,
               ignore_tail: int = 0) -> Batch:
    """Random tokens; `packed` puts several documents in each row; `ignore_tail` masks the last tokens' labels."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g)
    labels = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g)
    if ignore_tail:
        labels[:, seq - ignore_tail:] = IGNORE_INDEX
    positions = None
    if packed:  # documents of uneven lengths, including a one-token document
        positions = torch.empty(batch, seq, dtype=torch.long)
        for row in range(batch):
            cuts = sorted({1 + row, seq // 3, seq // 3 + 1, (2 * seq) // 3 + row} - {0, seq})
            starts = [0] + [c for c in cuts if 0 < c < seq]
            pos = torch.arange(seq)
            for a in starts:
                pos[a:] = torch.arange(seq - a)
            positions[row] = pos
    return Batch(ids, labels, positions)


def reference(cfg: GPTConfig, batch: Batch) -> tuple[float, dict[str, torch.Tensor]]:
    """Single-device loss (mean over valid tokens) and full gradients."""
    model = GPT(cfg)
    model.init_weights(SEED)
    per_token = model(batch.input_ids, batch.position_ids, batch.labels)
    valid = (batch.labels != IGNORE_INDEX)
    loss = (per_token * valid).sum() / valid.sum()
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.canonical_parameters()}


def sharded(cfg: GPTConfig, layout: ParallelLayout, batch: Batch) -> tuple[float, dict[str, torch.Tensor]]:
    """Loss and gathered full gradients under `layout` (call on every rank)."""
    mesh = ParallelMesh(layout)
    model = GPT(cfg, mesh)
    model.init_weights(SEED)
    dp, ring, sp = mesh.group("dp"), mesh.group("ring"), mesh.group("sp")
    ids, labels, pos = pad_sequence_batch(batch.input_ids, batch.labels, batch.position_ids, layout.sequence_unit)
    rows = lambda t: t.chunk(dp.size, dim=0)[dp.rank]  # noqa: E731 - this dp rank's rows
    ids, labels, pos = (shard_ring_sequence(rows(t), ring, sp) for t in (ids, labels, pos))
    total = count_valid_tokens(labels, mesh.data_group())
    loss = token_weighted_loss(model(ids, pos, labels), labels, total)
    loss.backward()
    all_reduce_gradients(model.parameters(), mesh)
    reported = C.all_reduce(loss.detach().clone(), mesh.data_group()).item()
    grads = {n: gather_full(p.grad, param_info(p).shard, mesh.group("tp")) for n, p in model.canonical_parameters()}
    return reported, grads


def compare(ref: tuple[float, dict], got: tuple[float, dict]) -> tuple[float, float, str]:
    """(relative loss error, worst relative gradient error, name of that gradient)."""
    ref_loss, ref_grads = ref
    loss, grads = got
    assert grads.keys() == ref_grads.keys(), (sorted(grads), sorted(ref_grads))
    worst, worst_name = 0.0, ""
    for name, g in ref_grads.items():
        err = ((grads[name] - g).norm() / g.norm().clamp(min=1e-30)).item()
        if err > worst:
            worst, worst_name = err, name
    return abs(loss - ref_loss) / abs(ref_loss), worst, worst_name


def parity_on_rank(rank: int, world: int, cfg: GPTConfig, layout: ParallelLayout, batch: Batch):
    """Rank body for run_ranks: every rank computes both and returns the comparison."""
    got = sharded(cfg, layout, batch)
    return compare(reference(cfg, batch), got)
