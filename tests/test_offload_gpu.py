"""Optimizer offload on a GPU: masters and moments in pinned host memory, streamed through the device for the step,
give bitwise the losses and checkpoint of the run without offload (zero 0 and ZeRO-1 on one GPU); FSDP2's CPU
offload (zero 3) steps on the host and stays within bf16 noise of the device step. Skipped without CUDA.

    python -m pytest -q tests/test_offload_gpu.py        # on the GPU machine
"""
import subprocess
import sys

import pytest
import torch

from megalysses.checkpoint.tensors import TensorReader
from megalysses.tools.plot import read_metrics

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

SMOKE = ["--config", "gpu-smoke", "train.steps=6", "train.seq_len=512", "train.eval_every=0", "logging.interval=1",
         "checkpoint.every=3", "checkpoint.keep_last=0"]


def train(run_dir, *overrides: str) -> dict[int, float]:
    """megalysses-train on one GPU under torchrun; the logged loss of every step."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
           "-m", "megalysses.train", *SMOKE, f"logging.run_dir={run_dir}", *overrides]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return {r["step"]: r["loss"] for r in read_metrics(run_dir)}


def same_checkpoints(a, b) -> None:
    ra, rb = TensorReader(a), TensorReader(b)
    assert sorted(ra.entries) == sorted(rb.entries)
    for name in ra.entries:
        assert ra.get(name).equal(rb.get(name)), f"{name} differs"


@pytest.mark.parametrize("zero", [0, 1])
def test_streamed_offload_is_bitwise_on_gpu(tmp_path, zero):
    """6 steps with and without offload: identical losses and checkpoints; a resume from the offloaded run's step 3
    without offload continues identically."""
    plain = train(tmp_path / "plain", f"layout.zero={zero}")
    offloaded = train(tmp_path / "offloaded", f"layout.zero={zero}", "train.offload_optimizer=true")
    assert offloaded == plain
    same_checkpoints(tmp_path / "plain/checkpoints/step-6", tmp_path / "offloaded/checkpoints/step-6")
    resumed = train(tmp_path / "resumed", f"layout.zero={zero}",
                    f"checkpoint.resume={tmp_path / 'offloaded/checkpoints/step-3'}")
    assert resumed == {s: plain[s] for s in (4, 5, 6)}
    same_checkpoints(tmp_path / "plain/checkpoints/step-6", tmp_path / "resumed/checkpoints/step-6")


def test_fsdp_host_offload_trains_and_resumes_on_gpu(tmp_path):
    """zero 3 with FSDP2's CPU offload: the host AdamW stays within bf16 noise of the device AdamW; its checkpoint
    resumes without offload."""
    plain = train(tmp_path / "plain", "layout.zero=3")
    offloaded = train(tmp_path / "offloaded", "layout.zero=3", "train.offload_optimizer=true")
    assert offloaded.keys() == plain.keys()
    for step in plain:
        assert offloaded[step] == pytest.approx(plain[step], rel=2e-3), (step, offloaded[step], plain[step])
    resumed = train(tmp_path / "resumed", "layout.zero=3",
                    f"checkpoint.resume={tmp_path / 'offloaded/checkpoints/step-3'}")
    assert sorted(resumed) == [4, 5, 6]
    for step in resumed:
        assert resumed[step] == pytest.approx(offloaded[step], rel=2e-3)
