"""The data is checked against the model before any rank starts (check_data_against_model): ids past the embedding,
a tokenizer other than the recorded one, a missing / incomplete / empty / binary source; preprocessing records the
largest id and refuses binary inputs and empty output; the quick-start path refuses what it would have trained on."""
import dataclasses

import pytest

from megalysses.config import ConfigError, DataConfig, RunConfig
from megalysses.data import build_dataset, check_data_against_model, load_text
from megalysses.data.indexed import IndexedDataset, IndexedWriter, dataset_paths
from megalysses.models.config import GPTConfig
from megalysses.tools.preprocess import main as preprocess_main
from megalysses.tools.preprocess import preprocess
from tests.test_data_preprocess import DOCS, quiet, tiny_bpe


def cfg(source, vocab=512, tokenizer=None):
    return RunConfig(model=GPTConfig(vocab_size=vocab), data=DataConfig(source=str(source), tokenizer=tokenizer))


def refused(config, pattern):
    with pytest.raises(ConfigError, match=pattern) as err:
        check_data_against_model(config)
    assert "\n" not in str(err.value)


@pytest.fixture
def byte_data(tmp_path):
    (tmp_path / "docs.txt").write_text("\n".join(DOCS), encoding="utf-8")
    preprocess([str(tmp_path / "docs.txt")], str(tmp_path / "bytes"), text_docs="line", progress=quiet())
    return tmp_path / "bytes"


def test_preprocessing_records_the_largest_id(byte_data):
    meta = IndexedDataset(byte_data).meta
    assert meta["max_token_id"] == max(b"".join(d.encode() for d in DOCS)) and meta["vocab_size"] == 257


def test_a_dataset_that_fits_passes_and_its_tokenizer_is_the_default(byte_data):
    for source in (byte_data, f"{byte_data}.bin", f"{byte_data}.json"):
        check_data_against_model(cfg(source, vocab=257))
        check_data_against_model(cfg(source, vocab=257, tokenizer="byte"))
    assert build_dataset(DataConfig(source=str(byte_data))).data.meta["tokenizer"] == "byte"  # None: the recorded one


def test_recorded_vocabulary_past_the_model_is_refused(byte_data):
    refused(cfg(byte_data, vocab=256), r"data.source = '.*bytes' was tokenised by 'byte' with 257 ids \(vocab_size "
            r"in .*bytes.json\), more than model.vocab_size = 256: .* set model.vocab_size=257")


def test_a_recorded_largest_id_past_the_model_is_refused(tmp_path):
    with IndexedWriter(tmp_path / "d", vocab_size=100, eos_id=0, tokenizer="byte") as w:
        w.add(bytes([5, 0, 90, 0]), [2])
        w.commit()
    check_data_against_model(cfg(tmp_path / "d", vocab=100))
    meta_path = dataset_paths(tmp_path / "d")["json"]
    meta_path.write_text(meta_path.read_text().replace('"max_token_id": 90', '"max_token_id": 150'))
    refused(cfg(tmp_path / "d", vocab=100), r"holds token id 150 .* model.vocab_size = 100 has ids 0..99; set "
            r"model.vocab_size=151")


def test_another_tokenizer_than_the_recorded_one_is_refused(tmp_path, byte_data):
    bpe = tiny_bpe(tmp_path)
    refused(cfg(byte_data, vocab=257, tokenizer=str(bpe)), r"was tokenised with 'byte' .*: set data.tokenizer=byte")
    preprocess([str(tmp_path / "docs.txt")], str(tmp_path / "bpe"), tokenizer=str(bpe), workers=1, progress=quiet())
    check_data_against_model(cfg(tmp_path / "bpe", vocab=320))
    check_data_against_model(cfg(tmp_path / "bpe", vocab=320, tokenizer=str(bpe)))
    refused(cfg(tmp_path / "bpe", vocab=320, tokenizer="byte"), r"set data.tokenizer=.*tokenizer.json")
    refused(cfg(tmp_path / "bpe", vocab=256), r"with 300 ids .* more than model.vocab_size = 256")


def test_an_incomplete_dataset_is_refused_not_read_as_text(byte_data):
    dataset_paths(byte_data)["json"].unlink()
    refused(cfg(f"{byte_data}.bin"), r"no indexed dataset at prefix .*bytes' \(.*bytes.json missing; only .*bytes.bin, "
            r".*bytes.idx exist\(s\).*copy all three files")
    with pytest.raises(FileNotFoundError, match="unfinished or interrupted"):
        build_dataset(DataConfig(source=f"{byte_data}.bin"))
    dataset_paths(byte_data)["idx"].unlink()
    refused(cfg(f"{byte_data}.bin"), r"only .*bytes.bin exist")


def test_text_sources_empty_binary_or_too_small_for_bytes_are_refused(tmp_path):
    check_data_against_model(cfg("builtin", vocab=256))
    refused(cfg("builtin", vocab=200), r"model.vocab_size = 200: data.source = 'builtin' is read as raw bytes, ids "
            r"0..255; set model.vocab_size=256")
    refused(cfg("builtin", tokenizer="tok.json"), r"data.tokenizer = 'tok.json': a text source .* only 'byte' applies")
    (tmp_path / "empty.txt").write_text("")
    refused(cfg(tmp_path / "empty.txt"), r"empty \(0 bytes of text\): nothing to train on; .*data.source=builtin")
    (tmp_path / "blob.txt").write_bytes(bytes(range(256)) * 64)
    refused(cfg(tmp_path / "blob.txt"), r"blob.txt is not text \(a NUL byte at offset 0\); .*megalysses-preprocess")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 na\xefve ".encode("latin-1") * 200)
    refused(cfg(tmp_path / "latin1.txt"), r"is not text \(\d+ invalid UTF-8 sequences")
    refused(cfg(tmp_path / "missing.txt"), r"no such file or folder")
    for name in ("empty.txt", "blob.txt"):
        with pytest.raises(ValueError, match=rf"{name}"):
            load_text(str(tmp_path / name))  # the ranks' own path refuses too


def test_preprocessing_refuses_binary_inputs_and_empty_output(tmp_path, capsys):
    (tmp_path / "blob.txt").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "empty.txt").write_text("")
    for name, message in (("blob.txt", "blob.txt: not text (a NUL byte at offset 0)"),
                          ("empty.txt", "empty.txt: 1 documents and 0 tokens: nothing to train on")):
        assert preprocess_main([str(tmp_path / name), "--output", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err
        assert sorted(p.name for p in tmp_path.iterdir()) == ["blob.txt", "empty.txt"]
    assert dataclasses.is_dataclass(cfg("builtin"))
