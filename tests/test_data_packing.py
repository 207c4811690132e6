"""Packed and padded samples against a plain-Python reference on adversarial document lengths; blending; loader."""
import json

import pytest
import torch

from megalysses.config import DataConfig
from megalysses.data import (Batch, BatchLoader, BlendedDataset, IndexedDataset, IndexedWriter, PackedCorpus,
                             PackedDataset, TokenWindows, apportion, build_dataset, dp_rows)
from megalysses.models.cores import Documents
from megalysses.parallel.collectives import CommGroup
from megalysses.parallel.sequence import IGNORE_INDEX, pad_sequence_batch, shard_sequence

ADVERSARIAL = [0, 1, 0, 0, 5, 23, 1, 2, 40, 0, 3]  # empty (also in a row), one token, longer than the sequence
VOCAB, EOS = 1000, 999


def write_docs(prefix, lengths, vocab=VOCAB, eos=EOS, tokenizer="test"):
    """Documents whose token ids are all distinct (0, 1, 2, ... in file order), so every id names its source."""
    docs, next_id = [], 0
    for n in lengths:
        docs.append(list(range(next_id, next_id + n)))
        next_id += n
    assert next_id < eos
    with IndexedWriter(prefix, vocab_size=vocab, eos_id=eos, tokenizer=tokenizer) as w:
        for doc in docs:
            w.add(b"".join(i.to_bytes(2, "little") for i in doc), [len(doc)])
        w.commit()
    return docs


def reference_rows(docs, order, samples, seq_len, mode):
    """Expected (input_ids, labels, position_ids) per sample, by counting over an explicit list of the stream."""
    stream = [(t, slot) for slot, d in enumerate(order) for t in docs[d] + [EOS]]  # (id, document slot)
    rows = []
    for k in samples:
        if mode == "pack":
            win = stream[k * seq_len: k * seq_len + seq_len + 1]
        else:
            win = [(t, k) for t in (docs[order[k]] + [EOS])[: seq_len + 1]]
        win += [(EOS, None)] * (seq_len + 1 - len(win))  # padding belongs to no document
        positions = []
        for j in range(seq_len):
            starts = j == 0 or (win[j][1] is not None and win[j][1] != win[j - 1][1])
            positions.append(0 if starts else positions[-1] + 1)
        labels = [win[j + 1][0] if win[j + 1][1] is not None and win[j + 1][1] == win[j][1] else IGNORE_INDEX
                  for j in range(seq_len)]
        rows.append(([t for t, _ in win[:-1]], labels, positions))
    return rows


@pytest.fixture
def adversarial(tmp_path):
    docs = write_docs(tmp_path / "adv", ADVERSARIAL)
    return docs, IndexedDataset(tmp_path / "adv")


@pytest.mark.parametrize("mode", ["pack", "pad"])
@pytest.mark.parametrize("seq_len", [1, 4, 16, 200])
def test_samples_match_the_reference_at_every_boundary(adversarial, mode, seq_len):
    docs, data = adversarial
    ds = PackedDataset(data, seq_len, seed=7, mode=mode)
    for epoch in range(2):
        plan = ds.plan(epoch)
        expected = reference_rows(docs, plan.documents.tolist(), plan.samples.tolist(), seq_len, mode)
        for i, (ids, labels, positions) in enumerate(expected):
            got = ds[epoch * ds.samples_per_epoch + i]
            assert got.input_ids.tolist() == ids, (epoch, i)
            assert got.labels.tolist() == labels, (epoch, i)
            assert got.position_ids.tolist() == positions, (epoch, i)
            assert got.loss_mask.tolist() == [lab != IGNORE_INDEX for lab in labels]


@pytest.mark.parametrize("seq_len", [1, 3, 8, 64])
def test_every_token_is_a_target_exactly_once_per_epoch(adversarial, seq_len):
    docs, data = adversarial
    ds = PackedDataset(data, seq_len, seed=3)
    total = sum(ADVERSARIAL) + len(ADVERSARIAL)  # the stream: every document and its EOS
    assert ds.samples_per_epoch == -(-(total - 1) // seq_len)
    for epoch in range(2):
        batch = Batch.stack([ds[epoch * ds.samples_per_epoch + i] for i in range(ds.samples_per_epoch)])
        targets = batch.labels[batch.loss_mask]
        trained = sorted(t for t in targets.tolist() if t != EOS)
        assert trained == sorted(t for d in docs for t in d[1:])  # every token but a document's first, once
        assert int((targets == EOS).sum()) == sum(1 for d in docs if d)  # each non-empty document's EOS, once
        inputs = batch.input_ids[batch.input_ids != EOS].tolist()
        assert sorted(inputs) == sorted(t for d in docs for t in d)  # every token is an input exactly once
        assert int(batch.loss_mask.sum()) == sum(ADVERSARIAL)  # n trained targets per document of n tokens


def test_attention_never_crosses_documents_after_the_sp_split(adversarial):
    """position_ids -> the model's document ids, also after the trainer pads the rows and splits them across sp."""
    docs, data = adversarial
    ds = PackedDataset(data, 10, seed=5)
    batch = Batch.stack([ds[i] for i in range(ds.samples_per_epoch)])
    source = {t: d for d, doc in enumerate(docs) for t in doc}  # token id -> document
    doc_ids = Documents.from_positions(batch.position_ids).doc_ids
    for row, ids in enumerate(batch.input_ids.tolist()):
        for j in range(1, len(ids)):
            if ids[j] in source and ids[j - 1] in source:  # two document tokens side by side
                same = source[ids[j]] == source[ids[j - 1]]
                assert same == bool(doc_ids[row, j] == doc_ids[row, j - 1]), (row, j)
    for sp in (2, 4):
        ids, labels, pos = pad_sequence_batch(batch.input_ids, batch.labels, batch.position_ids, sp)
        shards = [shard_sequence(pos, CommGroup(None, tuple(range(sp)), r)) for r in range(sp)]
        gathered = torch.cat(shards, dim=1)
        assert torch.equal(Documents.from_positions(gathered).doc_ids[:, :10], doc_ids)
        assert int((labels != IGNORE_INDEX).sum()) == int(batch.loss_mask.sum())


def test_pad_mode_puts_one_truncated_document_per_row(adversarial):
    docs, data = adversarial
    ds = PackedDataset(data, 4, seed=1, mode="pad")
    assert ds.samples_per_epoch == len(docs)
    rows = [ds[i] for i in range(len(docs))]
    for k, row in zip(ds.plan(0).documents.tolist(), rows):
        window = (docs[k] + [EOS])[:5]
        assert row.input_ids.tolist()[: len(window) - 1] == window[:-1]
        assert row.labels.tolist() == window[1:] + [IGNORE_INDEX] * (5 - len(window))
        assert row.position_ids.tolist() == [0, 1, 2, 3]


def test_same_seed_same_samples_other_seed_or_epoch_other_order(adversarial):
    _, data = adversarial
    a, b, c = (PackedDataset(data, 4, seed=s) for s in (11, 11, 12))
    n = a.samples_per_epoch
    first = [a[i].input_ids.tolist() for i in range(2 * n)]
    assert first == [b[i].input_ids.tolist() for i in range(2 * n)]
    assert first[:n] != [c[i].input_ids.tolist() for i in range(n)]
    assert first[:n] != first[n:]  # a new epoch is a new permutation


def test_empty_datasets_and_bad_arguments_are_refused(tmp_path, adversarial):
    write_docs(tmp_path / "empty", [0, 0])
    with pytest.raises(ValueError, match="all empty"):
        PackedDataset(IndexedDataset(tmp_path / "empty"), 4)
    _, data = adversarial
    with pytest.raises(ValueError, match="mode = 'packed'"):
        PackedDataset(data, 4, mode="packed")
    with pytest.raises(ValueError, match=r"ids must be in \[0, 11\)"):
        PackedDataset(data, 4, documents=torch.tensor([3, 11]))


def test_apportion_is_exact_within_rounding():
    from fractions import Fraction
    w = [Fraction(1, 3), Fraction(1, 3), Fraction(1, 3)]
    assert apportion(10, w) == [4, 3, 3] and apportion(0, w) == [0, 0, 0]


def test_blend_counts_are_exact_at_block_boundaries_and_deterministic(tmp_path):
    sets = [PackedDataset(IndexedDataset(p), 4, seed=i) for i, p in
            enumerate(write_docs_all(tmp_path, [[5, 9, 0, 30], [2, 2, 2], [50]]))]
    weights = [0.5, 0.3, 0.2]
    blend = BlendedDataset(sets, weights, seed=9, block=64)
    sources = [blend.source(i) for i in range(640)]
    for n in range(0, 641, 64):
        counts = [sum(1 for k, _ in sources[:n] if k == d) for d in range(3)]
        assert all(abs(c - w * n) < 1 for c, w in zip(counts, weights)), (n, counts)
        assert counts == blend.consumed_per_dataset(n)
    for d in range(3):  # each dataset is read in its own order, no sample skipped or repeated
        assert [j for k, j in sources if k == d] == list(range(sum(1 for k, _ in sources if k == d)))
    again = BlendedDataset(sets, weights, seed=9, block=64)
    assert [again.source(i) for i in range(640)] == sources
    assert [BlendedDataset(sets, weights, seed=10, block=64).source(i) for i in range(640)] != sources
    assert torch.equal(blend[70].input_ids, sets[sources[70][0]][sources[70][1]].input_ids)
    with pytest.raises(ValueError, match="positive finite"):
        BlendedDataset(sets, [1.0, 0.0, 1.0])


def write_docs_all(tmp_path, length_lists):
    prefixes = [tmp_path / f"set{i}" for i in range(len(length_lists))]
    for p, lengths in zip(prefixes, length_lists):
        write_docs(p, lengths)
    return prefixes


def _blend(tmp_path):
    sets = [PackedDataset(IndexedDataset(p), 6, seed=i) for i, p in
            enumerate(write_docs_all(tmp_path, [ADVERSARIAL, [7, 0, 13, 1, 29]]))]
    return BlendedDataset(sets, [0.7, 0.3], seed=4, block=16)


def _rows(batch):
    return [batch.input_ids.tolist(), batch.labels.tolist(), batch.position_ids.tolist()]


def test_dp_ranks_take_contiguous_rows_of_the_global_batch(tmp_path):
    blend = _blend(tmp_path)
    whole = BatchLoader(blend, 8)
    ranks = [BatchLoader(blend, 8, dp_rank=r, dp_size=4) for r in range(4)]
    for _ in range(3):
        expected = whole.next_batch()
        parts = [r.next_batch() for r in ranks]
        assert parts[0].input_ids.shape == (2, 6)
        assert torch.equal(torch.cat([p.input_ids for p in parts]), expected.input_ids)
        assert torch.equal(torch.cat([p.labels for p in parts]), expected.labels)
    assert list(dp_rows(16, 8, 3, 4)) == [22, 23]
    with pytest.raises(ValueError, match="global_batch_size = 6 is not divisible by dp = 4"):
        BatchLoader(blend, 6, dp_size=4)


def test_resume_mid_epoch_sees_exactly_the_same_batches(tmp_path):
    blend = _blend(tmp_path)
    straight = BatchLoader(blend, 4, dp_rank=1, dp_size=2)
    expected = [_rows(straight.next_batch()) for _ in range(12)]
    first = BatchLoader(blend, 4, dp_rank=1, dp_size=2)
    for _ in range(5):
        first.next_batch()
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores: plain JSON types
    assert state["consumed_samples"] == 20
    assert any(p["sample_in_epoch"] > 0 for p in state["position"]["datasets"])  # mid-epoch
    (tmp_path / "again").mkdir()
    resumed = BatchLoader(_blend(tmp_path / "again"), 4, dp_rank=1, dp_size=2)  # a fresh process: rebuilt from disk
    resumed.load_state_dict(state)
    assert [_rows(resumed.next_batch()) for _ in range(7)] == expected[5:]
    other_dp = BatchLoader(blend, 4)  # resuming on another dp size continues the same global stream
    other_dp.load_state_dict(state)
    assert other_dp.next_batch().input_ids[2:].tolist() == expected[5][0]
    reseeded = BlendedDataset(blend.datasets, [0.7, 0.3], seed=5, block=16)
    with pytest.raises(ValueError, match=r"seed: checkpoint 4, now 5"):
        BatchLoader(reseeded, 4).load_state_dict(state)


def test_build_dataset_picks_windows_or_the_preprocessed_prefix(tmp_path):
    assert isinstance(build_dataset(DataConfig()), TokenWindows)
    text = tmp_path / "a.txt"
    text.write_text("some text " * 50)
    assert isinstance(build_dataset(DataConfig(source=str(text))), TokenWindows)
    write_docs(tmp_path / "corpus", [3] * 40, vocab=257, eos=256, tokenizer="byte")
    for source in (tmp_path / "corpus", tmp_path / "corpus.bin"):
        corpus = build_dataset(DataConfig(source=str(source), val_fraction=0.1, seed=2))
        assert isinstance(corpus, PackedCorpus)
    train, val = corpus.splits["train"], corpus.splits["val"]
    assert len(val) == 4 and sorted(torch.cat([train, val]).tolist()) == list(range(40))
    batch = corpus.loader("val", seq_len=8, global_batch_size=2).next_batch()
    assert batch.input_ids.shape == (2, 8) and bool(batch.loss_mask.any())
    with pytest.raises(ValueError, match="set data.tokenizer=byte"):
        build_dataset(DataConfig(source=str(tmp_path / "corpus"), tokenizer=str(text)))
    (tmp_path / "corpus.json").unlink()
    with pytest.raises(FileNotFoundError, match="unfinished or interrupted"):
        build_dataset(DataConfig(source=str(tmp_path / "corpus")))
