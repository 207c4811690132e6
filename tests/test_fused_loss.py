"""memory.fused_loss: the LM head + vocab-parallel cross-entropy fused chunk by chunk, gradients formed in forward,
gives the unfused loss and every gradient (fp32) on one device and under tp2, tp2 x sp2, with masks, and never holds
more than one chunk's logits."""
import pytest
import torch

from megalysses.models.config import GPTConfig, MemoryConfig
from megalysses.models.gpt import GPT
from megalysses.parallel import ParallelLayout, ParallelMesh
from megalysses.parallel import collectives as C
from megalysses.parallel.dp import all_reduce_gradients
from megalysses.parallel.launch import run_ranks
from megalysses.parallel.sequence import IGNORE_INDEX, count_valid_tokens, pad_sequence_batch, shard_sequence
from megalysses.parallel.tensor import gather_full, param_info, vocab_parallel_cross_entropy
from megalysses.parallel.tensor.fused_cross_entropy import chunk_rows_for, fused_linear_cross_entropy
from parity import SEED, compare, make_batch, reference
from test_memory_savers import LargestLogits

# hidden 64, heads 4 x 16, kv 2, intermediate 96, vocab 101 (odd: tp2 pads it), seq 30
CFG = GPTConfig(vocab_size=101, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=96)
B, S = 2, 30
ALONE = C.CommGroup.solo()


def model_share(cfg, mesh, memory, ids, pos, labels):
    """Loss share (model given the valid-token count), gradients summed over the data ranks, largest logits rows."""
    model = GPT(cfg, mesh, memory=memory)
    model.init_weights(SEED)
    total = count_valid_tokens(labels, mesh.data_group())
    spy = LargestLogits((model.embed if cfg.tie_embeddings else model.head).weight.shape[0], cfg.hidden_size)
    with spy:
        loss = model(ids, pos, labels, total_valid=total)
        loss.backward()
    all_reduce_gradients(model.parameters(), mesh)
    reported = C.all_reduce(loss.detach().clone(), mesh.data_group()).item()
    grads = {n: gather_full(p.grad, param_info(p).shard, mesh.group("tp")) for n, p in model.canonical_parameters()}
    return (reported, grads), spy.rows


def on_rank(rank, world, cfg, layout, batch, memories):
    """Rank body: the single-device unfused reference against the sharded model under each MemoryConfig."""
    mesh = ParallelMesh(layout) if world > 1 else ParallelMesh.single_device()
    ref = reference(cfg, batch)
    unit = layout.sequence_unit
    ids, labels, pos = pad_sequence_batch(batch.input_ids, batch.labels, batch.position_ids, unit)
    ids, labels, pos = (shard_sequence(t, mesh.group("sp")) for t in (ids, labels, pos))
    out = []
    for memory in memories:
        got, rows = model_share(cfg, mesh, memory, ids, pos, labels)
        out.append((*compare(ref, got), rows))
    return out


FUSED = [MemoryConfig(fused_loss=True), MemoryConfig(fused_loss=True, loss_tiles=4),
         MemoryConfig(fused_loss=True, loss_tiles=7, recompute="full", mlp_tiles=3)]


@pytest.mark.parametrize("tie", [False, True], ids=["head", "tied"])
@pytest.mark.parametrize("packed", [False, True], ids=["one-doc", "packed"])
def test_fused_loss_matches_the_unfused_model_on_one_device(packed, tie):
    cfg = GPTConfig(**{**CFG.__dict__, "tie_embeddings": tie})
    batch = make_batch(cfg, batch=B, seq=S, packed=packed, ignore_tail=5)
    batch.labels[0, 3] = cfg.vocab_size + 7  # a target outside the vocabulary: 0 loss, still counted (as unfused)
    for (loss_err, grad_err, worst, rows), memory in zip(on_rank(0, 1, cfg, ParallelLayout(), batch, FUSED), FUSED):
        assert loss_err < 1e-6, memory
        assert grad_err < 1e-5, f"{memory}: {worst}"
        assert rows == (B * S if memory.loss_tiles == 1 else -(-B * S // memory.loss_tiles)), memory


@pytest.mark.parametrize("layout,rows_per_chunk", [
    pytest.param(ParallelLayout(tp=2), B * S // 4, id="tp2"),
    pytest.param(ParallelLayout(tp=2, tp_sequence_parallel=True), B * S // 4, id="tp2-seqpar"),  # gathered: all 30
    pytest.param(ParallelLayout(tp=2, sp=2), B * 15 // 4 + 1, id="tp2-sp2"),
    pytest.param(ParallelLayout(tp=2, sp=2, tp_sequence_parallel=True), B * 16 // 4, id="tp2-sp2-seqpar"),
])
def test_fused_loss_matches_single_device_on_ranks(layout, rows_per_chunk):
    batch = make_batch(CFG, batch=B, seq=S, packed=True, ignore_tail=5)
    memories = [MemoryConfig(fused_loss=True, loss_tiles=4)]
    for rank_result in run_ranks(on_rank, layout.tp * layout.sp, CFG, layout, batch, memories):
        (loss_err, grad_err, worst, rows), = rank_result
        assert loss_err < 1e-6 and grad_err < 1e-5, worst
        assert rows == rows_per_chunk  # one chunk's logits at most


def test_fused_op_matches_the_vocab_parallel_loss_for_any_row_weights():
    g = torch.Generator().manual_seed(0)
    n, d, vocab = 37, 16, 50
    x, w = torch.randn(n, d, generator=g, requires_grad=True), torch.randn(vocab + 6, d, generator=g,
                                                                          requires_grad=True)  # padded vocab
    targets = torch.randint(0, vocab, (n,), generator=g)
    targets[:4] = torch.tensor([-100, vocab, vocab + 3, -1])  # ignored: outside [0, vocab)
    weights = torch.rand(n, generator=g)
    ref = (vocab_parallel_cross_entropy(x @ w.t(), targets, vocab, ALONE) * weights).sum()
    ref_grads = torch.autograd.grad(ref * 3.0, (x, w))
    for chunks in (0, 1, 5, n):
        got = fused_linear_cross_entropy(x, w, targets, weights, vocab, ALONE, chunks)
        grads = torch.autograd.grad(got * 3.0, (x, w))  # backward scales the stored gradients
        assert torch.allclose(got, ref, rtol=1e-6)
        errors = [((a - b).norm() / b.norm()).item() for a, b in zip(grads, ref_grads)]
        assert max(errors) < 1e-6, (chunks, errors)


def test_no_gradient_work_without_grad():
    x, w = torch.randn(8, 4), torch.randn(10, 4)
    targets, weights = torch.arange(8), torch.ones(8)
    with torch.no_grad():
        loss = fused_linear_cross_entropy(x.requires_grad_(), w.requires_grad_(), targets, weights, 10, ALONE)
    assert loss.grad_fn is None and torch.isfinite(loss)


def test_chunk_rows():
    assert chunk_rows_for(60, 101, 4) == 15 and chunk_rows_for(61, 101, 4) == 16
    assert chunk_rows_for(8192, 128256) == 2048  # 2^28 logits per chunk: 4 chunks of an 8K sequence
    assert chunk_rows_for(10, 101) == 10


def test_fused_loss_under_bf16_autocast_is_close():
    batch = make_batch(CFG, batch=B, seq=S, ignore_tail=5)
    results = []
    for memory in (MemoryConfig(), MemoryConfig(fused_loss=True, loss_tiles=3)):
        model = GPT(CFG, memory=memory)
        model.init_weights(SEED)
        total = (batch.labels != IGNORE_INDEX).sum().double()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(batch.input_ids, None, batch.labels, total_valid=total)
        loss.backward()
        results.append((loss.item(), {n: p.grad for n, p in model.named_parameters()}))
    loss_err, grad_err, worst = compare(*results)
    assert loss_err < 1e-2 and grad_err < 3e-2, worst


def trainer_steps_on_rank(rank, world, cfgs):
    """One train_step of the same batch per config (micro-batches through the pipeline schedule): loss, grad norm."""
    from megalysses.trainer import Trainer

    out = []
    for cfg in cfgs:
        trainer = Trainer(cfg)
        g = torch.Generator().manual_seed(3)
        ids = torch.randint(0, cfg.model.vocab_size, (cfg.train.global_batch_size, cfg.train.seq_len + 1), generator=g)
        labels = ids[:, 1:].clone()
        labels[0, -5:] = IGNORE_INDEX
        pos = torch.arange(cfg.train.seq_len).expand(ids.shape[0], cfg.train.seq_len)
        metrics = trainer.train_step(trainer.batcher.micro_batches(ids[:, :-1], labels, pos), 0)
        out.append((metrics["loss"], metrics["grad_norm"]))
    return out


@pytest.mark.parametrize("layout", [ParallelLayout(pp=2), ParallelLayout(tp=2, zero=1), ParallelLayout(dp=2, zero=3)],
                         ids=["pp2", "tp2-zero1", "dp2-zero3"])
def test_trainer_step_with_fused_loss(layout):
    import dataclasses

    from megalysses.config import RunConfig, TrainConfig

    base = RunConfig(model=GPTConfig(vocab_size=101, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                                     intermediate_size=96, tie_embeddings=layout.zero == 3), layout=layout,
                     train=TrainConfig(global_batch_size=4, micro_batch_size=1, seq_len=16, dtype="float32"))
    fused = dataclasses.replace(base, memory=MemoryConfig(fused_loss=True, loss_tiles=3))
    for (ref_loss, ref_norm), (loss, norm) in run_ranks(trainer_steps_on_rank, 2, [base, fused]):
        assert abs(loss - ref_loss) < 1e-6 * ref_loss and abs(norm - ref_norm) < 1e-5 * ref_norm


@pytest.mark.gpu
def test_fused_loss_on_gpu_in_bf16_is_close_and_smaller():
    cfg = GPTConfig(vocab_size=32000, hidden_size=256, num_layers=1, num_heads=4, intermediate_size=512)
    batch = make_batch(cfg, batch=2, seq=2048, ignore_tail=100)
    results, peaks = [], []
    for memory in (MemoryConfig(), MemoryConfig(fused_loss=True, loss_tiles=8)):
        model = GPT(cfg, memory=memory).cuda()
        model.init_weights(SEED)
        ids, labels = batch.input_ids.cuda(), batch.labels.cuda()
        total = (labels != IGNORE_INDEX).sum().double()
        torch.cuda.reset_peak_memory_stats()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(ids, None, labels, total_valid=total)
        loss.backward()
        peaks.append(torch.cuda.max_memory_allocated())
        results.append((loss.item(), {n: p.grad.float().cpu() for n, p in model.named_parameters()}))
    loss_err, grad_err, worst = compare(*results)
    assert loss_err < 1e-2 and grad_err < 3e-2, worst
    assert peaks[1] < peaks[0], peaks  # never the whole (4096, 32000) logits
