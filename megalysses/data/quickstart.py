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


SNIFF_BYTES = 1 << 16
"""How much of a text source is read to tell text from binary (the whole file is read only by the ranks)."""


def text_files(source: str) -> list[Path]:
    """The files a text source names: the file, or the .txt files of a folder (sorted); errors name the source."""
    path = Path(source)
    if path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise FileNotFoundError(f"data.source = {source!r}: the folder holds no .txt files")
        return files
    if not path.is_file():
        raise FileNotFoundError(f"data.source = {source!r}: no such file or folder (use 'builtin' or a path)")
    return [path]


def not_text(sample: bytes) -> str:
    """Why a file's first bytes are not UTF-8 text ('' when they are): NUL bytes, or mostly invalid UTF-8."""
    nul = sample.find(b"\x00")
    if nul >= 0:
        return f"a NUL byte at offset {nul}"
    bad = sample.decode("utf-8", errors="replace").count("\ufffd")
    if bad > max(4, len(sample) // 100):  # a cut character at the end of the sample counts once
        return f"{bad} invalid UTF-8 sequences in its first {len(sample)} bytes"
    return ""


def check_text_source(source: str) -> None:
    """Raise ValueError when a text source is empty or binary, reading only each file's first SNIFF_BYTES."""
    files = text_files(source)
    for f in files:
        with open(f, "rb") as handle:
            why = not_text(handle.read(SNIFF_BYTES))
        if why:
            raise ValueError(f"data.source = {source!r}: {f} is not text ({why}); a text source must be UTF-8 text; "
                             "tokenised data is a prefix written by megalysses-preprocess (data.source=<prefix>)")
    if sum(f.stat().st_size for f in files) == 0:
        raise ValueError(f"data.source = {source!r}: empty (0 bytes of text): nothing to train on; give a text "
                         "with at least train.seq_len + 1 bytes, or data.source=builtin")


def load_text(source: str) -> str:
    """'builtin', a text file, or a folder of .txt files (read in sorted order); refuses empty and binary ones."""
    if source == "builtin":
        return builtin_corpus()
    check_text_source(source)
    return "\n\n".join(f.read_text(encoding="utf-8", errors="replace") for f in text_files(source))


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
        if cfg.tokenizer not in (None, "byte"):
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
