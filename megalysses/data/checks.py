"""Checks of the data against the model before any rank starts: token ids within the embedding, the tokenizer the
dataset was made with, conversations that fit train.seq_len, a source that exists and holds text. Cheap: metadata,
file sizes and the first bytes only."""
from __future__ import annotations

from megalysses.config import ConfigError, RunConfig

from .corpus import check_tokenizer, resolve_prefix
from .indexed import dataset_paths, is_indexed, read_meta
from .quickstart import check_text_source

BYTE_IDS = 256
"""Ids the quick-start (text) path uses: raw UTF-8 bytes 0..255."""


def check_data_against_model(cfg: RunConfig) -> None:
    """Raise ConfigError (one line: the value, the rule, the fix) when cfg.data cannot feed cfg.model: a preprocessed
    dataset whose recorded vocabulary or largest token id (EOS included) reaches past model.vocab_size, or made with
    another tokenizer than data.tokenizer; a text source that is missing, empty or binary, or whose byte ids do not
    fit. Call before ranks start."""
    try:
        if cfg.data.source != "builtin" and is_indexed(resolve_prefix(cfg.data.source)):
            _check_dataset(cfg, resolve_prefix(cfg.data.source))
        else:
            _check_text(cfg)
    except ConfigError:
        raise
    except (OSError, ValueError) as e:
        raise ConfigError(str(e)) from e


def _check_dataset(cfg: RunConfig, prefix: str) -> None:
    meta, vocab, source = read_meta(prefix), cfg.model.vocab_size, cfg.data.source
    where = dataset_paths(prefix)["json"]
    if meta["vocab_size"] > vocab:
        raise ConfigError(f"data.source = {source!r} was tokenised by {meta.get('tokenizer')!r} with "
                          f"{meta['vocab_size']} ids (vocab_size in {where}), more than model.vocab_size = {vocab}: "
                          f"its ids would index past the embedding; set model.vocab_size={meta['vocab_size']} (or more), "
                          f"or preprocess with a tokenizer of at most {vocab} ids")
    largest = max(meta.get("max_token_id", -1), meta["eos_id"])
    if largest >= vocab:
        raise ConfigError(f"data.source = {source!r} holds token id {largest} (max_token_id / eos_id in {where}), but "
                          f"model.vocab_size = {vocab} has ids 0..{vocab - 1}; set model.vocab_size={largest + 1} (or "
                          "more), or preprocess the source again")
    longest, seq_len = meta.get("max_document_tokens", 0), cfg.train.seq_len
    if "loss_mask" in meta and longest > seq_len:
        raise ConfigError(f"data.source = {source!r} holds a conversation of {longest} tokens (document "
                          f"{meta.get('longest_document')}; max_document_tokens in {where}), more than train.seq_len = "
                          f"{seq_len}: conversations are packed whole, never split across rows; set "
                          f"train.seq_len={longest} (or more), or preprocess again with --max-tokens {seq_len} "
                          "(--too-long truncate to cut such conversations)")
    check_tokenizer(cfg.data.tokenizer, _Recorded(prefix, meta))


class _Recorded:
    """What check_tokenizer reads of a dataset (its prefix and metadata), without mapping its files."""

    def __init__(self, prefix: str, meta: dict):
        self.prefix, self.meta = prefix, meta


def _check_text(cfg: RunConfig) -> None:
    source, tokenizer, vocab = cfg.data.source, cfg.data.tokenizer, cfg.model.vocab_size
    if tokenizer not in (None, "byte"):
        raise ConfigError(f"data.tokenizer = {tokenizer!r}: a text source (data.source = {source!r}) is read as raw "
                          "bytes, so only 'byte' applies; tokenise it with megalysses-preprocess --tokenizer "
                          f"{tokenizer} and set data.source to the output prefix")
    if vocab < BYTE_IDS:
        raise ConfigError(f"model.vocab_size = {vocab}: data.source = {source!r} is read as raw bytes, ids 0..255; "
                          f"set model.vocab_size={BYTE_IDS} (or more)")
    if source != "builtin":
        check_text_source(source)
