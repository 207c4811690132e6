"""Quick-start data: a small real English corpus available offline, byte-level tokens, seeded random windows."""
from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from pathlib import Path

import torch

from megalysses.config import DataConfig

# Standard-library modules whose documentation forms the built-in corpus: real prose, present on every Python.
CORPUS_MODULES = ("argparse", "asyncio", "collections", "contextlib", "csv", "dataclasses", "datetime", "decimal",
                  "email", "fractions", "functools", "heapq", "http.client", "itertools", "json", "logging",
                  "pathlib", "pickle", "random", "re", "shutil", "socket", "sqlite3", "statistics", "string",
                  "subprocess", "tarfile", "textwrap", "threading", "typing", "unittest", "urllib.parse", "zipfile")


def builtin_corpus() -> str:
    """The documentation of a fixed set of standard-library modules (module, class and function docstrings)."""
    parts = []
    for name in CORPUS_MODULES:
        module = importlib.import_module(name)
        parts.append(inspect.getdoc(module) or "")
        for _, obj in sorted(vars(module).items()):
            if (inspect.isclass(obj) or inspect.isfunction(obj)) and getattr(obj, "__module__", "") == name:
                parts.append(inspect.getdoc(obj) or "")
    return "\n\n".join(p for p in parts if p)


def load_text(source: str) -> str:
    """'builtin', a text file, or a folder of .txt files (read in sorted order)."""
    if source == "builtin":
        return builtin_corpus()
    path = Path(source)
    if path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise FileNotFoundError(f"data.source = {source!r}: the folder holds no .txt files")
        return "\n\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)
    if not path.is_file():
        raise FileNotFoundError(f"data.source = {source!r}: no such file or folder (use 'builtin' or a path)")
    return path.read_text(encoding="utf-8", errors="replace")


def byte_tokens(text: str) -> torch.Tensor:
    """UTF-8 bytes as token ids 0..255."""
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()


@dataclass
class TokenWindows:
    """Train / validation token streams; batches are random windows drawn from a generator seeded per step."""

    train: torch.Tensor
    val: torch.Tensor
    seed: int

    @classmethod
    def from_config(cls, cfg: DataConfig) -> "TokenWindows":
        if cfg.tokenizer != "byte":
            raise NotImplementedError(f"data.tokenizer = {cfg.tokenizer!r}: only 'byte' is available in this version")
        tokens = byte_tokens(load_text(cfg.source))
        n_val = int(len(tokens) * cfg.val_fraction)
        return cls(tokens[: len(tokens) - n_val], tokens[len(tokens) - n_val:], cfg.seed)

    def batch(self, step: int, rows: int, seq_len: int, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, seq_len) inputs and next-token labels, the same on every rank for the same step."""
        stream = self.train if split == "train" else self.val
        if len(stream) <= seq_len + 1:
            raise ValueError(f"the {split} split has {len(stream)} tokens, fewer than seq_len + 1 = {seq_len + 1}")
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step * 2 + (split != "train"))
        starts = torch.randint(0, len(stream) - seq_len - 1, (rows,), generator=g)
        windows = torch.stack([stream[s: s + seq_len + 1] for s in starts.tolist()])
        return windows[:, :-1], windows[:, 1:]
