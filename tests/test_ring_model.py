"""Ring attention through the model: layout {ring: R} and the sp x ring hybrid reproduce the single-device loss and
gradients (fp32, gloo).

The sequence (30 tokens) divides by no sequence unit here (2R, or sp x 2R): it is padded to 32 and the padding is
masked out of the loss. The 8-head model has 2 kv heads (fewer than ring 4, and fewer than the Ulysses degree of
sp 4 x ring 2, where they are replicated); the 6-head model runs on ring 4 and on sp 2 x ring 4 (6 heads over 8
sequence-parallel ranks), which Ulysses alone cannot split.
"""
import json

import pytest
import torch

from megalysses.models.config import GPTConfig
from megalysses.models.gpt import GPT
from megalysses.parallel import LayoutError, ParallelLayout, ParallelMesh
from megalysses.parallel.launch import run_ranks
from megalysses.parallel.sequence import shard_ring_sequence
from megalysses.train import QUICKSTART, main
from parity import make_batch, parity_on_rank

CFG = GPTConfig(vocab_size=101, hidden_size=64, num_layers=2, num_heads=8, num_kv_heads=2, intermediate_size=96,
                tie_embeddings=True)
SIX_HEADS = GPTConfig(vocab_size=101, hidden_size=48, num_layers=2, num_heads=6, num_kv_heads=2, intermediate_size=80)
SEQ = 30  # padded to 32 for ring 2 (unit 4) and ring 4 (unit 8)

CASES = [
    pytest.param(CFG, ParallelLayout(ring=2), 2, False, id="ring2-one-doc"),
    pytest.param(CFG, ParallelLayout(ring=2), 2, True, id="ring2-packed"),
    pytest.param(CFG, ParallelLayout(ring=4), 4, True, id="ring4-packed-gqa-kv2"),
    pytest.param(SIX_HEADS, ParallelLayout(ring=4), 4, True, id="ring4-six-heads"),
    pytest.param(CFG, ParallelLayout(ring=2, dp=2), 4, True, id="ring2-dp2"),
    pytest.param(CFG, ParallelLayout(ring=2, tp=2), 4, True, id="ring2-tp2"),
    pytest.param(CFG, ParallelLayout(sp=2, ring=2), 4, False, id="sp2-ring2-one-doc"),
    pytest.param(CFG, ParallelLayout(sp=2, ring=2), 4, True, id="sp2-ring2-packed"),
    pytest.param(CFG, ParallelLayout(sp=4, ring=2), 8, True, id="sp4-ring2-packed-gqa-kv2-below-sp"),
    pytest.param(SIX_HEADS, ParallelLayout(sp=2, ring=4), 8, True, id="sp2-ring4-six-heads"),
    pytest.param(CFG, ParallelLayout(ring=2, tp=2, tp_sequence_parallel=True), 4, True, id="ring2-tp2-seqpar"),
    pytest.param(CFG, ParallelLayout(sp=2, ring=2, tp=2, tp_sequence_parallel=True), 8, True,
                 id="tp2-sp2-ring2-seqpar"),
]


@pytest.mark.parametrize("cfg,layout,world,packed", CASES)
def test_ring_matches_single_device(cfg, layout, world, packed):
    batch = make_batch(cfg, batch=2, seq=SEQ, packed=packed, ignore_tail=5)
    for loss_err, grad_err, name in run_ranks(parity_on_rank, world, cfg, layout, batch):
        assert loss_err < 1e-6
        assert grad_err < 1e-5, name


def _shard_positions(rank, world):
    mesh = ParallelMesh(ParallelLayout(ring=world))
    assert mesh.data_group().size == world and mesh.group("sp").size == 1
    pos = torch.arange(16).view(1, 16)
    return shard_ring_sequence(pos, mesh.group("ring"), mesh.group("sp")).flatten().tolist()


def test_batch_shards_are_zig_zag_with_global_positions():
    assert run_ranks(_shard_positions, 2) == [[0, 1, 2, 3, 12, 13, 14, 15], [4, 5, 6, 7, 8, 9, 10, 11]]


def _hybrid_positions(rank, world):
    """(shard of 0..15, the model's default positions) on sp 2 x ring 2."""
    mesh = ParallelMesh(ParallelLayout(sp=2, ring=2))
    shard = shard_ring_sequence(torch.arange(16).view(1, 16), mesh.group("ring"), mesh.group("sp"))
    default = GPT(CFG, mesh).default_positions(1, 4, "cpu")
    return shard.flatten().tolist(), default.flatten().tolist()


def test_sp_by_ring_shards_split_each_zig_zag_shard_over_sp():
    """Ring rank r holds chunks r and 3-r (of 4); its SP ranks take the first and the second half of that."""
    got = run_ranks(_hybrid_positions, 4)  # mesh ranks in (ring, sp) order
    expected = [[0, 1, 2, 3], [12, 13, 14, 15], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert [shard for shard, _ in got] == expected
    assert [default for _, default in got] == expected


def test_layout_rules_for_ring():
    layout = ParallelLayout(ring=4).resolve(8)
    assert layout.dp == 2 and layout.shape == (1, 2, 4, 1, 1) and layout.describe() == "ring4-dp2"
    assert layout.sequence_unit == 8
    layout.check_model(heads=6, kv_heads=3, layers=2, seq_len=64)  # no head rule for the ring
    with pytest.raises(LayoutError, match=r"sequence length 60 is not divisible by 8 .*2 \* ring 4.*pad it to 64"):
        layout.check_model(heads=6, kv_heads=3, layers=2, seq_len=60)
    hybrid = ParallelLayout(sp=2, ring=4).resolve(8)
    assert hybrid.shape == (1, 1, 4, 2, 1) and hybrid.sequence_unit == 16 and hybrid.describe() == "sp2-ring4"
    hybrid.check_model(heads=6, kv_heads=1, layers=2, seq_len=32)  # 6 heads over 8 sequence ranks: sp 2 divides them
    with pytest.raises(LayoutError, match=r"sp = 2 and the 3 kv heads per TP rank neither divide.*add layout.ring"):
        hybrid.check_model(heads=6, kv_heads=3, layers=2)  # the Ulysses head rule still holds inside the hybrid
    with pytest.raises(LayoutError, match=r"layout.ring = 0"):
        ParallelLayout(ring=0)


def _losses(tmp_path, name, *overrides):
    run_dir = tmp_path / name
    assert main(["--config", str(QUICKSTART), f"logging.run_dir={run_dir}", "train.steps=3", "train.eval_every=0",
                 "logging.interval=1", "model.num_heads=6", "model.num_kv_heads=2", "model.hidden_size=48",
                 *overrides]) == 0
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_six_heads_train_on_ring_four_and_sp2_ring4_through_the_cli(tmp_path):
    """6 heads on 4 and on 8 sequence-parallel ranks: Ulysses alone refuses both, the ring (and sp 2 x ring 4, gloo
    ranks started by megalysses-train) trains them like one device."""
    single = _losses(tmp_path, "single", "layout=single", "train.nproc=1")
    for name, layout, nproc in (("ring4", "{ring: 4}", 4), ("sp2-ring4", "{sp: 2, ring: 4}", 8)):
        losses = _losses(tmp_path, name, f"layout={layout}", f"train.nproc={nproc}")
        assert len(losses) == 3 and losses[-1] < losses[0], name
        for a, b in zip(losses, single):
            assert abs(a - b) <= 1e-5 * abs(b), (name, losses, single)
