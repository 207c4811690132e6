"""Tokenizers for preprocessing: byte-level (no files) or a Hugging Face `tokenizers` tokenizer.json.

Both encode a list of documents into one little-endian token buffer plus the document lengths, the unit that
`IndexedWriter.add` appends. Packing appends EOS after each document. A tokenizer.json whose post-processor puts
tokens before the text (its BOS, as `add_special_tokens=True` would: Llama, Mistral) gets them at the start of every
document; nothing after the text is added (EOS comes from packing). The byte-level tokenizer adds nothing.
"""
from __future__ import annotations

import hashlib
import itertools
import sys
from array import array
from pathlib import Path
from typing import Optional, Sequence, Union

EOS_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>")
"""Special tokens taken as EOS (in this order) when a tokenizer.json is loaded without an explicit eos_token."""


def token_dtype(vocab_size: int) -> str:
    """'uint16' when every id fits 16 bits (vocab_size <= 65536), else 'uint32'."""
    if not 1 <= vocab_size <= 2**32:
        raise ValueError(f"vocab_size = {vocab_size}: must be in [1, 2**32] to store ids as uint16 or uint32")
    return "uint16" if vocab_size <= 2**16 else "uint32"


class ByteTokenizer:
    """Byte-level: the UTF-8 bytes of the text are ids 0..255, EOS is 256 (vocab 257); lossless, needs no files."""

    name = "byte"
    vocab_size = 257
    eos_id = 256
    dtype = "uint16"
    bos_ids: tuple[int, ...] = ()  # adds no BOS

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_documents(self, texts: Sequence[str]) -> tuple[bytes, list[int]]:
        """Documents -> (little-endian uint16 ids of all documents, concatenated; each document's length)."""
        encoded = [t.encode("utf-8") for t in texts]
        raw = b"".join(encoded)
        out = bytearray(2 * len(raw))
        out[0::2] = raw  # low byte = the byte's value, high byte = 0: uint16 little-endian
        return bytes(out), [len(e) for e in encoded]

    def decode(self, ids: Sequence[int]) -> str:
        """ids 0..255 back to text (EOS and padding, id 256, are dropped)."""
        return bytes(i for i in ids if i != self.eos_id).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face `tokenizers` tokenizer.json; documents are encoded without the post-processor's specials."""

    def __init__(self, path: Union[str, Path], eos_token: Optional[str] = None):
        try:
            from tokenizers import Tokenizer
        except ImportError as e:
            raise ImportError(f"tokenizer {str(path)!r} needs the Hugging Face 'tokenizers' package: "
                              "pip install tokenizers (or use the byte-level tokenizer 'byte')") from e
        self.path = Path(path)
        try:
            self._tok = Tokenizer.from_file(str(self.path))
        except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception for a malformed file
            raise ValueError(f"tokenizer {str(path)!r}: not a Hugging Face tokenizer.json ({e}); pass the "
                             "tokenizer.json saved with the model (tokenizer.save), or 'byte'") from e
        self.name = str(path)
        self.sha256 = file_sha256(self.path)
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1
        self.dtype = token_dtype(self.vocab_size)
        self.eos_token = self._find_eos(vocab, eos_token)
        self.eos_id = vocab[self.eos_token]
        self.bos_ids = self._bos_ids()

    def _bos_ids(self) -> list[int]:
        """The ids the post-processor puts before a text when special tokens are added (BOS; [] for none)."""
        plain = self._tok.encode("a", add_special_tokens=False).ids
        full = self._tok.encode("a", add_special_tokens=True).ids
        for k in range(len(full) - len(plain) + 1):
            if full[k:k + len(plain)] == plain:
                return full[:k]
        return []

    def _find_eos(self, vocab: dict[str, int], eos_token: Optional[str]) -> str:
        if eos_token is not None:
            if eos_token not in vocab:
                raise ValueError(f"eos_token {eos_token!r} is not in the vocabulary of {self.name}; "
                                 f"pass one of its special tokens, e.g. {_specials(self._tok)[:5]}")
            return eos_token
        for candidate in EOS_CANDIDATES:
            if candidate in vocab:
                return candidate
        raise ValueError(f"{self.name} has none of the usual EOS tokens {EOS_CANDIDATES}; name its EOS token "
                         f"(--eos-token), e.g. one of {_specials(self._tok)[:5]}")

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_documents(self, texts: Sequence[str]) -> tuple[bytes, list[int]]:
        """Documents -> (little-endian ids of all documents, each after the BOS ids, concatenated; their lengths)."""
        encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)  # _fast: no character offsets
        encodings = encode(list(texts), add_special_tokens=False)
        bos = self.bos_ids
        ids = array("H" if self.dtype == "uint16" else "I", itertools.chain.from_iterable(
            itertools.chain(bos, e.ids) for e in encodings))
        if sys.byteorder == "big":
            ids.byteswap()
        return ids.tobytes(), [len(bos) + len(e.ids) for e in encodings]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)


Tokenizer = Union[ByteTokenizer, HFTokenizer]


def _specials(tok) -> list[str]:
    return [t.content for t in tok.get_added_tokens_decoder().values() if t.special]


def file_sha256(path: Union[str, Path]) -> str:
    """Hex SHA-256 of a file's bytes (recorded so a dataset names exactly the tokenizer that made it)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load_tokenizer(spec: str, eos_token: Optional[str] = None) -> Tokenizer:
    """'byte', or the path of a tokenizer.json (or of a folder holding one)."""
    if spec == "byte":
        if eos_token is not None:
            raise ValueError(f"eos_token = {eos_token!r}: the byte-level tokenizer's EOS is always id 256; drop it")
        return ByteTokenizer()
    path = Path(spec)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer = {spec!r}: no such file; use 'byte' or the path of a Hugging Face "
                                "tokenizer.json (or of a folder holding one)")
    return HFTokenizer(path, eos_token)
