"""Layout-independent checkpoints: a run saved under tp2-pp2-sp2 (ZeRO-1) loads under dp8 (FSDP, ZeRO-3), sp4
(ZeRO-1 over sp) and pp4 (ZeRO-0) with bit-identical model and optimizer state, and the next step's loss equals the
original run's (up to the new layout's reduction order); a damaged newest checkpoint is passed over for the previous
one; keep_last prunes; megalysses-to-hf exports the training-written checkpoint bit for bit. A run saved under
sp2 x ring2 loads under sp2 and on one device."""
import json
import os
import shutil

import pytest
import torch
from safetensors import safe_open

from megalysses.checkpoint import Checkpointer, TensorReader, TrainingState
from megalysses.config import CheckpointConfig, DataConfig, LoggingConfig, RunConfig, TrainConfig
from megalysses.models.config import GPTConfig
from megalysses.models.hf import ours_to_hf
from megalysses.parallel import ParallelLayout
from megalysses.parallel.launch import run_ranks
from megalysses.tools.convert import megalysses_to_hf
from megalysses.data import StepData
from megalysses.trainer import Trainer, train

os.environ.setdefault("MEGALYSSES_PRELOAD", "megalysses.trainer,megalysses.checkpoint,torch.distributed.fsdp")

MODEL = GPTConfig(vocab_size=256, hidden_size=32, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=48,
                  max_seq_len=64)  # untied: ZeRO-1 with pp > 1 needs it
TEXT = " ".join(f"Sentence {i} of a small corpus, with words that repeat and numbers like {i * 37 % 101}."
                for i in range(300))


def run_config(tmp_path, layout: ParallelLayout, run_dir: str, **checkpoint) -> RunConfig:
    return RunConfig(model=MODEL, layout=layout,
                     train=TrainConfig(global_batch_size=8, micro_batch_size=1, seq_len=32, steps=3, warmup_steps=1,
                                       eval_every=0),
                     data=DataConfig(source=str(tmp_path / "corpus.txt")),
                     checkpoint=CheckpointConfig(**checkpoint),
                     logging=LoggingConfig(run_dir=str(tmp_path / run_dir), interval=1))


def train_on_rank(rank: int, world: int, cfg: RunConfig):
    return train(cfg)


def resume_on_rank(rank: int, world: int, cfg: RunConfig):
    """Build the model and optimizer for cfg.layout, resume, gather the canonical state, take one step."""
    trainer = Trainer(cfg)
    data = StepData(cfg, trainer.mesh)
    checkpoints = Checkpointer(cfg, trainer.mesh, trainer.chunks, trainer.dp, data.loaders)
    start = checkpoints.resume()
    state = TrainingState(trainer.chunks, trainer.mesh, trainer.dp).gather_to_writers()  # what this rank would write
    metrics = trainer.train_step(trainer.batcher.micro_batches(*data.rows(start)), start)
    return start, checkpoints.skipped, {k: v.numpy() for k, v in state.items()}, metrics["loss"]


TARGETS = {  # name: (layout, ranks)
    "dp8-zero3": (ParallelLayout(dp=8, zero=3), 8),
    "sp4-zero1": (ParallelLayout(sp=4, zero=1), 4),
    "pp4-zero0": (ParallelLayout(pp=4), 4),
}


@pytest.mark.slow
def test_save_under_tp2_pp2_sp2_then_load_under_dp8_sp4_pp4(tmp_path):
    (tmp_path / "corpus.txt").write_text(TEXT)
    source = run_config(tmp_path, ParallelLayout(tp=2, pp=2, sp=2, zero=1), "source", every=1, keep_last=2)
    records = run_ranks(train_on_rank, 8, source)[0]
    losses = {r["step"]: r["loss"] for r in records}
    ckpts = tmp_path / "source" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step-2", "step-3"]  # step-1 pruned
    reader = TensorReader(ckpts / "step-2")
    stored = {k: t.numpy() for k, t in reader.read(sorted(reader.entries)).items()}
    assert len(stored) == 4 * 27 and stored["optim.head.weight.step"] == 2.0  # 27 params x (value, 2 moments, step)

    exported = megalysses_to_hf(str(ckpts / "step-2"), str(tmp_path / "hf"), max_shard_size="20KB", quiet=True)
    weight_map = json.loads((exported / "model.safetensors.index.json").read_text())["weight_map"]
    expected = dict(ours_to_hf(lambda n: torch.from_numpy(stored[f"model.{n}"]), MODEL))
    assert weight_map.keys() == expected.keys() and len(set(weight_map.values())) > 2
    for name, file in weight_map.items():  # a checkpoint written by training, exported bit for bit
        with safe_open(str(exported / file), "pt") as f:
            assert torch.equal(f.get_tensor(name), expected[name]), name

    damaged = tmp_path / "damaged"  # the newest checkpoint truncated: resume 'auto' must fall back to step-2
    shutil.copytree(ckpts, damaged)
    victim = sorted((damaged / "step-3").glob("*.distcp"))[0]
    victim.write_bytes(victim.read_bytes()[:-3])

    for name, (layout, world) in TARGETS.items():
        if name == "sp4-zero1":
            cfg = run_config(tmp_path, layout, name, dir=str(damaged), resume="auto")
        else:
            cfg = run_config(tmp_path, layout, name, resume=str(ckpts / "step-2"))
        results = run_ranks(resume_on_rank, world, cfg)
        merged = {}
        for start, skipped, state, loss in results:
            assert start == 2
            assert skipped == ([f"{victim}: {victim.stat().st_size} bytes, the manifest records "
                                f"{victim.stat().st_size + 3} (truncated or overwritten)"]
                               if name == "sp4-zero1" else [])
            assert not merged.keys() & state.keys(), "a tensor written by two ranks"
            merged.update(state)
            assert loss == results[0][3]
        assert merged.keys() == stored.keys(), name
        for key, value in stored.items():
            assert (merged[key] == value).all(), f"{name}: {key} differs after loading"
        loss = results[0][3]
        print(f"{name}: next-step loss {loss!r} vs {losses[3]!r} ({abs(loss - losses[3]) / losses[3]:.1e} rel)")
        assert abs(loss - losses[3]) <= 1e-6 * losses[3], (name, loss, losses[3])


def test_save_under_sp2_ring2_then_load_under_sp2_and_one_device(tmp_path):
    """A checkpoint written under the sp x ring hybrid (ZeRO-1 over ring x sp) loads bit for bit under Ulysses sp2 and
    on one device; the next step's loss matches the original run's (the ring's block core and SDPA differ only in
    summation order)."""
    (tmp_path / "corpus.txt").write_text(TEXT)
    source = run_config(tmp_path, ParallelLayout(sp=2, ring=2, zero=1), "source", every=2)
    losses = {r["step"]: r["loss"] for r in run_ranks(train_on_rank, 4, source)[0]}
    step2 = tmp_path / "source" / "checkpoints" / "step-2"
    reader = TensorReader(step2)
    stored = {k: t.numpy() for k, t in reader.read(sorted(reader.entries)).items()}
    for name, layout, world in (("sp2", ParallelLayout(sp=2), 2), ("single", ParallelLayout(), 1)):
        results = run_ranks(resume_on_rank, world, run_config(tmp_path, layout, name, resume=str(step2)))
        merged = {}
        for start, _, state, loss in results:
            assert start == 2 and loss == results[0][3]
            merged.update(state)
        assert merged.keys() == stored.keys(), name
        for key, value in stored.items():
            assert (merged[key] == value).all(), f"{name}: {key} differs after loading"
        assert abs(results[0][3] - losses[3]) <= 1e-6 * losses[3], (name, results[0][3], losses[3])
