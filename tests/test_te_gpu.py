"""Transformer Engine through the trainer, on GPUs: checkpoints move between the TE and torch backends, and FP8
training reduces its amax over the right group. Skipped without CUDA or without transformer_engine.

    python -m pytest -q tests/test_te_gpu.py        # on the GPU machine (TE installed); 2 GPUs for the tp2 cases
"""
import importlib.util
import io
import pickle
import subprocess
import sys

import pytest
import torch

from megalysses.checkpoint.checkpointer import extra_file
from megalysses.tools.plot import read_metrics

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(importlib.util.find_spec("transformer_engine") is None,
                                 reason="needs transformer_engine")]

SMOKE = ["--config", "gpu-smoke", "train.eval_every=0", "logging.interval=1", "checkpoint.keep_last=0"]


def gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def train(run_dir, nproc: int, *overrides: str) -> list[dict]:
    """megalysses-train under torchrun on `nproc` GPUs; returns the logged records (one per step)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "megalysses.train", *SMOKE, f"train.nproc={nproc}", f"logging.run_dir={run_dir}", *overrides]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return read_metrics(run_dir)


def loss_at(records: list[dict], step: int) -> float:
    return next(r["loss"] for r in records if r["step"] == step)


@pytest.mark.parametrize("first, second", [("te", "torch"), ("torch", "te")])
def test_checkpoint_moves_between_backends(tmp_path, first, second):
    """Train 10 steps on one backend, resume on the other: step 11 matches continuing on the first backend."""
    layout = ["layout=tp2"] if gpus() >= 2 else ["layout=single"]
    nproc = 2 if gpus() >= 2 else 1
    base = train(tmp_path / "a", nproc, *layout, f"model.backend={first}", "train.steps=12", "checkpoint.every=10")
    ckpt = tmp_path / "a" / "checkpoints" / "step-10"
    assert ckpt.is_dir(), sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir())
    moved = train(tmp_path / "b", nproc, *layout, f"model.backend={second}", "train.steps=12",
                  f"checkpoint.resume={ckpt}")
    assert [r["step"] for r in moved] == [11, 12]
    for step in (11, 12):  # same weights, optimizer state and data: the backends differ by bf16 kernel rounding
        assert loss_at(moved, step) == pytest.approx(loss_at(base, step), rel=2e-2), (step, base, moved)


def fp8_scales(extra_file) -> dict[str, torch.Tensor]:
    """Forward FP8 scaling factors of every TE module in a rank's saved extra state."""
    state = torch.load(extra_file, weights_only=False)
    scales = {}
    for key, blob in state.items():
        if isinstance(blob, torch.Tensor) and blob.dtype == torch.uint8 and blob.numel():
            raw = blob.cpu().numpy().tobytes()
            try:  # TE 2.x pickles its FP8 metadata into a uint8 tensor; older TE used torch.save
                meta = pickle.loads(raw)
            except Exception:
                meta = torch.load(io.BytesIO(raw), weights_only=False)
            if isinstance(meta, dict) and "scale_fwd" in meta:
                scales[key] = meta["scale_fwd"].float().cpu()
    return scales


FP8_STEPS = 300


@pytest.fixture(scope="module")
def fp8_and_bf16_runs(tmp_path_factory):
    """300 steps of the smoke model with TE layers on 2 GPUs (tp2), in bf16 and in FP8 (delayed scaling)."""
    tmp = tmp_path_factory.mktemp("fp8")
    steps = f"train.steps={FP8_STEPS}"
    bf16 = train(tmp / "bf16", 2, "layout=tp2", "model.backend=te", steps)
    fp8 = train(tmp / "fp8", 2, "layout=tp2", "model.backend=te", "train.fp8=delayed", steps)
    return tmp, bf16, fp8


@pytest.mark.skipif(gpus() < 2, reason="needs 2 GPUs")
def test_fp8_amax_is_reduced_over_tensor_parallel_ranks(fp8_and_bf16_runs):
    tmp, _, fp8 = fp8_and_bf16_runs
    ckpt = tmp / "fp8" / "checkpoints" / f"step-{FP8_STEPS}"
    rank0, rank1 = (fp8_scales(ckpt / extra_file(r)) for r in (0, 1))
    assert rank0 and rank0.keys() == rank1.keys()
    # the two tp ranks hold different weight shards (and the row-parallel layers different inputs): only an amax
    # reduced over the tp group gives them equal scales
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0), [k for k in rank0 if not torch.equal(rank0[k], rank1[k])]
    assert any((s != 1).any() for s in rank0.values())  # the scales moved off their initial value
    assert sum(r["loss"] for r in fp8[-30:]) / 30 < fp8[0]["loss"] - 2.0  # and it learns (from ln 256 = 5.5)


def window(records: list[dict], a: int, b: int) -> float:
    return sum(r["loss"] for r in records[a:b]) / (b - a)


@pytest.mark.skipif(gpus() < 2, reason="needs 2 GPUs")
def test_fp8_loss_follows_bf16(fp8_and_bf16_runs):
    """Every 50-step window after the first: the FP8 mean loss within 5% of bf16's (two bf16 runs that differ only
    in kernel rounding, TE vs torch layers, drift 2.3% apart over the same 300 steps; scripts/check_fp8_training.py)."""
    _, bf16, fp8 = fp8_and_bf16_runs
    windows = [(a, a + 50) for a in range(50, FP8_STEPS, 50)]
    gaps = [abs(window(fp8, a, b) - window(bf16, a, b)) / window(bf16, a, b) for a, b in windows]
    assert max(gaps) < 0.05, [(f"{a + 1}-{b}", round(window(bf16, a, b), 4), round(window(fp8, a, b), 4))
                              for a, b in windows]


def test_fp8_first_step_trains_every_layer(tmp_path):
    """The first FP8 step's gradient norm is bf16's: delayed scaling starts from calibrated scales, not from 1 (at
    scale 1 the FP8 layers' gradients flush to zero in E5M2 and the norm falls to about half)."""
    one = ["layout=single", "model.backend=te", "train.steps=1"]
    bf16 = train(tmp_path / "bf16", 1, *one)
    fp8 = train(tmp_path / "fp8", 1, *one, "train.fp8=delayed")
    assert fp8[0]["grad_norm"] == pytest.approx(bf16[0]["grad_norm"], rel=0.1), (bf16[0], fp8[0])
