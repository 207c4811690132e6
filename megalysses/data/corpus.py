"""A preprocessed dataset named by DataConfig: split into train / validation documents, packed, loaded."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch

from megalysses.config import DataConfig

from .indexed import SUFFIXES, IndexedDataset, dataset_paths
from .loader import BatchLoader
from .packed import PackedDataset, seeded_generator
from .tokenizer import file_sha256

SPLITS = ("train", "val")


def resolve_prefix(source: Union[str, Path]) -> str:
    """The dataset prefix, also when `source` names one of its files (<prefix>.bin, .idx or .json), and also when
    the others are missing (opening it then says so, rather than a lone .bin being read as text)."""
    source = str(source)
    for suffix in SUFFIXES:
        if not source.endswith(suffix):
            continue
        paths = dataset_paths(source[: -len(suffix)])
        named = paths.pop(suffix[1:])
        if (suffix != ".json" and named.exists()) or any(p.exists() for p in paths.values()):
            return source[: -len(suffix)]
    return source


def split_documents(num_documents: int, val_fraction: float, seed: int) -> dict[str, torch.Tensor]:
    """A seeded choice of round(val_fraction * n) validation documents (at least 1 if the fraction is > 0)."""
    n_val = max(1, round(num_documents * val_fraction)) if val_fraction > 0 else 0
    if num_documents - n_val < 1:
        raise ValueError(f"data.val_fraction = {val_fraction} leaves no training document out of {num_documents}; "
                         "lower it or preprocess more documents")
    order = torch.randperm(num_documents, generator=seeded_generator(seed, -1))
    return {"train": order[n_val:].sort().values, "val": order[:n_val].sort().values}


def check_tokenizer(spec: Optional[str], data: IndexedDataset) -> None:
    """The config's tokenizer must be the one that made the dataset (same name for 'byte', same bytes for a file);
    None (the default) takes the recorded one."""
    made_by = data.meta.get("tokenizer")
    if spec is None:
        return
    if spec == "byte":
        same = made_by == "byte"
    else:
        path = Path(spec) / "tokenizer.json" if Path(spec).is_dir() else Path(spec)
        same = path.is_file() and data.meta.get("tokenizer_sha256") == file_sha256(path)
    if not same:
        raise ValueError(f"data.tokenizer = {spec!r}, but {data.prefix!r} was tokenised with {made_by!r} (sha256 "
                         f"{data.meta.get('tokenizer_sha256')}): set data.tokenizer={made_by}")


@dataclass
class PackedCorpus:
    """A preprocessed dataset with its train / validation documents; makes packed datasets and their loaders."""

    data: IndexedDataset
    splits: dict[str, torch.Tensor]  # split -> sorted document ids
    seed: int

    @classmethod
    def from_config(cls, cfg: DataConfig) -> "PackedCorpus":
        data = IndexedDataset(resolve_prefix(cfg.source))
        check_tokenizer(cfg.tokenizer, data)
        return cls(data, split_documents(data.num_documents, cfg.val_fraction, cfg.seed), cfg.seed)

    def dataset(self, split: str, seq_len: int, mode: str = "pack") -> PackedDataset:
        """The split's samples; train is seeded with data.seed, val with data.seed + 1."""
        if split not in SPLITS or len(self.splits[split]) == 0:
            raise ValueError(f"split {split!r}: available splits are "
                             f"{[s for s in SPLITS if len(self.splits[s])]} (val needs data.val_fraction > 0)")
        return PackedDataset(self.data, seq_len, self.seed + SPLITS.index(split), self.splits[split], mode)

    def loader(self, split: str, seq_len: int, global_batch_size: int, dp_rank: int = 0, dp_size: int = 1,
               mode: str = "pack") -> BatchLoader:
        """A loader over the split for this dp rank."""
        return BatchLoader(self.dataset(split, seq_len, mode), global_batch_size, dp_rank, dp_size)
