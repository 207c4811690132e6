"""The planner's memory terms against what the code really holds: model state counted on the trainer's own tensors
(gloo ranks, several layouts and ZeRO levels), activations counted with saved-tensor hooks per saver (CPU, eager)."""
import dataclasses
import itertools
import os

import pytest
import torch

from megalysses.bench import random_rows
from megalysses.config import ConfigError, RunConfig, TrainConfig
from megalysses.models import memory as memory_module
from megalysses.models.config import GPTConfig, MemoryConfig, ModelConfigError
from megalysses.models.gpt import GPT
from megalysses.models.rope import rope_cos_sin
from megalysses.parallel import ParallelLayout
from megalysses.parallel.launch import run_ranks
from megalysses.plan.activations import Shapes, block_memory
from megalysses.plan.memory import plan_memory
from megalysses.plan.state import state_bytes

os.environ.setdefault("MEGALYSSES_PRELOAD", "megalysses.trainer,torch.distributed.fsdp")

CFG = GPTConfig(vocab_size=101, hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=96)
BUCKET_MB = 0.02  # ~5k fp32 elements: several buckets, each padded to the shard count


def _run_config(layout: ParallelLayout, dtype: str, tied: bool = False, offload: bool = False) -> RunConfig:
    return RunConfig(model=dataclasses.replace(CFG, tie_embeddings=tied), layout=layout,
                     train=TrainConfig(global_batch_size=4, micro_batch_size=1, seq_len=16, dtype=dtype,
                                       init="device", eval_every=0, offload_optimizer=offload))


def _allocated_state(rank: int, world: int, cfg: RunConfig) -> dict:
    """Build the trainer, take one step (AdamW creates its state lazily), count the bytes of each kind of state."""
    import functools

    from megalysses import optim, trainer as trainer_module
    from megalysses.parallel.dp.grads import local_values

    trainer_module.build_data_parallel = functools.partial(optim.build_data_parallel, bucket_mb=BUCKET_MB)
    trainer = trainer_module.Trainer(cfg)
    batches = trainer.batcher.micro_batches(*random_rows(cfg, trainer.mesh, cfg.train.seq_len, 0))
    if cfg.layout.zero == 3:  # gradients are sharded and exist after backward: count them before the step drops them
        trainer.forward_backward(batches)
        grads = sum(local_values(p.grad).numel() * p.grad.element_size() for p in trainer.dp.params)
        trainer.dp.step(1e-3)
        params = sum(local_values(p).untyped_storage().nbytes() for p in trainer.dp.params)
        masters = 0
    else:
        trainer.train_step(batches, 0)
        params = sum(p.numel() * p.element_size() for p in trainer.chunks.parameters())
        grads = sum(b.data.numel() * b.data.element_size() for b in trainer.dp.sync.buffers)
        masters = trainer.dp.optimizer.master_bytes()
    if cfg.train.offload_optimizer:  # masters and moments in host blocks (zero 3: parameters and gradients too)
        on_device = {} if cfg.layout.zero == 3 else {"params": params, "main_grads": grads}
        return {**on_device, "host": trainer.dp.host_bytes(),
                "pp_rank": trainer.mesh.rank("pp"), "data_rank": trainer.mesh.data_group().rank}
    return {"params": params, "main_grads": grads, "masters": masters,
            "moments": trainer.dp.state_bytes(["exp_avg", "exp_avg_sq"]),
            "optimizer_steps": trainer.dp.state_bytes(["step"]),
            "pp_rank": trainer.mesh.rank("pp"), "data_rank": trainer.mesh.data_group().rank}


STATE_CASES = {
    "single-zero0-fp32": (1, ParallelLayout(), "float32", False),
    "dp2-zero1-bf16": (2, ParallelLayout(zero=1), "bfloat16", False),
    "sp2-zero1": (2, ParallelLayout(sp=2, zero=1), "float32", False),
    "dp2-zero3": (2, ParallelLayout(zero=3), "float32", False),
    "tp2-sequence-parallel": (2, ParallelLayout(tp=2, tp_sequence_parallel=True), "bfloat16", False),
    "pp2-tied": (2, ParallelLayout(pp=2), "float32", True),
    "dp2-zero1-optimizer-offload": (2, ParallelLayout(zero=1), "bfloat16", False, True),
    "dp2-zero3-optimizer-offload": (2, ParallelLayout(zero=3), "float32", False, True),
}


@pytest.mark.parametrize("case", list(STATE_CASES))
def test_state_terms_equal_the_trainers_allocations(case):
    world, layout, dtype, tied, *offload = STATE_CASES[case]
    cfg = _run_config(layout, dtype, tied, bool(offload))
    for real in run_ranks(_allocated_state, world, cfg):
        predicted = state_bytes(cfg.model, cfg.layout.resolve(world), 2 if dtype == "bfloat16" else 4,
                                pp_rank=real.pop("pp_rank"), data_rank=real.pop("data_rank"), bucket_mb=BUCKET_MB,
                                cuda=False, offload_optimizer=bool(offload))
        assert {k: getattr(predicted, k) for k in real} == real, case


# ------------------------------------------------------------------------------------------ activations

B, S = 2, 32


def _saved_by_block(memory: MemoryConfig, dtype: torch.dtype, monkeypatch) -> tuple[int, int]:
    """(device, host) bytes one block saves for backward: distinct storages kept on the device (not parameters,
    not the shared cos / sin), and bytes copied to the host by the offload hook."""
    model = GPT(CFG, memory=memory)
    model.init_weights(0)
    model.to(dtype)
    x = torch.randn(B, S, CFG.hidden_size, dtype=dtype, requires_grad=True)
    positions = torch.arange(S).expand(B, S)
    cos, sin = rope_cos_sin(positions, model.inv_freq, dtype)
    skip = {t.untyped_storage().data_ptr() for t in (*model.parameters(), cos, sin)}
    kept, host = {}, []
    pack_to_host = memory_module._pack_to_host

    def counting_pack(t):
        host.append(t.numel() * t.element_size())
        return pack_to_host(t)

    def pack(t):
        if t.untyped_storage().data_ptr() not in skip:
            kept.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    monkeypatch.setattr(memory_module, "_pack_to_host", counting_pack)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.run_block(model.blocks["0"], x, cos, sin, model.documents(positions))
    return sum(kept.values()), sum(host)


SAVERS = [MemoryConfig(recompute=r, offload_activations=o, mlp_tiles=t)
          for r, o, t in itertools.product(("none", "selective", "around_core", "full"), (False, True), (1, 4))
          if not (o and r == "none")]


@pytest.mark.parametrize("memory", SAVERS,
                         ids=lambda m: f"{m.recompute}-offload{int(m.offload_activations)}-tiles{m.mlp_tiles}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_each_saver_keeps_what_the_model_predicts(memory, dtype, monkeypatch):
    device, host = _saved_by_block(memory, dtype, monkeypatch)
    shapes = Shapes(CFG, ParallelLayout().resolve(1), B, S, 4 if dtype == torch.float32 else 2, eager=True)
    predicted = block_memory(shapes, memory)
    assert sum(predicted.device.values()) == device
    assert sum(predicted.host.values()) == host


@pytest.mark.parametrize("memory", [MemoryConfig(), MemoryConfig(loss_tiles=4), MemoryConfig(recompute="full"),
                                    MemoryConfig(recompute="around_core", mlp_tiles=2, loss_tiles=3),
                                    MemoryConfig(fused_loss=True), MemoryConfig(fused_loss=True, loss_tiles=4)],
                         ids=["plain", "loss-tiles", "full", "around-core-tiles", "fused-loss", "fused-loss-chunks"])
def test_whole_model_activations_match_the_plan(memory):
    """Every tensor the whole model saves (blocks, head, loss, embedding) against the planner's activation terms."""
    model = GPT(CFG, memory=memory)
    model.init_weights(0)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            kept.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    ids = torch.randint(0, CFG.vocab_size, (B, S))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids, None, ids, total_valid=torch.tensor(B * S))  # the trainer's form: the token-weighted share
    cfg = RunConfig(model=CFG, layout=ParallelLayout(), memory=memory,
                    train=TrainConfig(global_batch_size=B, micro_batch_size=B, seq_len=S, nproc=1))
    plan = plan_memory(cfg, 1, eager=True)
    saved = sum(v for k, v in plan.device.items() if k.startswith(("activations", "head")))
    assert saved == pytest.approx(sum(kept.values()), rel=0.02)


def _saved_by_parallel_block(rank: int, world: int, layout: ParallelLayout, cfg: GPTConfig,
                             savers: list) -> list[tuple[int, int]]:
    """Per saver, (device, host) bytes one block of this rank saves under a parallel layout (gloo ranks)."""
    from megalysses.models import memory as memory_module
    from megalysses.parallel import ParallelMesh

    mesh = ParallelMesh(layout)
    shard = layout.sp * (layout.tp if layout.tp_sequence_parallel else 1)
    out = []
    for memory in savers:
        model = GPT(cfg, mesh, memory=memory)
        positions = torch.arange(S).expand(B, S)[:, mesh.rank("sp") * (S // layout.sp):][:, :S // layout.sp]
        x = torch.randn(B, S // shard, cfg.hidden_size, requires_grad=True)
        cos, sin = rope_cos_sin(positions, model.inv_freq, x.dtype)
        docs = model.documents(positions)
        skip = {t.untyped_storage().data_ptr() for t in (*model.parameters(), cos, sin)}
        kept, host = {}, []
        original = memory_module._pack_to_host

        def counting_pack(t, original=original):
            host.append(t.numel() * t.element_size())
            return original(t)

        def pack(t):
            if t.untyped_storage().data_ptr() not in skip:
                kept.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
            return t

        memory_module._pack_to_host = counting_pack
        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                model.run_block(next(iter(model.blocks.values())), x, cos, sin, docs)
        finally:
            memory_module._pack_to_host = original
        out.append((sum(kept.values()), sum(host)))
    return out


PARALLEL_CASES = {
    "sp2": (ParallelLayout(sp=2), CFG),
    "sp2-replicated-kv": (ParallelLayout(sp=2), dataclasses.replace(CFG, num_kv_heads=1)),
    "tp2": (ParallelLayout(tp=2), CFG),
    "tp2-sequence-parallel": (ParallelLayout(tp=2, tp_sequence_parallel=True), CFG),
}


@pytest.mark.parametrize("case", list(PARALLEL_CASES))
def test_savers_under_parallel_layouts_keep_what_the_model_predicts(case):
    """Ulysses (new tensors from each all-to-all, kv heads replicated when fewer than sp) and tensor parallelism
    (sharded heads and MLP, the tp-sequence gather saved by the column layers) per saver, on 2 gloo ranks."""
    layout, cfg = PARALLEL_CASES[case]
    results = run_ranks(_saved_by_parallel_block, 2, layout, cfg, SAVERS)
    shapes = Shapes(cfg, layout.resolve(2), B, S, 4, eager=True)
    for memory, per_rank in zip(SAVERS, zip(*results)):
        predicted = block_memory(shapes, memory)
        for device, host in per_rank:
            assert (sum(predicted.device.values()), sum(predicted.host.values())) == (device, host), memory


@pytest.mark.parametrize("recompute", ["full", "around_core"])
def test_offload_of_the_first_layers_only_matches_the_plan(recompute, monkeypatch):
    """memory.offload_layers = 2 of 4: the first two blocks' recomputed inputs go to the host, the others' stay; the
    device and host bytes the whole model saves match the planner's terms, and the loss is the same."""
    from megalysses.models import memory as memory_module

    partial = MemoryConfig(recompute=recompute, offload_activations=True, offload_layers=2)
    assert CFG.num_layers == 4 and [partial.offloads_layer(i) for i in range(4)] == [True, True, False, False]
    model = GPT(CFG, memory=partial)
    model.init_weights(0)
    assert [b.offload for b in model.blocks.values()] == [True, True, False, False]
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept, host = {}, []
    pack_to_host = memory_module._pack_to_host

    def counting_pack(t):
        host.append(t.numel() * t.element_size())
        return pack_to_host(t)

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            kept.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    monkeypatch.setattr(memory_module, "_pack_to_host", counting_pack)
    ids = torch.randint(0, CFG.vocab_size, (B, S))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(ids, None, ids, total_valid=torch.tensor(B * S))
    cfg = RunConfig(model=CFG, layout=ParallelLayout(), memory=partial,
                    train=TrainConfig(global_batch_size=B, micro_batch_size=B, seq_len=S, nproc=1))
    plan = plan_memory(cfg, 1, eager=True)
    saved = sum(v for k, v in plan.device.items() if k.startswith(("activations", "head")))
    assert saved == pytest.approx(sum(kept.values()), rel=0.02)
    everything = dataclasses.replace(partial, offload_layers=0)
    one_layer_host = sum(block_memory(Shapes(CFG, ParallelLayout().resolve(1), B, S, 4, eager=True),
                                      everything).host.values())
    assert plan.host["offloaded activations"] == 2 * one_layer_host == sum(host) > 0
    reference = GPT(CFG, memory=MemoryConfig(recompute=recompute))
    reference.init_weights(0)
    assert loss.item() == reference(ids, None, ids, total_valid=torch.tensor(B * S)).item()


def test_offload_layers_needs_offload_and_fits_the_model():
    with pytest.raises(ModelConfigError, match="offload_activations = false offloads none"):
        MemoryConfig(recompute="full", offload_layers=4)
    with pytest.raises(ModelConfigError, match=r"offload_layers = -1: must be >= 0"):
        MemoryConfig(recompute="full", offload_activations=True, offload_layers=-1)
    cfg = RunConfig(model=CFG, memory=MemoryConfig(recompute="full", offload_activations=True, offload_layers=5),
                    train=TrainConfig(seq_len=S))
    with pytest.raises(ConfigError, match="offload_layers = 5 exceeds model.num_layers = 4"):
        cfg.check()
