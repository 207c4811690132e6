"""Tensor parallelism reproduces the single-device loss and gradients (fp32, gloo ranks)."""
import pytest
import torch

from megalysses.models.config import GPTConfig
from megalysses.models.gpt import GPT
from megalysses.parallel import LayoutError, ParallelLayout
from megalysses.parallel.launch import run_ranks
from megalysses.parallel.tensor import ShardSpec, shard, unshard, vocab_parallel_cross_entropy
from megalysses.parallel.collectives import CommGroup
from parity import make_batch, parity_on_rank

# GQA (8 query / 4 kv heads), tied embeddings, a vocab (101) that no tp divides
CFG = GPTConfig(vocab_size=101, hidden_size=64, num_layers=2, num_heads=8, num_kv_heads=4, intermediate_size=96,
                tie_embeddings=True)


@pytest.mark.parametrize("tp,sequence_parallel", [(1, False), (2, False), (2, True), (4, False), (4, True)])
def test_tp_matches_single_device(tp, sequence_parallel):
    layout = ParallelLayout(tp=tp, tp_sequence_parallel=sequence_parallel)
    batch = make_batch(CFG, batch=2, seq=24, ignore_tail=3)
    loss_err, grad_err, name = run_ranks(parity_on_rank, tp, CFG, layout, batch)[0]
    assert loss_err < 1e-6
    assert grad_err < 1e-5, name


def test_tp_untied_with_qkv_bias():
    cfg = GPTConfig(vocab_size=77, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=80,
                    tie_embeddings=False, qkv_bias=True)
    batch = make_batch(cfg, batch=2, seq=16)
    for rank_result in run_ranks(parity_on_rank, 2, cfg, ParallelLayout(tp=2, tp_sequence_parallel=True), batch):
        loss_err, grad_err, name = rank_result
        assert loss_err < 1e-6 and grad_err < 1e-5, name


@pytest.mark.parametrize("heads,kv,tp,match", [
    (6, 6, 4, r"tp = 4 does not divide the 6 attention heads.*use tp in \[1, 2, 3, 6\]"),
    (8, 2, 4, r"tp = 4 does not divide the 2 kv heads.*use tp in \[1, 2\]"),
])
def test_tp_head_errors(heads, kv, tp, match):
    cfg = GPTConfig(hidden_size=8 * heads, num_heads=heads, num_kv_heads=kv)
    with pytest.raises(LayoutError, match=match):
        ParallelLayout(tp=tp).check_model(heads=cfg.num_heads, kv_heads=cfg.num_kv_heads, layers=cfg.num_layers)


def test_shard_unshard_round_trip_with_sections_and_padding():
    full = torch.randn(13 + 4 + 4, 6)
    spec = ShardSpec(dim=0, sections=(13, 4, 4))  # 13 is padded to 16 over 4 ranks
    shards = [shard(full, spec, r, 4) for r in range(4)]
    assert all(s.shape == (4 + 1 + 1, 6) for s in shards)
    assert torch.equal(shards[3][3], torch.zeros(6))  # padding row of the first section
    assert torch.equal(shards[1][4], full[13 + 1])  # rank 1's k row
    assert torch.equal(unshard(shards, spec), full)


def test_padded_vocab_is_never_predicted():
    """Padding columns get no probability: the loss equals a plain cross-entropy over the real vocab."""
    logits = torch.randn(5, 8, requires_grad=True)  # 7 real + 1 padding column on a single rank
    targets = torch.tensor([0, 6, 3, -100, 2])
    loss = vocab_parallel_cross_entropy(logits, targets, vocab_size=7, group=CommGroup.solo())
    expected = torch.nn.functional.cross_entropy(logits[:, :7], targets, reduction="none", ignore_index=-100)
    assert torch.allclose(loss, expected, atol=1e-6)
    loss.sum().backward()
    assert torch.all(logits.grad[:, 7] == 0) and torch.all(logits.grad[3] == 0)


def test_init_is_layout_independent():
    """The single-device weights are the same whatever order parameters are created in."""
    a, b = GPT(CFG), GPT(CFG, layer_ids=[1], pre_process=False)
    a.init_weights(7), b.init_weights(7)
    assert torch.equal(a.blocks["1"].mlp.down.weight, b.blocks["1"].mlp.down.weight)
