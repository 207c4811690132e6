"""Benchmark the data pipeline: megalysses-preprocess tokens/s and the packed loader's sequences/s, against what a GPU
training step consumes.

    python scripts/bench_data.py                 # ~8 MB generated JSONL corpus, all CPUs
    python scripts/bench_data.py --mb 32 --workers 8

The corpus: documents of 1..40 paragraphs drawn (seeded) from the built-in standard-library documentation corpus.
Rows:
  preprocess   megalysses-preprocess on the corpus (read JSONL, tokenise, write .bin/.idx), wall time incl. reading;
               byte-level and a byte-level BPE tokenizer.json (vocab 8192, trained here on 2 MB of the corpus);
               in-process = workers 1 (a tokenizer.json then encodes each chunk on all cores through `tokenizers`'
               own threads), N worker processes = one single-threaded tokenizer per process
  loader       BatchLoader.next_batch() on the byte-level dataset, packed, one process, rows per batch as given;
               includes the epoch permutation when a new epoch starts
Columns: tokens/s, sequences/s (loader), and "x demand": tokens/s over what one GPU trains on. An 8B model at an
effective 400 TFLOP/s per GPU trains 4e14 / (6 * 8e9) = 8.3K tokens/s per GPU. Under Ulysses every rank of an sp
group loads the whole sequence, so a rank's loader must supply sp x 8.3K tokens/s: the "x demand" column is
for sp = 1; divide it by sp.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

import torch

from megalysses.data import BatchLoader, IndexedDataset, PackedDataset, builtin_corpus
from megalysses.tools.preprocess import Progress, preprocess

GPU_TOKENS_PER_S = 4e14 / (6 * 8e9)  # 8B model, 6 N FLOPs per token, 400 TFLOP/s effective


def make_corpus(path: Path, megabytes: float, seed: int = 0) -> int:
    """A JSONL file of about `megabytes` MB; returns the number of documents."""
    paragraphs = [p for p in builtin_corpus().split("\n\n") if p.strip()]
    rng, size, n = random.Random(seed), 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while size < megabytes * 1e6:
            doc = "\n\n".join(rng.choices(paragraphs, k=rng.randint(1, 40)))
            f.write(json.dumps({"text": doc}) + "\n")
            size, n = size + len(doc.encode()), n + 1
    return n


def train_bpe(corpus: Path, out: Path, vocab: int = 8192, sample_bytes: float = 2e6) -> Path:
    """A byte-level BPE tokenizer.json trained on the first `sample_bytes` of the corpus."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers
    texts, size = [], 0
    for line in corpus.open(encoding="utf-8"):
        texts.append(json.loads(line)["text"])
        size += len(texts[-1])
        if size > sample_bytes:
            break
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                      show_progress=False))
    tok.save(str(out))
    return out


def bench_preprocess(corpus: Path, prefix: Path, tokenizer: str, workers: int) -> tuple[float, int]:
    """(tokens/s, tokens) of one preprocessing run."""
    tic = time.perf_counter()
    meta = preprocess([str(corpus)], str(prefix), tokenizer=tokenizer, workers=workers, overwrite=True,
                      progress=Progress(interval=1e9, out=lambda line: None))
    return meta["num_tokens"] / (time.perf_counter() - tic), meta["num_tokens"]


def bench_loader(prefix: Path, seq_len: int, rows: int, seconds: float) -> float:
    """Sequences per second of BatchLoader.next_batch() (packed, one process)."""
    loader = BatchLoader(PackedDataset(IndexedDataset(prefix), seq_len, seed=0), rows)
    loader.next_batch()  # first epoch plan
    n, tic = 0, time.perf_counter()
    while time.perf_counter() - tic < seconds:
        loader.next_batch()
        n += rows
    return n / (time.perf_counter() - tic)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=float, default=8.0, help="corpus size in MB of UTF-8 text")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="preprocessing processes")
    p.add_argument("--seconds", type=float, default=3.0, help="time per loader measurement")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads for the loader (a training rank "
                   "runs its loader on the main thread; extra threads only pay off when cores are idle)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        docs = make_corpus(tmp / "corpus.jsonl", args.mb)
        print(f"corpus: {args.mb:g} MB JSONL, {docs} documents; {os.cpu_count()} CPUs, loader on {args.threads} "
              f"torch thread(s); GPU demand "
              f"{GPU_TOKENS_PER_S:,.0f} tokens/s per GPU (8B model, 400 TFLOP/s)\n")
        print("| what | setting | tokens/s | sequences/s | x demand |")
        print("|---|---|---:|---:|---:|")
        bpe = train_bpe(tmp / "corpus.jsonl", tmp / "tokenizer.json")
        for name, tokenizer in (("byte-level", "byte"), ("tokenizer.json BPE 8K", str(bpe))):
            for workers in sorted({1, args.workers}):
                rate, _ = bench_preprocess(tmp / "corpus.jsonl", tmp / "bench", tokenizer, workers)
                how = "in-process" if workers == 1 else f"{workers} worker processes"
                print(f"| preprocess | {name}, {how} | {rate:,.0f} | | {rate / GPU_TOKENS_PER_S:,.0f} |")
        bench_preprocess(tmp / "corpus.jsonl", tmp / "bytes", "byte", 1)
        for seq_len, rows in ((8192, 8), (131072, 1)):
            seqs = bench_loader(tmp / "bytes", seq_len, rows, args.seconds)
            tokens = seqs * seq_len
            print(f"| loader | packed, seq_len {seq_len}, {rows} row(s)/batch | {tokens:,.0f} | {seqs:,.1f} | "
                  f"{tokens / GPU_TOKENS_PER_S:,.0f} |")


if __name__ == "__main__":
    main()
