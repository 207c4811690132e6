"""The tokenised dataset on disk: token ids, document offsets and metadata under one prefix, memory-mapped to read.

    <prefix>.bin   every document's token ids back to back, little-endian uint16 (vocab <= 65536) or uint32
    <prefix>.idx   int64 little-endian document offsets into .bin (num_documents + 1 of them, first 0, last num_tokens)
    <prefix>.json  metadata: format, version, dtype, vocab_size, eos_id, tokenizer, num_documents, num_tokens,
                   max_token_id (the largest id in .bin, -1 when empty; absent in datasets written before it), ...
    <prefix>.mask  only in datasets with a loss mask (chat / instruction data, metadata "loss_mask": "uint8",
                   version 2): one byte per token of .bin, 1 where the token is trained as a target, 0 where not

Plain-text documents hold no EOS: packing appends it. The raw files read with numpy too:
``np.memmap(prefix + ".bin", dtype=meta["dtype"])``, ``np.fromfile(prefix + ".idx", dtype="<i8")``,
``np.memmap(prefix + ".mask", dtype="u1")``. Datasets without a mask are written as version 1, exactly as before;
those with one are version 2, so a reader that knows no masks refuses them instead of training on every token.
A writer fills temp files beside the prefix and renames them into place on commit; .json goes last and marks the
dataset complete, so a reader never sees a half-written dataset.
"""
from __future__ import annotations

import itertools
import json
import os
import sys
import warnings
from array import array
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

from .tokenizer import token_dtype

FORMAT, VERSION = "megalysses-indexed", 1
MASK_VERSION = 2  # the version of datasets that carry <prefix>.mask
MASK_SUFFIX, MASK_DTYPE = ".mask", "uint8"
ITEMSIZE = {"uint16": 2, "uint32": 4}
_SIGNED = {"uint16": torch.int16, "uint32": torch.int32}  # same bytes; fast CPU indexing (uint16 indexing is slow)
_UNSIGNED_MASK = {"uint16": 0xFFFF, "uint32": 0xFFFFFFFF}
SUFFIXES = (".bin", ".idx", ".json")


def dataset_paths(prefix: Union[str, Path]) -> dict[str, Path]:
    """{'bin': <prefix>.bin, 'idx': <prefix>.idx, 'json': <prefix>.json}."""
    return {s[1:]: Path(f"{prefix}{s}") for s in SUFFIXES}


def mask_path(prefix: Union[str, Path]) -> Path:
    """<prefix>.mask: the loss mask of a dataset that has one (one byte per token: 1 trained, 0 not)."""
    return Path(f"{prefix}{MASK_SUFFIX}")


def is_indexed(prefix: Union[str, Path]) -> bool:
    """Whether any file of a dataset at this prefix exists (complete or not: opening it tells which)."""
    return any(p.exists() for p in dataset_paths(prefix).values())


def _require_little_endian() -> None:
    if sys.byteorder != "little":
        raise RuntimeError("indexed datasets are little-endian and are memory-mapped as they are: this host is "
                           "big-endian; convert the files or read them with numpy and an explicit '<' dtype")


def largest_id(data: bytes, dtype: str) -> int:
    """The largest of the little-endian token ids in data (-1 when there are none)."""
    if not data:
        return -1
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given buffer is not writable")  # read only, never written
        ids = torch.frombuffer(data, dtype=_SIGNED[dtype])
    return int((ids.max().long() & _UNSIGNED_MASK[dtype]) if bool((ids >= 0).all()) else
               (ids.long() & _UNSIGNED_MASK[dtype]).max())


class IndexedWriter:
    """Appends chunks of documents to temp files beside the prefix; commit() renames them into place atomically."""

    def __init__(self, prefix: Union[str, Path], *, vocab_size: int, eos_id: int, tokenizer: str,
                 overwrite: bool = False, meta: Optional[dict[str, Any]] = None, loss_mask: bool = False):
        _require_little_endian()
        self.prefix, self.paths = str(prefix), dataset_paths(prefix)
        if self.paths["json"].exists() and not overwrite:
            raise FileExistsError(f"{self.paths['json']} exists: a dataset is already at prefix {str(prefix)!r}; "
                                  "choose another prefix or pass overwrite=True (--overwrite)")
        if not 0 <= eos_id < vocab_size:
            raise ValueError(f"eos_id = {eos_id} is outside the vocabulary [0, {vocab_size})")
        self.paths["bin"].parent.mkdir(parents=True, exist_ok=True)
        self.dtype = token_dtype(vocab_size)
        self.meta = {"format": FORMAT, "version": VERSION, "dtype": self.dtype, "vocab_size": vocab_size,
                     "eos_id": eos_id, "tokenizer": tokenizer, **(meta or {})}
        if loss_mask:
            self.paths["mask"] = mask_path(prefix)
            self.meta.update(version=MASK_VERSION, loss_mask=MASK_DTYPE)
        self.tmp = {k: p.with_name(f".{p.name}.tmp-{os.getpid()}") for k, p in self.paths.items()}
        self._bin = open(self.tmp["bin"], "wb")
        self._idx = open(self.tmp["idx"], "wb")
        self._mask = open(self.tmp["mask"], "wb") if loss_mask else None
        self.num_documents, self.num_tokens, self.max_token_id = 0, 0, -1
        self.num_trained_tokens, self.max_document_tokens, self.longest_document = 0, 0, -1
        self._idx.write(array("q", [0]).tobytes())

    def add(self, data: bytes, lengths: Sequence[int], mask: Optional[bytes] = None) -> None:
        """Append documents: data holds their ids back to back (little-endian, self.dtype), lengths one per document;
        mask one byte per token (1 trained, 0 not), given exactly when the writer was made with loss_mask=True."""
        n = sum(lengths)
        if len(data) != n * ITEMSIZE[self.dtype]:
            raise ValueError(f"{len(data)} bytes of token ids for documents of {n} tokens in total; expected "
                             f"{n * ITEMSIZE[self.dtype]} bytes of {self.dtype}")
        self._check_mask(mask, n)
        offsets = array("q", itertools.accumulate(lengths, initial=self.num_tokens))  # (len(lengths) + 1,)
        self._bin.write(data)
        self._idx.write(offsets[1:].tobytes())
        if self._mask is not None:
            self._mask.write(mask)
            self.num_trained_tokens += mask.count(1)
            longest = max(range(len(lengths)), key=lengths.__getitem__, default=None)
            if longest is not None and lengths[longest] > self.max_document_tokens:
                self.max_document_tokens, self.longest_document = lengths[longest], self.num_documents + longest
        self.max_token_id = max(self.max_token_id, largest_id(data, self.dtype))
        self.num_documents += len(lengths)
        self.num_tokens = offsets[-1]

    def _check_mask(self, mask: Optional[bytes], n: int) -> None:
        """A mask exactly when the dataset has one, one byte (0 or 1) per token."""
        if (mask is None) != (self._mask is None):
            raise ValueError("a loss mask was given to a writer made without loss_mask=True, or none to one made "
                             "with it: pass one mask byte per token to every add() of a masked dataset, never else")
        if mask is not None and (len(mask) != n or mask.count(0) + mask.count(1) != n):
            raise ValueError(f"a loss mask of {len(mask)} bytes for {n} tokens: give one byte per token, each 0 "
                             "(not trained) or 1 (trained)")

    def _files(self) -> list:
        return [f for f in (self._bin, self._idx, self._mask) if f is not None]

    def commit(self, **meta: Any) -> dict[str, Any]:
        """Close the temp files and move them into place (.json last); returns the metadata written."""
        for f in self._files():
            f.flush()
            os.fsync(f.fileno())
            f.close()
        self.meta.update(meta, num_documents=self.num_documents, num_tokens=self.num_tokens,
                         max_token_id=self.max_token_id)
        if self._mask is not None:
            self.meta.update(num_trained_tokens=self.num_trained_tokens, max_document_tokens=self.max_document_tokens,
                             longest_document=self.longest_document)
        self.tmp["json"].write_text(json.dumps(self.meta, indent=1) + "\n")
        self.paths["json"].unlink(missing_ok=True)  # no moment where an old .json describes new .bin/.idx
        if self._mask is None:
            mask_path(self.prefix).unlink(missing_ok=True)  # the mask of a masked dataset this one overwrites
        for key in ("bin", "idx", "mask", "json"):
            if key in self.tmp:
                os.replace(self.tmp[key], self.paths[key])
        return self.meta

    def abort(self) -> None:
        """Drop the temp files; whatever was at the prefix before is untouched."""
        for f in self._files():
            f.close()
        for p in self.tmp.values():
            p.unlink(missing_ok=True)

    def __enter__(self) -> "IndexedWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


def _map(path: Path, dtype: torch.dtype, count: int) -> torch.Tensor:
    """A read-only-in-practice memory map of count elements (private mapping: pages load on first touch)."""
    if count == 0:
        return torch.empty(0, dtype=dtype)
    return torch.from_file(str(path), shared=False, size=count, dtype=dtype)


def read_meta(prefix: Union[str, Path]) -> dict[str, Any]:
    """A dataset's metadata (<prefix>.json), checked against the sizes of .bin and .idx; reads nothing else."""
    p = dataset_paths(prefix)
    if not p["json"].is_file():
        have = [str(x) for x in p.values() if x.exists()]
        state = f"only {', '.join(have)} exist(s): an unfinished or interrupted write" if have else "no files"
        raise FileNotFoundError(f"no indexed dataset at prefix {str(prefix)!r} ({p['json']} missing; {state}); "
                                "copy all three files, or make the dataset again with megalysses-preprocess")
    try:
        meta = json.loads(p["json"].read_text())
    except ValueError as e:
        raise ValueError(f"{p['json']}: not valid JSON ({e}); preprocess the source again") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") not in (VERSION, MASK_VERSION):
        found = (meta.get("format"), meta.get("version")) if isinstance(meta, dict) else (type(meta).__name__, None)
        raise ValueError(f"{p['json']}: format {found[0]!r} version {found[1]!r}, expected {FORMAT!r} version "
                         f"{VERSION} or {MASK_VERSION}; preprocess the source again")
    if meta.get("dtype") not in ITEMSIZE:
        raise ValueError(f"{p['json']}: dtype {meta.get('dtype')!r} is not one of {sorted(ITEMSIZE)}")
    if meta.get("loss_mask", MASK_DTYPE) != MASK_DTYPE or (meta["version"] == MASK_VERSION) != ("loss_mask" in meta):
        raise ValueError(f"{p['json']}: loss_mask {meta.get('loss_mask')!r} with version {meta['version']}: a loss "
                         f"mask is {MASK_DTYPE!r} and comes with version {MASK_VERSION}; preprocess the source again")
    expect = {"bin": meta["num_tokens"] * ITEMSIZE[meta["dtype"]], "idx": (meta["num_documents"] + 1) * 8}
    if "loss_mask" in meta:
        p["mask"], expect["mask"] = mask_path(prefix), meta["num_tokens"]
    for key, size in expect.items():
        have = p[key].stat().st_size if p[key].exists() else None
        if have != size:
            raise ValueError(f"{p[key]}: {have} bytes, but {p['json']} describes {size}; the files do not belong "
                             "together (interrupted copy?): preprocess the source again")
    return meta


class IndexedDataset:
    """A memory-mapped tokenised dataset: documents by index, token ids read lazily from <prefix>.bin."""

    def __init__(self, prefix: Union[str, Path]):
        _require_little_endian()
        self.prefix = str(prefix)
        self.paths = dataset_paths(prefix)
        self.meta = read_meta(prefix)
        self.dtype: str = self.meta["dtype"]
        self.vocab_size: int = self.meta["vocab_size"]
        self.eos_id: int = self.meta["eos_id"]
        self.num_documents: int = self.meta["num_documents"]
        self.num_tokens: int = self.meta["num_tokens"]
        self.offsets = _map(self.paths["idx"], torch.int64, self.num_documents + 1)  # (n + 1,)
        self.lengths = self.offsets[1:] - self.offsets[:-1]  # (n,) in memory
        if int(self.offsets[0]) != 0 or int(self.offsets[-1]) != self.num_tokens or bool((self.lengths < 0).any()):
            raise ValueError(f"{self.paths['idx']}: document offsets are not 0 <= ... <= num_tokens = "
                             f"{self.num_tokens} in order; the dataset is corrupt: preprocess it again")
        self._tokens = _map(self.paths["bin"], _SIGNED[self.dtype], self.num_tokens)  # signed view of the ids
        self.loss_mask: Optional[torch.Tensor] = None  # (num_tokens,) uint8, 1 where trained; None: all trained
        if "loss_mask" in self.meta:
            self.loss_mask = _map(mask_path(prefix), torch.uint8, self.num_tokens)

    def trained(self, positions: torch.Tensor) -> torch.Tensor:
        """Whether the tokens at absolute positions of .bin are trained as targets (bool, any shape)."""
        if self.loss_mask is None or self.num_tokens == 0:
            return torch.ones_like(positions, dtype=torch.bool)
        return self.loss_mask[positions].bool()

    def gather(self, positions: torch.Tensor) -> torch.Tensor:
        """Token ids (int64) at absolute positions of .bin (any shape)."""
        if self.num_tokens == 0:
            return torch.zeros_like(positions)
        return self._tokens[positions].long() & _UNSIGNED_MASK[self.dtype]

    def document(self, i: int) -> torch.Tensor:
        """Token ids (int64) of document i, without EOS."""
        if not 0 <= i < self.num_documents:
            raise IndexError(f"document {i} out of range: the dataset has {self.num_documents} documents")
        lo, hi = int(self.offsets[i]), int(self.offsets[i + 1])
        return self._tokens[lo:hi].long() & _UNSIGNED_MASK[self.dtype]

    def __len__(self) -> int:
        return self.num_documents

    def __repr__(self) -> str:
        return (f"IndexedDataset({self.prefix!r}: {self.num_documents} documents, {self.num_tokens} tokens, "
                f"{self.dtype}, vocab {self.vocab_size}, eos {self.eos_id})")
