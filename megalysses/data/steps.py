"""StepData: the rows each training step reads on this dp rank, from whichever source the run config names."""
from __future__ import annotations

import torch

from megalysses.config import RunConfig
from megalysses.parallel import ParallelMesh

from . import build_dataset
from .corpus import PackedCorpus


class StepData:
    """This dp rank's rows for each step, (ids, labels, positions) each (global_batch / dp, seq_len): random windows
    of a text (quick start) or packed documents of a preprocessed dataset (with resetting positions). `loaders`:
    the packed datasets' checkpointable loaders by split (none for text windows, which are indexed by step)."""

    def __init__(self, cfg: RunConfig, mesh: ParallelMesh):
        t = cfg.train
        self.data, self.mesh = build_dataset(cfg.data), mesh
        self.global_batch, self.seq_len = t.global_batch_size, t.seq_len
        self.loaders = {}
        if isinstance(self.data, PackedCorpus):
            dp = dict(dp_rank=mesh.rank("dp"), dp_size=mesh.size("dp"))
            self.loaders = {split: self.data.loader(split, t.seq_len, t.global_batch_size, **dp)
                            for split in ("train", "val") if len(self.data.splits[split])}

    def rows(self, step: int, split: str = "train") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if isinstance(self.data, PackedCorpus):
            if split not in self.loaders:
                raise ValueError(f"no {split} documents: set data.val_fraction > 0 or train.eval_every=0")
            b = self.loaders[split].batch_at(step * self.global_batch)
            return b.input_ids, b.labels, b.position_ids
        ids, labels = self.data.batch(step, self.global_batch, self.seq_len, split=split)
        dp = self.mesh.group("dp")
        ids, labels = ids.chunk(dp.size)[dp.rank], labels.chunk(dp.size)[dp.rank]
        return ids, labels, torch.arange(self.seq_len).expand_as(ids)
