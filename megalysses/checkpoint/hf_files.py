"""Hugging Face model folders: config.json + safetensors (one file, or shards listed in model.safetensors.index.json),
read one tensor at a time; and written as size-limited shards plus an index, one tensor at a time (each shard's header
is planned from the known shapes, then the tensors' bytes are appended in order). Beside the weights: the tokenizer
files and generation_config.json, which conversion copies as they are, and the bos / eos / pad token ids."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import torch

CONFIG_JSON, SINGLE, INDEX = "config.json", "model.safetensors", "model.safetensors.index.json"
GENERATION_CONFIG = "generation_config.json"
HF_EXTRA = "hf_extra"
"""The folder of a checkpoint holding the tokenizer files of the HF model it started from, as they were."""
TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt",
                   "vocab.txt", "spiece.model", "sentencepiece.bpe.model")
"""The files a saved tokenizer may consist of (what transformers' save_pretrained writes, for any tokenizer class)."""
TOKENIZER_DIRS = ("additional_chat_templates",)
"""Folders of a saved tokenizer (transformers keeps named chat templates there, one .jinja file each)."""
VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
               "sentencepiece.bpe.model")
"""A folder holding one of these holds a tokenizer (a tokenizer_config.json alone does not)."""
_CODES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
          torch.bool: "BOOL"}
_DTYPES = {code: dtype for dtype, code in _CODES.items()}
Entry = tuple[str, tuple[int, ...], torch.dtype]  # (name, shape, dtype)


class HFFolderError(ValueError):
    """A Hugging Face folder that cannot be read or written: names the file and the fix."""


class HFFolder:
    """A Hugging Face model folder opened for reading: its config, which file holds each tensor, lazy tensors."""

    def __init__(self, folder: Path | str):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise HFFolderError(f"{self.folder}: no such folder")
        try:
            self.config = json.loads((self.folder / CONFIG_JSON).read_text())
        except FileNotFoundError:
            raise HFFolderError(f"{self.folder / CONFIG_JSON}: missing; a Hugging Face model folder needs its config "
                                "(save it with model.save_pretrained)") from None
        except ValueError as e:
            raise HFFolderError(f"{self.folder / CONFIG_JSON}: not valid JSON ({e})") from e
        self.files = self._tensor_files()  # tensor name -> file
        self.generation_config = read_optional_json(self.folder / GENERATION_CONFIG)

    def _tensor_files(self) -> dict[str, Path]:
        index = self.folder / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as e:
                raise HFFolderError(f"{index}: unreadable or without a weight_map ({e}); re-download the model") from e
            files = {name: self.folder / f for name, f in weight_map.items()}
            for path in sorted(set(files.values())):
                if not path.is_file():
                    listed = sorted(n for n, p in files.items() if p == path)
                    raise HFFolderError(f"{path}: missing shard ({len(listed)} tensors listed in {INDEX}, e.g. "
                                        f"{listed[0]!r}); re-download it or copy it next to the index")
            return files
        single = self.folder / SINGLE
        if single.is_file():
            with _safe_open(single) as f:
                return {name: single for name in f.keys()}
        other = sorted(p.name for p in self.folder.glob("*.bin")) + sorted(p.name for p in self.folder.glob("*.pth"))
        hint = f" (found {other[:3]}: re-save with save_pretrained(..., safe_serialization=True))" if other else ""
        raise HFFolderError(f"{self.folder}: no {SINGLE} and no {INDEX}{hint}")

    @contextlib.contextmanager
    def _open(self, name: str):
        """The file holding a tensor, memory-mapped only while it is read (so its pages never pile up)."""
        if name not in self.files:
            raise KeyError(name)
        with _safe_open(self.files[name]) as f:
            yield f

    def where(self, name: str) -> Path:
        """The file holding a tensor (or the folder, for a tensor no file lists)."""
        return self.files.get(name, self.folder)

    def get(self, name: str) -> torch.Tensor:
        """One tensor, read from its file (KeyError when no file holds it)."""
        with self._open(name) as f:
            try:
                return f.get_tensor(name)
            except Exception as e:  # noqa: BLE001 - safetensors raises its own types for damaged files
                raise HFFolderError(f"{self.files[name]}: cannot read tensor {name!r} ({e}); re-download this "
                                    "shard") from e

    def meta(self, name: str) -> torch.Tensor:
        """A meta tensor with the stored shape and dtype of a tensor (reads the header only)."""
        with self._open(name) as f:
            piece = f.get_slice(name)
            if piece.get_dtype() not in _DTYPES:
                raise HFFolderError(f"{self.files[name]}: tensor {name!r} is stored as {piece.get_dtype()}, which "
                                    f"megalysses does not read (it reads {', '.join(sorted(_DTYPES))}); convert the "
                                    "weights to float32, bfloat16 or float16 first")
            return torch.empty(piece.get_shape(), dtype=_DTYPES[piece.get_dtype()], device="meta")


def _safe_open(path: Path):
    """safetensors.safe_open(path), its errors (damaged, truncated, not safetensors) as one HFFolderError naming it."""
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="pt")
    except Exception as e:  # noqa: BLE001 - safetensors raises its own SafetensorError (and OSError) types
        raise HFFolderError(f"{path}: not a readable safetensors file ({e}); it is truncated or damaged: "
                            "re-download it") from e


# ----------------------------------------------------------------------------------- tokenizer, generation, ids

def read_optional_json(path: Path | str) -> Optional[dict]:
    """A JSON object file, or None when there is no such file; HFFolderError naming it when it is not one."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise HFFolderError(f"{path}: not valid JSON ({e}); re-download or re-save it") from e
    if not isinstance(data, dict):
        raise HFFolderError(f"{path}: holds a JSON {type(data).__name__}, not an object; re-download or re-save it")
    return data


def tokenizer_files(folder: Path | str) -> list[str]:
    """The tokenizer files in folder (posix paths relative to it, sorted); [] when it holds no tokenizer."""
    folder = Path(folder)
    names = [n for n in TOKENIZER_FILES if (folder / n).is_file()]
    if not any(n in VOCAB_FILES for n in names):
        return []
    for sub in TOKENIZER_DIRS:
        if (folder / sub).is_dir():
            names += [p.relative_to(folder).as_posix() for p in (folder / sub).iterdir() if p.is_file()]
    return sorted(names)


def copy_files(src: Path | str, names: Sequence[str], dst: Path | str) -> None:
    """Copy the named files (paths relative to src) into dst byte for byte (links followed: a hub cache's blobs)."""
    for name in names:
        target = Path(dst) / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(src) / name, target)


def token_ids(config: dict, generation: Optional[dict] = None) -> dict:
    """bos / eos / pad ids as config.json states them (null included), else as generation_config.json does; a key
    neither states is left out (the family's default then applies, as it did for the source). eos may be a list."""
    ids = {k: config[k] for k in TOKEN_ID_KEYS if k in config}
    ids.update({k: generation[k] for k in TOKEN_ID_KEYS if k not in ids and k in (generation or {})})
    return ids


def special_token_ids(folder: Path | str) -> dict:
    """bos / eos / pad ids of a saved tokenizer: the tokens its tokenizer_config.json (or special_tokens_map.json)
    names, looked up in its tokenizer.json; those it names no token for, or that cannot be looked up, are left out."""
    folder = Path(folder)
    named = {**(read_optional_json(folder / "special_tokens_map.json") or {}),
             **(read_optional_json(folder / "tokenizer_config.json") or {})}
    vocab = _vocabulary(folder)
    ids = {}
    for key in TOKEN_ID_KEYS:
        token = named.get(key[: -len("_id")])
        token = token.get("content") if isinstance(token, dict) else token
        if isinstance(token, str) and token in vocab:
            ids[key] = vocab[token]
    return ids


def largest_token_id(folder: Path | str) -> Optional[int]:
    """The largest id a saved tokenizer's tokenizer.json can produce; None without a tokenizer.json."""
    vocab = _vocabulary(folder)
    return max(vocab.values()) if vocab else None


def _vocabulary(folder: Path | str) -> dict[str, int]:
    """token -> id from tokenizer.json: its model's vocabulary and its added tokens ({} without the file)."""
    data = read_optional_json(Path(folder) / "tokenizer.json") or {}
    vocab = (data.get("model") or {}).get("vocab")
    if isinstance(vocab, list):  # Unigram: [token, score] pairs, the id is the position
        vocab = {entry[0]: i for i, entry in enumerate(vocab)}
    out = dict(vocab) if isinstance(vocab, dict) else {}
    out.update({t["content"]: t["id"] for t in data.get("added_tokens") or () if "content" in t and "id" in t})
    return out


# ------------------------------------------------------------------------------------------------------- writing

def plan_shards(entries: Sequence[Entry], max_bytes: int) -> list[list[Entry]]:
    """Consecutive groups of at most max_bytes (a tensor larger than that gets a shard of its own)."""
    shards: list[list[Entry]] = [[]]
    size = 0
    for entry in entries:
        n = _nbytes(entry)
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += n
    return shards if shards[0] else []


def shard_names(count: int) -> list[str]:
    """model-00001-of-00003.safetensors, ... (transformers' naming)."""
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


class SafetensorsWriter:
    """One .safetensors file written tensor by tensor: the header from the planned entries, then each tensor's bytes
    in entry order (what safetensors.safe_open and transformers read)."""

    def __init__(self, path: Path | str, entries: Sequence[Entry], metadata: Optional[dict[str, str]] = None):
        self.path, self.entries, self.next = Path(path), list(entries), 0
        header, offset = {"__metadata__": dict(metadata or {"format": "pt"})}, 0
        for name, shape, dtype in self.entries:
            if dtype not in _CODES:
                raise HFFolderError(f"{name}: dtype {dtype} cannot be stored in safetensors")
            header[name] = {"dtype": _CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + _nbytes(
                (name, shape, dtype))]}
            offset += _nbytes((name, shape, dtype))
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
        self.file = open(self.path, "wb")
        self.file.write(struct.pack("<Q", len(text)) + text)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self.next >= len(self.entries) or self.entries[self.next][0] != name:
            expected = self.entries[self.next][0] if self.next < len(self.entries) else "nothing"
            raise HFFolderError(f"{self.path}: got tensor {name!r}, planned {expected!r} next")
        _, shape, dtype = self.entries[self.next]
        if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
            raise HFFolderError(f"{self.path}: tensor {name!r} is {tuple(tensor.shape)} {tensor.dtype}, planned "
                                f"{tuple(shape)} {dtype}")
        data = tensor.detach().cpu().contiguous().reshape(-1)
        self.file.write(memoryview(data.view(torch.uint8).numpy()))
        self.next += 1

    def close(self) -> None:
        if self.next != len(self.entries):
            raise HFFolderError(f"{self.path}: {len(self.entries) - self.next} planned tensors were never written")
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()


def write_shards(folder: Path | str, entries: Sequence[Entry], tensors: Iterable[tuple[str, torch.Tensor]],
                 max_bytes: int, progress: Optional[Callable[[str], None]] = None) -> dict:
    """Write the tensors (in entry order) as model-0000i-of-0000n.safetensors shards of at most max_bytes into
    folder, plus model.safetensors.index.json; returns the index."""
    folder = Path(folder)
    shards = plan_shards(entries, max_bytes)
    names = shard_names(len(shards))
    weight_map, stream = {}, iter(tensors)
    for file_name, shard in zip(names, shards):
        writer = SafetensorsWriter(folder / file_name, shard)
        with contextlib.closing(writer.file):  # closed on errors too (the caller removes the folder)
            for _ in shard:
                name, tensor = next(stream)
                if progress:
                    progress(name)
                writer.write(name, tensor)
                weight_map[name] = file_name
                del tensor  # released before the next one is made
            writer.close()
    index = {"metadata": {"total_size": sum(_nbytes(e) for e in entries)}, "weight_map": weight_map}
    (folder / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return index


def _nbytes(entry: Entry) -> int:
    _, shape, dtype = entry
    n = 1
    for d in shape:
        n *= d
    return n * torch.empty((), dtype=dtype).element_size()


def describe_hf_source(folder: "HFFolder") -> dict:
    """What an export needs back from the HF folder a checkpoint started from (meta.json's `source`): family, path,
    dtype, bos / eos / pad ids, generation config, and the tokenizer files to copy into hf_extra/."""
    dtype = folder.config.get("torch_dtype") or folder.config.get("dtype") or "float32"
    return {"format": "hf", "family": folder.config.get("model_type"), "path": str(folder.folder.resolve()),
            "dtype": dtype if dtype in ("float32", "bfloat16", "float16") else "float32",
            "token_ids": token_ids(folder.config, folder.generation_config),
            "generation_config": folder.generation_config, "tokenizer_files": tokenizer_files(folder.folder)}
