"""Single-process pieces of data parallelism: bucket layout, hooks and overlap order, gradient accumulation, the
mixed-precision optimizer, weight-decay groups and learning-rate schedules."""
import pytest
import torch

from megalysses.config import TrainConfig
from megalysses.models.config import GPTConfig
from megalysses.models.gpt import GPT
from megalysses.optim import build_data_parallel, build_optimizer, lr_at, param_groups
from megalysses.parallel import ParallelMesh
from megalysses.parallel.dp import DistributedOptimizer, GradBuffer, GradSync, clip_gradients
from megalysses.parallel.sequence import IGNORE_INDEX
from parity import SEED, make_batch

CFG = GPTConfig(vocab_size=67, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=48,
                tie_embeddings=True, qkv_bias=True)
TRAIN = TrainConfig(lr=3e-3, warmup_steps=1, steps=3, weight_decay=0.1, grad_clip=0.5, adam_eps=1e-6)
SOLO = ParallelMesh.single_device()


def tiny_gpt() -> GPT:
    model = GPT(CFG)
    model.init_weights(SEED)
    return model


def backward(model: GPT, seed: int, rows=slice(None)) -> None:
    batch = make_batch(CFG, 4, 16, seed=seed, ignore_tail=3)
    valid = batch.labels != IGNORE_INDEX
    per_token = model(batch.input_ids[rows], None, batch.labels[rows]).float()
    ((per_token * valid[rows]).sum() / valid.sum()).backward()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# ------------------------------------------------------------------------------------------------ buffers, hooks


def test_buckets_hold_whole_params_and_pad_to_the_shard_count():
    params = [torch.nn.Parameter(torch.randn(n)) for n in (5, 3, 10, 2)]
    buf = GradBuffer(params, bucket_numel=8, pad_to=4)
    assert [(b.start, b.end, len(b.params)) for b in buf.buckets] == [(0, 8, 2), (8, 20, 1), (20, 24, 1)]
    assert buf.data.dtype == torch.float32 and buf.data.numel() == 24
    assert buf.main_grad(params[2]).data_ptr() == buf.data[8:].data_ptr()
    assert [(s.param_lo, s.param_hi) for s in buf.segments(buf.buckets[1], 14, 20)] == [(6, 10)]  # padding dropped


def test_buckets_start_during_backward_in_a_fixed_order():
    """When an early layer's gradient arrives, the buckets of later layers are already reducing."""
    model = tiny_gpt()
    sync = GradSync(model.parameters(), SOLO, bucket_mb=0.01)
    assert len(sync.buckets) >= 4
    seen = []
    model.blocks["0"].attn.qkv.weight.register_post_accumulate_grad_hook(
        lambda p: seen.append([b.pending is not None for b in sync.buckets]))
    backward(model, seed=0)
    launched = seen[0]
    assert launched[0] and not all(launched), launched
    assert launched == sorted(launched, reverse=True), "buckets launch as a prefix of the fixed order"
    sync.finish()
    assert all(b.pending is not None for b in sync.buckets)


def test_accumulation_matches_one_pass_and_misuse_is_named():
    model, ref = tiny_gpt(), tiny_gpt()
    backward(ref, seed=1)
    sync = GradSync(model.parameters(), SOLO, bucket_mb=0.01)
    with sync.no_sync():
        backward(model, seed=1, rows=slice(0, 2))
        with pytest.raises(RuntimeError, match="inside no_sync"):
            sync.finish()
    backward(model, seed=1, rows=slice(2, 4))
    sync.finish()
    sync.finish()  # idempotent: nothing is summed twice
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert p.grad is None and rel(sync.main_grad(p), q.grad) < 1e-6, name
    with pytest.raises(RuntimeError, match="call zero_grad"):
        backward(model, seed=1)
    sync.zero_grad()
    backward(model, seed=1)  # fine again after zero_grad


def test_params_without_gradient_reduce_as_zeros():
    model = torch.nn.ModuleDict({"used": torch.nn.Linear(4, 4), "unused": torch.nn.Linear(4, 4)})
    sync = GradSync(model.parameters(), SOLO, bucket_mb=1e-5)
    model["used"](torch.ones(2, 4)).sum().backward()
    assert any(b.pending is None for b in sync.buckets)  # the unused params' buckets never completed
    sync.finish()
    assert sync.main_grad(model["unused"].weight).abs().sum() == 0
    assert sync.main_grad(model["used"].bias).sum() == 2 * 4


# ------------------------------------------------------------------------------------------------ optimizer


def _run(model, sync, optimizer, steps=3):
    for step in range(steps):
        backward(model, seed=step)
        if sync is None:
            clip_gradients(list(model.parameters()), TRAIN.grad_clip, SOLO)
        else:
            sync.finish()
            sync.clip_grad_norm(TRAIN.grad_clip)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, TRAIN)
        optimizer.step()
        optimizer.zero_grad()


def test_master_weight_optimizer_matches_torch_adamw():
    """Flat runs of owned elements, in two weight-decay groups, update exactly like AdamW on whole params."""
    ref, model = tiny_gpt(), tiny_gpt()
    _run(ref, None, build_optimizer(ref, TRAIN, "cpu"))
    dp = build_data_parallel(model, SOLO, TRAIN, bucket_mb=0.01)
    sync, optimizer = dp.sync, dp.optimizer
    assert isinstance(optimizer, DistributedOptimizer)
    _run(model, sync, optimizer)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert rel(p, q) < 1e-6, name


def test_bf16_params_with_fp32_masters_and_main_grads():
    ref, model = tiny_gpt(), tiny_gpt()
    fp32 = {n: p.detach().clone() for n, p in model.named_parameters()}
    _run(ref, None, build_optimizer(ref, TRAIN, "cpu"))
    dp = build_data_parallel(model, SOLO, TrainConfig(**{**TRAIN.__dict__, "dtype": "bfloat16"}), bucket_mb=0.01)
    sync, optimizer = dp.sync, dp.optimizer
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert all(optimizer.master(s.bucket, s.lo, s.hi).dtype == torch.float32 for s in sync.owned_segments())
    for seg in sync.owned_segments():  # masters start from the fp32 init, not from its bf16 rounding
        name = next(n for n, p in model.named_parameters() if p is seg.param)
        assert torch.equal(optimizer.master(seg.bucket, seg.lo, seg.hi),
                           fp32[name].reshape(-1)[seg.param_lo:seg.param_hi])
    _run(model, sync, optimizer)
    assert all(buf.data.dtype == torch.float32 for buf in sync.buffers)
    for seg in sync.owned_segments():  # the model holds the bf16 cast of the fp32 masters
        assert torch.equal(seg.param.detach().reshape(-1)[seg.param_lo:seg.param_hi],
                           optimizer.master(seg.bucket, seg.lo, seg.hi).to(torch.bfloat16))
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert rel(p, q) < 5e-2, name  # bf16 compute vs fp32: close, not equal (the k bias follows noise)


def test_weight_decay_excludes_norms_and_biases():
    model = tiny_gpt()
    decay, no_decay = param_groups(model.parameters(), 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert sorted(names[id(p)] for p in no_decay["params"]) == sorted(
        n for n, _ in model.named_parameters() if n.endswith(("norm.weight", ".bias")))
    assert all(p.ndim == 2 for p in decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    groups = build_optimizer(model, TRAIN, "cpu").param_groups
    assert [len(g["params"]) for g in groups] == [len(decay["params"]), len(no_decay["params"])]
    assert any("qkv.bias" in names[id(p)] for p in groups[1]["params"])


def test_distributed_optimizer_checks_its_groups():
    model = tiny_gpt()
    sync = GradSync(model.parameters(), SOLO)
    groups = param_groups(model.parameters(), 0.1)
    groups[1]["params"] = groups[1]["params"][1:]
    with pytest.raises(ValueError, match=r"1 only in the GradSync"):
        DistributedOptimizer(groups, sync)


# ------------------------------------------------------------------------------------------------ schedules


def _lrs(**kw) -> list[float]:
    cfg = TrainConfig(**{"lr": 1.0, "min_lr": 0.1, "steps": 10, "warmup_steps": 2, **kw})
    return [lr_at(s, cfg) for s in range(cfg.steps)]


def test_warmup_is_linear_to_the_peak():
    lrs = _lrs(lr_schedule="constant", warmup_steps=4)
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0]) and lrs[4:] == [1.0] * 6


def test_cosine_decays_to_min_lr_at_the_last_step():
    lrs = _lrs(lr_schedule="cosine")
    assert lrs[1] == 1.0 and lrs[-1] == pytest.approx(0.1)
    assert all(a > b for a, b in zip(lrs[1:], lrs[2:]))  # strictly decreasing after the peak
    assert lrs[5] == pytest.approx(0.1 + 0.45 * (1 + torch.cos(torch.tensor(torch.pi / 2))).item())  # halfway


def test_wsd_warms_up_holds_then_decays_linearly():
    lrs = _lrs(lr_schedule="wsd", decay_fraction=0.3)  # 10 steps: warmup 0-1, stable 2-6, decay 7-9
    assert lrs[:2] == pytest.approx([0.5, 1.0])
    assert lrs[2:7] == [1.0] * 5
    assert lrs[7:] == pytest.approx([0.7, 0.4, 0.1])

