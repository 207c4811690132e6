"""Exact resume after a crash: a real training run (4 gloo ranks, tp2 x dp2, ZeRO-1) killed with SIGKILL once a
checkpoint exists, then resumed with checkpoint.resume=auto, logs exactly (==) the losses of an uninterrupted run at
every step, on CPU float32; keep_last holds."""
import json
import os
import signal
import subprocess
import sys
import time

from megalysses.train import QUICKSTART, main

STEPS = 16
ARGS = ["--config", str(QUICKSTART), "layout={tp: 2, dp: 2, zero: 1}", f"train.steps={STEPS}", "train.seq_len=64",
        "train.warmup_steps=2", "train.eval_every=0", "logging.interval=1", "checkpoint.every=2",
        "checkpoint.keep_last=2"]


def logged_losses(run_dir) -> list[tuple[int, float]]:
    """Every (step, loss) record of metrics.jsonl, in order (a resumed run appends to the killed run's file)."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines)]


def last_logged_step(run_dir) -> int:
    """The newest step in metrics.jsonl while the run writes it (complete lines only)."""
    text = (run_dir / "metrics.jsonl").read_text()
    complete = text[:text.rfind("\n") + 1].splitlines()
    return json.loads(complete[-1])["step"] if complete else 0


def test_killed_run_resumes_with_identical_losses(tmp_path):
    reference_dir, run_dir = tmp_path / "reference", tmp_path / "run"
    assert main([*ARGS, f"logging.run_dir={reference_dir}"]) == 0
    reference = dict(logged_losses(reference_dir))
    assert sorted(reference) == list(range(1, STEPS + 1))

    errors = open(tmp_path / "killed.stderr", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "megalysses.train", *ARGS, f"logging.run_dir={run_dir}"],
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=errors)
    latest, deadline = run_dir / "checkpoints" / "latest", time.monotonic() + 240
    try:  # kill once a checkpoint exists and a step after it was logged: that step is recomputed on resume
        while not latest.exists() or last_logged_step(run_dir) < 5:
            assert proc.poll() is None, f"the run ended early: {(tmp_path / 'killed.stderr').read_text()}"
            assert time.monotonic() < deadline, "no checkpoint within the deadline"
            time.sleep(0.01)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher, its forkserver and every rank
        proc.wait()
        errors.close()
    killed = logged_losses(run_dir)
    assert killed and max(step for step, _ in killed) < STEPS, "the kill must land mid-training"

    assert main([*ARGS, f"logging.run_dir={run_dir}"]) == 0  # checkpoint.resume=auto (the default)
    records = logged_losses(run_dir)
    resumed_from = records[len(killed)][0] - 1
    assert resumed_from >= 2 and resumed_from % 2 == 0 and resumed_from <= max(s for s, _ in killed)
    print(f"killed after logging step {max(s for s, _ in killed)}; resumed from step {resumed_from}")
    assert {step for step, _ in records} == set(reference)
    for step, loss in records:  # before the kill, re-run after it: all bit-identical to the uninterrupted run
        assert loss == reference[step], (step, loss, reference[step], resumed_from)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["latest", f"step-{STEPS - 2}",
                                                                         f"step-{STEPS}"]
