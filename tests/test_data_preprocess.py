"""megalysses-preprocess: tokens decode back to the source, workers change nothing, output appears atomically."""
import json
import sys

import pytest

from megalysses.data import IndexedDataset, IndexedWriter, load_tokenizer
from megalysses.data.indexed import dataset_paths
from megalysses.tools.preprocess import Progress, main, preprocess

DOCS = ["", "a", "Hello, world!\n", "two\n\nparagraphs \t tabs", "héllo ünïcode ✓ 𝄞 日本語", "\n",
        "a longer document " * 40, "x"]


def quiet():
    return Progress(interval=1e9, out=lambda line: None)


def decoded(prefix, tokenizer):
    data = IndexedDataset(prefix)
    return [tokenizer.decode(data.document(i).tolist()) for i in range(len(data))]


@pytest.fixture
def jsonl(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"id": i, "body": d}) + "\n" for i, d in enumerate(DOCS)))
    return path


@pytest.mark.parametrize("workers", [1, 2])
def test_byte_level_round_trip_for_jsonl_and_text(tmp_path, jsonl, workers):
    meta = preprocess([str(jsonl)], str(tmp_path / "j"), text_key="body", workers=workers, chunk_docs=3,
                      progress=quiet())
    assert meta["num_documents"] == len(DOCS) and meta["eos_id"] == 256 and meta["dtype"] == "uint16"
    assert decoded(tmp_path / "j", load_tokenizer("byte")) == DOCS
    folder = tmp_path / "texts"
    folder.mkdir()
    for i, d in enumerate(DOCS):  # one document per file, read in sorted order
        (folder / f"{i:02d}.txt").write_text(d, encoding="utf-8")
    preprocess([str(folder)], str(tmp_path / "t"), workers=workers, progress=quiet())
    assert decoded(tmp_path / "t", load_tokenizer("byte")) == DOCS
    lines = tmp_path / "lines.txt"
    lines.write_text("first line\n\nthird ✓\n", encoding="utf-8")
    preprocess([str(lines)], str(tmp_path / "l"), text_docs="line", workers=workers, progress=quiet())
    assert decoded(tmp_path / "l", load_tokenizer("byte")) == ["first line", "", "third ✓"]


def test_workers_write_identical_files(tmp_path, jsonl):
    for workers in (1, 2):
        preprocess([str(jsonl)], str(tmp_path / f"w{workers}"), text_key="body", workers=workers, chunk_docs=2,
                   progress=quiet())
    for key in ("bin", "idx"):
        assert dataset_paths(tmp_path / "w1")[key].read_bytes() == dataset_paths(tmp_path / "w2")[key].read_bytes()


def tiny_bpe(tmp_path):
    """A byte-level BPE tokenizer.json trained in memory on the test documents (lossless: decodes exactly)."""
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(DOCS * 3, trainer)
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    return path


def test_tokenizer_json_round_trip(tmp_path, jsonl):
    path = tiny_bpe(tmp_path)
    meta = preprocess([str(jsonl)], str(tmp_path / "bpe"), tokenizer=str(path), text_key="body", workers=2,
                      chunk_docs=3, progress=quiet())
    tokenizer = load_tokenizer(str(path))
    assert meta["eos_id"] == tokenizer.eos_id == 0 and meta["eos_token"] == "<|endoftext|>"
    assert meta["tokenizer_sha256"] == tokenizer.sha256
    assert decoded(tmp_path / "bpe", tokenizer) == DOCS
    assert IndexedDataset(tmp_path / "bpe").num_tokens < sum(len(d.encode()) for d in DOCS)  # merges were used
    with pytest.raises(ValueError, match="'<eos>' is not in the vocabulary"):
        load_tokenizer(str(path), eos_token="<eos>")


def test_parquet_round_trip(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"text": DOCS}), tmp_path / "docs.parquet")
    preprocess([str(tmp_path / "docs.parquet")], str(tmp_path / "p"), progress=quiet())
    assert decoded(tmp_path / "p", load_tokenizer("byte")) == DOCS


def test_ids_past_65535_are_stored_as_uint32(tmp_path):
    ids = [0, 65535, 65536, 69999]
    with IndexedWriter(tmp_path / "big", vocab_size=70000, eos_id=69999, tokenizer="test") as w:
        w.add(b"".join(i.to_bytes(4, "little") for i in ids), [1, 3])
        meta = w.commit()
    data = IndexedDataset(tmp_path / "big")
    assert meta["dtype"] == "uint32" and data.document(1).tolist() == ids[1:]
    with pytest.raises(ValueError, match="expected 8 bytes of uint32"):
        IndexedWriter(tmp_path / "other", vocab_size=70000, eos_id=1, tokenizer="t").add(b"\0" * 4, [2])


def test_a_failed_run_leaves_the_prefix_as_it_was(tmp_path, jsonl):
    prefix = tmp_path / "out"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "fine"}\n{"text": "no body"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: no key 'body' \(found \['text'\]\); pass --text-key"):
        preprocess([str(jsonl), str(bad)], str(prefix), text_key="body", workers=2, chunk_docs=1, progress=quiet())
    assert list(tmp_path.glob("*out*")) == []  # neither the dataset nor temp files
    preprocess([str(jsonl)], str(prefix), text_key="body", progress=quiet())
    before = {k: p.read_bytes() for k, p in dataset_paths(prefix).items()}
    with pytest.raises(FileExistsError, match="pass overwrite=True"):
        preprocess([str(jsonl)], str(prefix), text_key="body", progress=quiet())
    with pytest.raises(ValueError, match="no key 'body'"):
        preprocess([str(bad)], str(prefix), text_key="body", overwrite=True, progress=quiet())
    assert {k: p.read_bytes() for k, p in dataset_paths(prefix).items()} == before
    assert sorted(p.name for p in tmp_path.glob("*out*")) == ["out.bin", "out.idx", "out.json"]


def test_reader_refuses_files_that_do_not_belong_together(tmp_path, jsonl):
    preprocess([str(jsonl)], str(tmp_path / "d"), text_key="body", progress=quiet())
    paths = dataset_paths(tmp_path / "d")
    paths["bin"].write_bytes(paths["bin"].read_bytes()[:-2])
    with pytest.raises(ValueError, match="d.bin: .* bytes, but .* describes"):
        IndexedDataset(tmp_path / "d")


def test_command_line(tmp_path, jsonl, capsys):
    assert main([str(jsonl), "-o", str(tmp_path / "cli"), "--text-key", "body", "--workers", "1"]) == 0
    assert f"{len(DOCS)} documents" in capsys.readouterr().err
    assert IndexedDataset(tmp_path / "cli").num_documents == len(DOCS)
    assert main([str(jsonl), "-o", str(tmp_path / "x"), "--tokenizer", str(tmp_path / "nope.json")]) == 2
    assert "no such file; use 'byte' or the path of a Hugging Face tokenizer.json" in capsys.readouterr().err
    assert main([str(tmp_path / "missing.jsonl"), "-o", str(tmp_path / "y")]) == 2
    assert "missing.jsonl: no such file or folder" in capsys.readouterr().err


def test_optional_packages_are_named_when_missing(tmp_path, monkeypatch):
    path = tmp_path / "tokenizer.json"
    path.write_text("{}")
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # import tokenizers -> ImportError
    with pytest.raises(ImportError, match="pip install tokenizers"):
        load_tokenizer(str(path))
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    with pytest.raises(ImportError, match="reading parquet needs pyarrow: pip install pyarrow"):
        preprocess([str(tmp_path / "d.parquet")], str(tmp_path / "p"), progress=quiet())
    assert list(tmp_path.glob("p*")) == []
