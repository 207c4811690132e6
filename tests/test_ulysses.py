"""Ulysses sequence parallelism reproduces the single-device loss and gradients (fp32, gloo ranks).

Every case has GQA with fewer kv heads than sp ranks (replication) and 10 ignored tail tokens; with sp >= 4 the
sequence length (30) is padded to 32 and the last SP rank holds no valid token at all.
"""
import pytest
import torch

from megalysses.models.cores import Documents
from megalysses.models.config import GPTConfig
from megalysses.parallel import ParallelLayout, ParallelMesh
from megalysses.parallel.launch import run_ranks
from megalysses.parallel.sequence import heads_to_seq, replicate_kv_heads, seq_to_heads, shard_sequence
from parity import make_batch, parity_on_rank

CFG = GPTConfig(vocab_size=101, hidden_size=64, num_layers=2, num_heads=8, num_kv_heads=2, intermediate_size=96,
                tie_embeddings=True)
SEQ = 30  # divisible by none of 4, 8: padded to 32


LAYOUTS = [
    pytest.param(ParallelLayout(sp=2), 2, id="sp2"),
    pytest.param(ParallelLayout(sp=4), 4, id="sp4"),
    pytest.param(ParallelLayout(sp=8), 8, id="sp8", marks=pytest.mark.slow),
    pytest.param(ParallelLayout(tp=2, sp=2), 4, id="tp2-sp2"),
    pytest.param(ParallelLayout(tp=2, sp=2, tp_sequence_parallel=True), 4, id="tp2-sp2-seqpar"),
    pytest.param(ParallelLayout(tp=2, sp=4), 8, id="tp2-sp4", marks=pytest.mark.slow),
    pytest.param(ParallelLayout(dp=2, sp=2), 4, id="dp2-sp2"),
]


@pytest.mark.parametrize("layout,world", LAYOUTS)
@pytest.mark.parametrize("packed", [False, True], ids=["one-doc", "packed"])
def test_ulysses_matches_single_device(layout, world, packed):
    batch = make_batch(CFG, batch=2, seq=SEQ, packed=packed, ignore_tail=10)
    results = run_ranks(parity_on_rank, world, CFG, layout, batch)
    for loss_err, grad_err, name in results:
        assert loss_err < 1e-6
        assert grad_err < 1e-5, name


def _round_trip(rank, world):
    mesh = ParallelMesh(ParallelLayout(sp=world))
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 8, 4, 3, generator=g), torch.randn(2, 8, 2, 3, generator=g)
    q_local, k_local = shard_sequence(q, mesh.group("sp")), shard_sequence(k, mesh.group("sp"))
    qh, kh = seq_to_heads(mesh.group("sp"), q_local, k_local)
    # head-sharded: whole sequence, this rank's heads
    assert torch.equal(qh, q.chunk(world, dim=2)[rank]) and torch.equal(kh, k.chunk(world, dim=2)[rank])
    (back,) = heads_to_seq(mesh.group("sp"), qh)
    assert torch.equal(back, q_local)
    return True


def test_all_to_all_moves_heads_and_sequence():
    assert all(run_ranks(_round_trip, 2))


def test_kv_replication_keeps_whole_groups():
    k = torch.arange(2).view(1, 1, 2, 1).float()  # kv heads 0, 1
    rk, _ = replicate_kv_heads(k, k, sp=4)
    assert rk.flatten().tolist() == [0, 0, 1, 1]  # rank j gets kv head j // 2, used by its query heads
    with pytest.raises(ValueError, match=r"sp = 3 .* 2 kv heads.*use sp in \[1, 2, 4, 6\]"):
        replicate_kv_heads(k, k, sp=3)


def test_layout_rejects_sp_that_splits_kv_groups():
    with pytest.raises(ValueError, match=r"sp = 3 does not divide the 8 heads"):
        ParallelLayout(sp=3).check_model(heads=8, kv_heads=2, layers=2)


def test_documents_from_reset_positions():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 0, 1]])
    docs = Documents.from_positions(pos)
    assert docs.doc_ids.tolist() == [[0, 0, 0, 1, 1, 2, 3, 3]]
    cu, longest = docs.cu_seqlens()
    assert cu.tolist() == [0, 3, 5, 6, 8] and longest == 3
    mask = docs.causal_mask()[0, 0]
    assert mask[4].tolist() == [False, False, False, True, True, False, False, False]
    assert Documents.from_positions(torch.arange(5).view(1, 5)).doc_ids is None


def test_softmax_scale_from_the_config_reaches_the_core():
    """A config scale changes the model, and the sharded model still matches one device with it."""
    import dataclasses

    from megalysses.models.gpt import GPT

    cfg = dataclasses.replace(CFG, softmax_scale=0.3)
    batch = make_batch(cfg, batch=2, seq=16, packed=True)
    default, scaled = GPT(CFG), GPT(cfg)
    default.init_weights(0), scaled.init_weights(0)
    assert not torch.allclose(default(batch.input_ids, batch.position_ids), scaled(batch.input_ids, batch.position_ids))
    for loss_err, grad_err, name in run_ranks(parity_on_rank, 2, cfg, ParallelLayout(sp=2), batch):
        assert loss_err < 1e-6 and grad_err < 1e-5, name


@pytest.mark.parametrize("layout,world", [
    pytest.param(ParallelLayout(tp=2, sp=2), 4, id="tp2-sp2"),
    pytest.param(ParallelLayout(tp=2, sp=2, tp_sequence_parallel=True), 4, id="tp2-sp2-seqpar"),
])
def test_per_head_qk_norm_matches_single_device(layout, world):
    """Qwen3's q / k norms: one weight per head dim, whole on every tp rank, each rank's gradient from its heads."""
    cfg = GPTConfig(**{**CFG.__dict__, "qk_norm": True})
    batch = make_batch(cfg, batch=2, seq=SEQ, packed=True, ignore_tail=10)
    for loss_err, grad_err, name in run_ranks(parity_on_rank, world, cfg, layout, batch):
        assert loss_err < 1e-6
        assert grad_err < 1e-5, name
