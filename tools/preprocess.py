"""megalysses-preprocess: text / JSONL / parquet files -> a tokenised, memory-mapped dataset (<prefix>.bin/.idx/.json).

    megalysses-preprocess books/ --output data/books                       # byte-level: ids 0..255, EOS 256
    megalysses-preprocess web/*.jsonl --output data/web --tokenizer tokenizer.json --workers 16
    megalysses-preprocess shards/*.parquet --output data/web --tokenizer llama3/ --text-key content
    megalysses-preprocess chats.jsonl --output data/sft --tokenizer llama3-instruct/   # chat: + <prefix>.mask

Documents: a .txt/.md file is one document (or one per line with --text-docs line); a .jsonl line is one document
(its --text-key field); a parquet row is one document (its --text-key column, needs pyarrow). .gz text and JSONL
files are read through gzip. Folders are searched for these suffixes in sorted order; documents keep input order.
A tokenizer whose post-processor adds a BOS (add_special_tokens=True) gets it at the start of each document.

Chat and instruction records (JSONL / parquet; --records, detected from the first record by default): 'messages'
(a list of {role, content}, roles system / user / assistant, and tool when the template renders it) or 'prompt' /
'completion'. Each record is one conversation, rendered with the tokenizer's own chat template (a folder saved with
`save_pretrained`, rendered by transformers); the dataset gets a loss mask (<prefix>.mask) that trains the assistant
turns and their end-of-turn tokens only. Packing keeps each conversation whole (see megalysses/data/packed.py);
--max-tokens refuses longer conversations here already, or cuts them with --too-long truncate.
Workers tokenise chunks of documents in parallel (order preserved, a bounded number of chunks in flight); the
output is written to temp files and renamed into place at the end, so an interrupted run leaves nothing behind.
Invalid UTF-8 bytes are read as U+FFFD, so decoding gives back the source text exactly when the source is valid
UTF-8 (and the tokenizer is lossless, as byte-level and byte-level BPE tokenizers are).
"""
from __future__ import annotations

import argparse
import collections
import gzip
import io
import json
import multiprocessing
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Optional, Sequence, TypeVar

from megalysses.data.chat import KINDS, ChatEncoder, record_kind, record_messages, record_tools
from megalysses.data.indexed import IndexedWriter
from megalysses.data.quickstart import SNIFF_BYTES, not_text
from megalysses.data.tokenizer import HFTokenizer, load_tokenizer

T = TypeVar("T")
FORMATS = {".txt": "text", ".text": "text", ".md": "text", ".jsonl": "jsonl", ".parquet": "parquet"}


def file_format(path: Path) -> Optional[str]:
    """'text', 'jsonl' or 'parquet' from the suffix (a trailing .gz is read through gzip); None if unknown."""
    suffixes = path.suffixes[-2:] if path.suffix == ".gz" else path.suffixes[-1:]
    fmt = FORMATS.get(suffixes[0].lower()) if suffixes else None
    return None if fmt == "parquet" and path.suffix == ".gz" else fmt


def input_files(inputs: Sequence[str]) -> list[Path]:
    """Files given directly, and the files of known format inside given folders (sorted)."""
    files = []
    for name in inputs:
        path = Path(name)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and file_format(p))
            if not found:
                raise FileNotFoundError(f"{name}: the folder holds no {', '.join(FORMATS)} (or .gz) files")
            files += found
        elif path.is_file():
            if not file_format(path):
                raise ValueError(f"{name}: unknown format; name it {', '.join(FORMATS)} (text and JSONL may end .gz)")
            files.append(path)
        else:
            raise FileNotFoundError(f"{name}: no such file or folder")
    return files


def check_text_inputs(files: Sequence[Path]) -> None:
    """Raise ValueError naming the first text or JSONL input whose first bytes are binary (NULs, invalid UTF-8)."""
    for path in files:
        if file_format(path) in ("text", "jsonl"):
            try:
                with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
                    why = not_text(f.read(SNIFF_BYTES))
            except (OSError, EOFError) as e:  # a damaged or truncated .gz
                raise ValueError(f"{path}: unreadable ({e}); re-create or re-download the file") from e
            if why:
                raise ValueError(f"{path}: not text ({why}); text and JSONL inputs must be UTF-8: remove the file "
                                 "from the inputs, or convert it to text first")


def _open_text(path: Path) -> io.TextIOBase:
    raw = gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")
    return io.TextIOWrapper(raw, encoding="utf-8", errors="replace", newline="")


def _text_documents(path: Path, text_docs: str) -> Iterator[str]:
    with _open_text(path) as f:
        if text_docs == "file":
            yield f.read()
            return
        for line in f:
            yield line[:-1] if line.endswith("\n") else line


def _jsonl_records(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed JSON value) of each non-empty line."""
    with _open_text(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg}); every line must be one JSON object") from e


def _jsonl_documents(path: Path, text_key: str) -> Iterator[str]:
    for n, record in _jsonl_records(path):
        if not isinstance(record, dict) or text_key not in record:
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise ValueError(f"{path}:{n}: no key {text_key!r} (found {keys}); pass --text-key naming the text field, "
                             "or give chat records ('messages': a list of {role, content}; or 'prompt' and "
                             "'completion'): a record needs text or messages")
        if not isinstance(record[text_key], str):
            raise ValueError(f"{path}:{n}: {text_key!r} is {type(record[text_key]).__name__}, not text")
        yield record[text_key]


def _parquet_file(path: Path):
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError(f"{path}: reading parquet needs pyarrow: pip install pyarrow") from e
    return pq.ParquetFile(path)


def _parquet_documents(path: Path, text_key: str) -> Iterator[str]:
    table = _parquet_file(path)
    if text_key not in table.schema_arrow.names:
        raise ValueError(f"{path}: no column {text_key!r} (found {table.schema_arrow.names}); pass --text-key")
    for batch in table.iter_batches(columns=[text_key], batch_size=4096):
        for text in batch.column(0).to_pylist():
            if not isinstance(text, str):
                raise ValueError(f"{path}: a {text_key!r} value is {type(text).__name__}, not text")
            yield text


def read_documents(files: Iterable[Path], text_key: str = "text", text_docs: str = "file") -> Iterator[str]:
    """The documents of every file, in order."""
    for path in files:
        fmt = file_format(path)
        try:
            if fmt == "text":
                yield from _text_documents(path, text_docs)
            elif fmt == "jsonl":
                yield from _jsonl_documents(path, text_key)
            else:
                yield from _parquet_documents(path, text_key)
        except EOFError as e:  # a .gz cut short past the part check_text_inputs read
            raise ValueError(f"{path}: unreadable ({e}); re-create or re-download the file") from e


def _first_keys(path: Path) -> tuple[str, Optional[list[str]]]:
    """(where, keys) of the first record of a JSONL or parquet file (keys None: no record, or not an object)."""
    if file_format(path) == "parquet":
        return str(path), list(_parquet_file(path).schema_arrow.names)
    for n, record in _jsonl_records(path):
        return f"{path}:{n}", sorted(record) if isinstance(record, dict) else None
    return str(path), None


def detect_records(files: Sequence[Path], records: str, text_key: str, messages_key: str) -> tuple[str, str]:
    """(record kind, how it was chosen): --records when given, else the first file's first record's keys."""
    if records not in ("auto",) + KINDS:
        raise ValueError(f"records = {records!r}: must be 'auto' or one of {KINDS}")
    if records != "auto":
        return records, "--records"
    if not files or file_format(files[0]) == "text":
        return "text", "auto: text files"
    try:
        where, keys = _first_keys(files[0])
    except EOFError as e:  # a .gz cut short past the part check_text_inputs read
        raise ValueError(f"{files[0]}: unreadable ({e}); re-create or re-download the file") from e
    kind = record_kind(keys or [], text_key, messages_key)
    if kind is None:  # neither text nor chat: the text reader names the record and the keys it lacks
        return "text", f"auto: {where} holds no record with known keys"
    return kind, f"auto: the keys of {where}"


def _record_rows(path: Path, messages_key: str) -> Iterator[tuple[str, Any]]:
    """(where, record) of each JSONL line or parquet row."""
    if file_format(path) == "jsonl":
        for n, record in _jsonl_records(path):
            yield f"{path}:{n}", record
        return
    table = _parquet_file(path)
    columns = [c for c in (messages_key, "prompt", "completion", "tools") if c in table.schema_arrow.names]
    row = 0
    for batch in table.iter_batches(columns=columns, batch_size=1024):
        for record in batch.to_pylist():
            row += 1
            yield f"{path} row {row}", record


def read_conversations(files: Iterable[Path], kind: str, messages_key: str = "messages"
                       ) -> Iterator[tuple[str, list[dict], Optional[list]]]:
    """(where, messages, tools) of every chat or prompt-completion record, in order; where names file, line, index."""
    index = 0
    for path in files:
        if file_format(path) == "text":
            raise ValueError(f"{path}: a text file among {kind} records: a dataset holds one kind of record; "
                             "preprocess text and chat data separately (and blend the datasets)")
        try:
            for where, record in _record_rows(path, messages_key):
                where = f"{where} (record {index})"
                if not isinstance(record, dict):
                    raise ValueError(f"{where}: a JSON {type(record).__name__}, not an object; every line must be "
                                     "one record object")
                yield where, record_messages(record, kind, where, messages_key), record_tools(record, where)
                index += 1
        except EOFError as e:  # a .gz cut short past the part check_text_inputs read
            raise ValueError(f"{path}: unreadable ({e}); re-create or re-download the file") from e


def chunked(docs: Iterable[T], size: int) -> Iterator[list[T]]:
    """Lists of `size` consecutive documents (the last may be shorter)."""
    chunk = []
    for doc in docs:
        chunk.append(doc)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class Encoded(NamedTuple):
    """One chunk encoded: token bytes, document lengths, mask bytes (chat) or None, characters, truncated count."""

    data: bytes
    lengths: list[int]
    mask: Optional[bytes]
    chars: int
    truncated: int


class Encoder:
    """Encodes chunks of one record kind: text documents, or conversations with their loss mask."""

    def __init__(self, kind: str, spec: str, eos_token: Optional[str], max_tokens: Optional[int] = None,
                 too_long: str = "refuse"):
        self.kind, self.chat = kind, None
        if kind == "text":
            if max_tokens is not None:
                raise ValueError(f"--max-tokens {max_tokens} applies to chat records (kept whole); text documents "
                                 "are split across rows by packing: drop --max-tokens")
            self.tokenizer = load_tokenizer(spec, eos_token)
            return
        if spec == "byte":
            raise ValueError(f"tokenizer = 'byte' has no chat template, and {kind} records are rendered with the "
                             "tokenizer's own: pass --tokenizer <folder of the chat model's tokenizer>")
        if max_tokens is not None and max_tokens < 1 or too_long not in ("refuse", "truncate"):
            raise ValueError(f"max_tokens = {max_tokens}, too_long = {too_long!r}: max_tokens must be >= 1 and "
                             "too_long 'refuse' or 'truncate'")
        self.chat = ChatEncoder(spec, eos_token, max_tokens, too_long)
        self.tokenizer = self.chat.base

    def __call__(self, chunk: list) -> Encoded:
        if self.chat is None:
            data, lengths = self.tokenizer.encode_documents(chunk)
            return Encoded(data, lengths, None, sum(len(t) for t in chunk), 0)
        data, lengths, mask, truncated = self.chat.encode_conversations(chunk)
        return Encoded(data, lengths, mask, sum(len(m["content"]) for _, ms, _ in chunk for m in ms), truncated)


_WORKER_ENCODER: Optional[Encoder] = None


def _worker_init(encoder_args: tuple) -> None:
    global _WORKER_ENCODER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker process: the workers are the parallelism
    _WORKER_ENCODER = Encoder(*encoder_args)


def _worker_encode(chunk: list) -> Encoded:
    return _WORKER_ENCODER(chunk)


def encoded_chunks(chunks: Iterable[list], encoder: Encoder, encoder_args: tuple, workers: int) -> Iterator[Encoded]:
    """Each chunk encoded, in input order; workers > 1 encode in a process pool (each builds Encoder(*encoder_args))."""
    if workers <= 1:
        for chunk in chunks:
            yield encoder(chunk)
        return
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    # the pool forks before this process reads or encodes anything (no threads yet: forking is safe)
    with multiprocessing.get_context(method).Pool(workers, _worker_init, (encoder_args,)) as pool:
        pending: collections.deque = collections.deque()
        for chunk in chunks:
            pending.append(pool.apply_async(_worker_encode, (chunk,)))
            if len(pending) >= 2 * workers:  # bounded: never read the whole corpus ahead of the encoders
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


class Progress:
    """One line to stderr every `interval` seconds and at the end: documents, tokens, tokens/s."""

    def __init__(self, interval: float = 5.0, out: Optional[Callable[[str], None]] = None):
        self.interval, self.out = interval, out or (lambda line: print(line, file=sys.stderr, flush=True))
        self.start = self.last = time.monotonic()
        self.docs = self.tokens = self.chars = 0

    def update(self, docs: int, tokens: int, chars: int) -> None:
        self.docs, self.tokens, self.chars = self.docs + docs, self.tokens + tokens, self.chars + chars
        if time.monotonic() - self.last >= self.interval:
            self.last = time.monotonic()
            self.out(self.line())

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        return (f"megalysses-preprocess: {self.docs:,} documents, {self.tokens:,} tokens, {self.chars / 1e6:,.1f}M "
                f"characters in {elapsed:.1f}s ({self.tokens / elapsed / 1e6:,.2f}M tokens/s)")




def _tokenizer_meta(encoder: Encoder) -> dict:
    """What the metadata records of the tokenizer: its file's SHA-256, EOS, BOS ids, the chat template."""
    tok = encoder.tokenizer
    if not isinstance(tok, HFTokenizer):
        return {}
    meta = {"tokenizer_sha256": tok.sha256, "eos_token": tok.eos_token}
    if encoder.chat is None:
        return {**meta, "bos_ids": list(tok.bos_ids)}
    return {**meta, "tokenizer_dir": str(tok.path.parent), "chat_template_sha256": encoder.chat.template_sha256}


def preprocess(inputs: Sequence[str], output: str, tokenizer: str = "byte", eos_token: Optional[str] = None,
               text_key: str = "text", text_docs: str = "file", workers: Optional[int] = None,
               chunk_docs: int = 256, overwrite: bool = False, progress: Optional[Progress] = None,
               records: str = "auto", messages_key: str = "messages", max_tokens: Optional[int] = None,
               too_long: str = "refuse") -> dict:
    """Tokenise the documents (or conversations) of `inputs` into the dataset at prefix `output`; returns its metadata.

    workers None: 1 for 'byte' (encoding is a memory copy; processes would only add transfer), else all CPUs.
    """
    if text_docs not in ("file", "line"):
        raise ValueError(f"text_docs = {text_docs!r}: must be 'file' (a text file is one document) or 'line'")
    files = input_files(inputs)
    check_text_inputs(files)
    kind, chosen = detect_records(files, records, text_key, messages_key)
    encoder_args = (kind, tokenizer, eos_token, max_tokens, too_long)
    encoder = Encoder(*encoder_args)
    if workers is None:
        workers = 1 if tokenizer == "byte" else os.cpu_count() or 1
    if workers < 1 or chunk_docs < 1:
        raise ValueError(f"workers = {workers}, chunk_docs = {chunk_docs}: both must be >= 1")
    tok, chat = encoder.tokenizer, encoder.chat is not None
    progress = progress or Progress()
    with IndexedWriter(output, vocab_size=tok.vocab_size, eos_id=tok.eos_id, tokenizer=tok.name,
                       overwrite=overwrite, meta=_tokenizer_meta(encoder), loss_mask=chat) as writer:
        items = read_conversations(files, kind, messages_key) if chat else read_documents(files, text_key, text_docs)
        truncated = 0
        for enc in encoded_chunks(chunked(items, chunk_docs), encoder, encoder_args, workers):
            writer.add(enc.data, enc.lengths, enc.mask)
            truncated += enc.truncated
            progress.update(len(enc.lengths), sum(enc.lengths), enc.chars)
        _check_not_empty(writer, inputs, kind, text_key, len(tok.bos_ids) if not chat else 0)
        how = {"messages_key": messages_key, "max_tokens": max_tokens, "too_long": too_long,
               "truncated_documents": truncated} if chat else {"text_key": text_key, "text_docs": text_docs}
        meta = writer.commit(sources=[str(f) for f in files], records=kind, records_chosen_by=chosen, **how)
    progress.out(progress.line())
    return meta


def _check_not_empty(writer: IndexedWriter, inputs: Sequence[str], kind: str, text_key: str, bos: int) -> None:
    """Refuse a dataset with no text tokens (BOS aside) or, for chat, no trained token; the writer then drops it."""
    if writer.num_tokens - bos * writer.num_documents == 0:
        raise ValueError(f"{', '.join(map(str, inputs))}: {writer.num_documents} documents and 0 tokens: nothing to "
                         f"train on; give inputs that hold text (for JSONL / parquet, in the --text-key "
                         f"{text_key!r} field)")
    if kind != "text" and writer.num_trained_tokens == 0:
        raise ValueError(f"{', '.join(map(str, inputs))}: {writer.num_documents} conversations and no assistant "
                         "turn: nothing is trained (only assistant turns are); give conversations with assistant "
                         "replies")


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="megalysses-preprocess", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", help="text (.txt, .md), .jsonl or .parquet files, or folders of them")
    p.add_argument("--output", "-o", required=True, help="output prefix: writes PREFIX.bin, PREFIX.idx, PREFIX.json "
                   "(and PREFIX.mask for chat records)")
    p.add_argument("--tokenizer", default="byte", help="'byte' (default) or a tokenizer.json (or its folder; for "
                   "chat records the folder saved with save_pretrained, holding the chat template)")
    p.add_argument("--eos-token", default=None, help="the tokenizer's EOS token (default: found among "
                   "<|endoftext|>, <|end_of_text|>, </s>, <eos>)")
    p.add_argument("--records", choices=("auto",) + KINDS, default="auto", help="what a JSONL line / parquet row "
                   "holds: text (--text-key), messages (--messages-key) or prompt-completion; auto (default): "
                   "from the first record's keys, messages first")
    p.add_argument("--text-key", default="text", help="JSONL field / parquet column holding the text")
    p.add_argument("--messages-key", default="messages", help="JSONL field / parquet column holding a "
                   "conversation (a list of {role, content})")
    p.add_argument("--text-docs", choices=("file", "line"), default="file", help="a text file is one document, "
                   "or each line is one")
    p.add_argument("--max-tokens", type=int, default=None, help="chat records: refuse a conversation longer than "
                   "this many tokens (conversations are never split; use train.seq_len), or cut it with --too-long")
    p.add_argument("--too-long", choices=("refuse", "truncate"), default="refuse", help="with --max-tokens: refuse "
                   "a longer conversation (default) or keep its first --max-tokens tokens")
    p.add_argument("--workers", type=int, default=None, help="tokenising processes (default: 1 for 'byte', where "
                   "encoding is a memory copy, else all CPUs)")
    p.add_argument("--chunk-docs", type=int, default=256, help="documents per work item")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset at the prefix")
    p.add_argument("--progress-every", type=float, default=5.0, help="seconds between progress lines")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        preprocess(args.inputs, args.output, args.tokenizer, args.eos_token, args.text_key, args.text_docs,
                   args.workers, args.chunk_docs, args.overwrite, Progress(args.progress_every), args.records,
                   args.messages_key, args.max_tokens, args.too_long)
    except (OSError, ValueError, ImportError, EOFError) as err:  # EOFError: a truncated .gz
        print(f"megalysses-preprocess: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
