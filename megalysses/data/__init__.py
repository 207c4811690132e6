"""Training data: quick-start token windows, and the tokenised pipeline (preprocess -> memory map -> pack -> blend -> load).

- Quick start (`data.source` = 'builtin', a .txt file or a folder): `TokenWindows`, random byte windows per step.
- Tokenised (`data.source` = a prefix written by `megalysses-preprocess`): `PackedCorpus` -> `PackedDataset`
  (documents packed with EOS, position_ids reset per document, loss mask; or one padded document per row),
  `BlendedDataset` (several datasets by weight), `BatchLoader` (this dp rank's rows, checkpointable state).
- Chat / instruction data (`chat.py`: records rendered with the tokenizer's chat template, a stored per-token loss
  mask): the same path; conversations are packed whole and labels are IGNORE_INDEX on untrained tokens.

How the trainer calls it (one loader per rank; the dp rows are taken here, the sp split stays the trainer's):

    data = build_dataset(cfg.data)
    if isinstance(data, PackedCorpus):
        loader = data.loader("train", cfg.train.seq_len, cfg.train.global_batch_size,
                             dp_rank=mesh.rank("dp"), dp_size=mesh.size("dp"))
        loader.load_state_dict(checkpoint["data"])            # when resuming
        batch = loader.next_batch()                           # (global_batch / dp, seq_len) each
        ids, labels, pos = pad_sequence_batch(batch.input_ids, batch.labels, batch.position_ids, unit)
        ... shard_sequence(t, mesh.group("sp")) for t in (ids, pos, labels), micro-batch by rows ...
        checkpoint["data"] = loader.state_dict()              # plain ints / strings / lists
    validation: data.loader("val", ...).batch_at(i * global_batch_size) for i in range(eval_steps)
"""
from __future__ import annotations

from typing import Union

from megalysses.config import DataConfig

from .blend import BlendedDataset, apportion
from .checks import check_data_against_model
from .corpus import PackedCorpus, resolve_prefix, split_documents
from .indexed import IndexedDataset, IndexedWriter, dataset_paths, is_indexed
from .loader import BatchLoader, dp_rows
from .packed import Batch, PackedDataset, seeded_generator
from .quickstart import CORPUS_MODULES, TokenWindows, builtin_corpus, byte_tokens, load_text
from .tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer, token_dtype


def build_dataset(cfg: DataConfig) -> Union[TokenWindows, PackedCorpus]:
    """`PackedCorpus` when data.source is a preprocessed prefix (<source>.bin/.idx/.json), else `TokenWindows`."""
    if cfg.source != "builtin" and is_indexed(resolve_prefix(cfg.source)):
        return PackedCorpus.from_config(cfg)
    return TokenWindows.from_config(cfg)


from .steps import StepData  # noqa: E402 - it builds datasets with build_dataset, defined above

__all__ = ["Batch", "BatchLoader", "BlendedDataset", "ByteTokenizer", "CORPUS_MODULES", "HFTokenizer",
           "IndexedDataset", "IndexedWriter", "PackedCorpus", "PackedDataset", "StepData", "TokenWindows", "apportion",
           "build_dataset", "builtin_corpus", "byte_tokens", "check_data_against_model", "dataset_paths", "dp_rows",
           "is_indexed", "load_text", "load_tokenizer", "resolve_prefix", "seeded_generator", "split_documents", "token_dtype"]
