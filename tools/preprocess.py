"""megalysses-preprocess: text / JSONL / parquet files -> a tokenised, memory-mapped dataset (<prefix>.bin/.idx/.json).

    megalysses-preprocess books/ --output data/books                       # byte-level: ids 0..255, EOS 256
    megalysses-preprocess web/*.jsonl --output data/web --tokenizer tokenizer.json --workers 16
    megalysses-preprocess shards/*.parquet --output data/web --tokenizer llama3/ --text-key content

Documents: a .txt/.md file is one document (or one per line with --text-docs line); a .jsonl line is one document
(its --text-key field); a parquet row is one document (its --text-key column, needs pyarrow). .gz text and JSONL
files are read through gzip. Folders are searched for these suffixes in sorted order; documents keep input order.
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
from typing import Callable, Iterable, Iterator, Optional, Sequence

from megalysses.data.indexed import IndexedWriter
from megalysses.data.quickstart import SNIFF_BYTES, not_text
from megalysses.data.tokenizer import HFTokenizer, Tokenizer, load_tokenizer

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


def _jsonl_documents(path: Path, text_key: str) -> Iterator[str]:
    with _open_text(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg}); every line must be one JSON object") from e
            if not isinstance(record, dict) or text_key not in record:
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise ValueError(f"{path}:{n}: no key {text_key!r} (found {keys}); pass --text-key")
            if not isinstance(record[text_key], str):
                raise ValueError(f"{path}:{n}: {text_key!r} is {type(record[text_key]).__name__}, not text")
            yield record[text_key]


def _parquet_documents(path: Path, text_key: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError(f"{path}: reading parquet needs pyarrow: pip install pyarrow") from e
    table = pq.ParquetFile(path)
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


def chunked(docs: Iterable[str], size: int) -> Iterator[list[str]]:
    """Lists of `size` consecutive documents (the last may be shorter)."""
    chunk = []
    for doc in docs:
        chunk.append(doc)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


_WORKER_TOKENIZER: Optional[Tokenizer] = None


def _worker_init(spec: str, eos_token: Optional[str]) -> None:
    global _WORKER_TOKENIZER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker process: the workers are the parallelism
    _WORKER_TOKENIZER = load_tokenizer(spec, eos_token)


def _worker_encode(texts: list[str]) -> tuple[bytes, list[int], int]:
    data, lengths = _WORKER_TOKENIZER.encode_documents(texts)
    return data, lengths, sum(len(t) for t in texts)


def encoded_chunks(chunks: Iterable[list[str]], tokenizer: Tokenizer, spec: str, eos_token: Optional[str],
                   workers: int) -> Iterator[tuple[bytes, list[int], int]]:
    """(token bytes, lengths, characters) per chunk, in input order; workers > 1 encode in a process pool."""
    if workers <= 1:
        for texts in chunks:
            data, lengths = tokenizer.encode_documents(texts)
            yield data, lengths, sum(len(t) for t in texts)
        return
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    # the pool forks before this process reads or encodes anything (no threads yet: forking is safe)
    with multiprocessing.get_context(method).Pool(workers, _worker_init, (spec, eos_token)) as pool:
        pending: collections.deque = collections.deque()
        for texts in chunks:
            pending.append(pool.apply_async(_worker_encode, (texts,)))
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


def preprocess(inputs: Sequence[str], output: str, tokenizer: str = "byte", eos_token: Optional[str] = None,
               text_key: str = "text", text_docs: str = "file", workers: Optional[int] = None,
               chunk_docs: int = 256, overwrite: bool = False, progress: Optional[Progress] = None) -> dict:
    """Tokenise the documents of `inputs` into the dataset at prefix `output`; returns its metadata.

    workers None: 1 for 'byte' (encoding is a memory copy; processes would only add transfer), else all CPUs.
    """
    if text_docs not in ("file", "line"):
        raise ValueError(f"text_docs = {text_docs!r}: must be 'file' (a text file is one document) or 'line'")
    files = input_files(inputs)
    check_text_inputs(files)
    tok = load_tokenizer(tokenizer, eos_token)
    if workers is None:
        workers = 1 if tokenizer == "byte" else os.cpu_count() or 1
    if workers < 1 or chunk_docs < 1:
        raise ValueError(f"workers = {workers}, chunk_docs = {chunk_docs}: both must be >= 1")
    extra = {"tokenizer_sha256": tok.sha256, "eos_token": tok.eos_token} if isinstance(tok, HFTokenizer) else {}
    progress = progress or Progress()
    with IndexedWriter(output, vocab_size=tok.vocab_size, eos_id=tok.eos_id, tokenizer=tok.name,
                       overwrite=overwrite, meta=extra) as writer:
        chunks = chunked(read_documents(files, text_key, text_docs), chunk_docs)
        for data, lengths, chars in encoded_chunks(chunks, tok, tokenizer, eos_token, workers):
            writer.add(data, lengths)
            progress.update(len(lengths), sum(lengths), chars)
        if writer.num_tokens == 0:  # the with-block drops the temp files: nothing is written
            raise ValueError(f"{', '.join(map(str, inputs))}: {writer.num_documents} documents and 0 tokens: nothing to "
                             f"train on; give inputs that hold text (for JSONL / parquet, in the --text-key "
                             f"{text_key!r} field)")
        meta = writer.commit(sources=[str(f) for f in files], text_key=text_key, text_docs=text_docs)
    progress.out(progress.line())
    return meta


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="megalysses-preprocess", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", help="text (.txt, .md), .jsonl or .parquet files, or folders of them")
    p.add_argument("--output", "-o", required=True, help="output prefix: writes PREFIX.bin, PREFIX.idx, PREFIX.json")
    p.add_argument("--tokenizer", default="byte", help="'byte' (default) or a tokenizer.json (or its folder)")
    p.add_argument("--eos-token", default=None, help="the tokenizer's EOS token (default: found among "
                   "<|endoftext|>, <|end_of_text|>, </s>, <eos>)")
    p.add_argument("--text-key", default="text", help="JSONL field / parquet column holding the text")
    p.add_argument("--text-docs", choices=("file", "line"), default="file", help="a text file is one document, "
                   "or each line is one")
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
                   args.workers, args.chunk_docs, args.overwrite, Progress(args.progress_every))
    except (OSError, ValueError, ImportError, EOFError) as err:  # EOFError: a truncated .gz
        print(f"megalysses-preprocess: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
