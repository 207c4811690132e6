"""End to end on CPU: 4 gloo ranks train a few steps with wandb on (offline): the progress line is printed,
metrics.jsonl is written with a falling loss, one W&B offline run lands in the run directory, and the plot
command charts the run."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from megalysses.train import QUICKSTART


def test_four_rank_run_logs_everywhere(tmp_path):
    pytest.importorskip("wandb")
    run_dir, home = tmp_path / "run", tmp_path / "wandb-home"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true",
           **{k: str(home) for k in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR")}}
    env.pop("WANDB_API_KEY", None)
    out = subprocess.run([sys.executable, "-m", "megalysses.train", "--config", str(QUICKSTART),
                          f"logging.run_dir={run_dir}", "train.steps=6", "train.warmup_steps=1", "train.eval_every=0",
                          "logging.interval=2", "logging.wandb=true"],
                         env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "on 4 cpu ranks" in out.stdout and "step 6/6 | loss" in out.stdout and "ETA" in out.stdout

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 6]
    losses = [r["loss"] for r in records]
    assert losses[2] < losses[1] < losses[0], losses
    assert all(r["tokens_per_s"] > 0 and r["grad_norm"] > 0 and r["lr"] > 0 for r in records)

    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, f"expected one W&B offline run (rank 0's) in {run_dir / 'wandb'}, found {runs}"
    events = list(runs[0].glob("run-*.wandb"))
    assert len(events) == 1 and events[0].stat().st_size > 0 and (run_dir / "wandb.id").is_file()

    if importlib.util.find_spec("matplotlib"):
        from megalysses.tools.plot import plot_run

        written, notes = plot_run(run_dir)
        assert [p.name for p in written] == ["loss.png", "throughput.png"]
        assert notes == ["memory.png skipped: no peak_mem_gib values in metrics.jsonl"]
