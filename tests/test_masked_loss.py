"""Supervised fine-tuning masks: prompt tokens (label -100) contribute exactly nothing, and the masked token-weighted
loss and its gradients match one device under tp2-sp2, sp4 and pp2, with one sequence chunk that is all prompt."""
import pytest
import torch

from megalysses.models.build import build_model
from megalysses.models.config import GPTConfig
from megalysses.models.gpt import GPT
from megalysses.models.pipeline import run_pipeline_step
from megalysses.parallel import ParallelLayout, ParallelMesh
from megalysses.parallel import collectives as C
from megalysses.parallel.dp import all_reduce_gradients
from megalysses.parallel.launch import run_ranks
from megalysses.parallel.sequence import (IGNORE_INDEX, count_valid_tokens, pad_sequence_batch, shard_sequence,
                                          token_weighted_loss)
from megalysses.parallel.tensor import gather_full, param_info, vocab_parallel_cross_entropy
from parity import SEED, compare, make_batch, parity_on_rank, reference

CFG = GPTConfig(vocab_size=97, hidden_size=64, num_layers=2, num_heads=8, num_kv_heads=2, intermediate_size=96)
SEQ = 32


def chat_batch():
    """Two rows of packed 'conversations': prompt spans masked; the first quarter of every row is prompt, so with
    sp4 SP rank 0 holds no trained token at all."""
    batch = make_batch(CFG, batch=2, seq=SEQ, seed=5, packed=True)
    for lo, hi in ((0, SEQ // 4), (12, 15), (20, 26)):  # system + user turns of each conversation
        batch.labels[:, lo:hi] = IGNORE_INDEX
    return batch


def test_prompt_tokens_get_exactly_zero_gradient():
    batch = chat_batch()
    model = GPT(CFG)
    model.init_weights(SEED)
    logits = model(batch.input_ids, batch.position_ids)  # (b, s, vocab)
    logits.retain_grad()
    per_token = vocab_parallel_cross_entropy(logits, batch.labels, CFG.vocab_size, model.tp_group)
    token_weighted_loss(per_token, batch.labels, (batch.labels != IGNORE_INDEX).sum()).backward()
    prompt = batch.labels == IGNORE_INDEX
    assert logits.grad[prompt].abs().max().item() == 0.0  # exactly: no gradient enters at a prompt position
    assert logits.grad[~prompt].abs().max().item() > 0.0


@pytest.mark.parametrize("layout,world", [(ParallelLayout(tp=2, sp=2), 4), (ParallelLayout(sp=4), 4)],
                         ids=["tp2-sp2", "sp4"])
def test_masked_loss_matches_one_device(layout, world):
    for loss_err, grad_err, name in run_ranks(parity_on_rank, world, CFG, layout, chat_batch()):
        assert loss_err < 1e-6
        assert grad_err < 1e-5, name


def pipeline_on_rank(rank: int, world: int, layout: ParallelLayout, batch):
    mesh = ParallelMesh(layout)
    chunks = list(build_model(CFG, mesh))
    for chunk in chunks:
        chunk.init_weights(SEED)
    ids, labels, pos = pad_sequence_batch(batch.input_ids, batch.labels, batch.position_ids, mesh.size("sp"))
    ids, pos, labels = (shard_sequence(t, mesh.group("sp")) for t in (ids, pos, labels))
    micro = list(zip(*(t.split(1) for t in (ids, pos, labels))))  # one row per micro-batch
    total = count_valid_tokens(labels, mesh.data_group())
    loss = run_pipeline_step(chunks, layout.schedule, micro, mesh, total)
    all_reduce_gradients([p for c in chunks for p in c.parameters()], mesh)
    grads = {n: gather_full(p.grad, param_info(p).shard, mesh.group("tp")).numpy()
             for c in chunks for n, p in c.canonical_parameters() if not param_info(p).pipeline_duplicate}
    return C.all_reduce(loss, mesh.data_group()).item(), grads


def test_masked_loss_matches_one_device_through_the_pipeline():
    batch = chat_batch()
    ref = reference(CFG, batch)
    results = run_ranks(pipeline_on_rank, 4, ParallelLayout(pp=2, sp=2), batch)
    grads = {n: torch.from_numpy(g) for _, per_rank in results for n, g in per_rank.items()}
    loss_err, grad_err, name = compare(ref, (results[0][0], grads))
    assert loss_err < 1e-6
    assert grad_err < 1e-5, name
