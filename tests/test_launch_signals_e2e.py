"""The CPU launcher under signals: Ctrl-C (SIGINT to the process group) and SIGTERM to the launcher's pid alone
each make every rank finish its step, save a checkpoint at that step and exit, and the same command then resumes
to losses bit-identical to an uninterrupted run; ranks whose launcher is killed do not train on as orphans, and the
launcher's scratch folder does not stay behind."""
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from megalysses.train import QUICKSTART, main

# a constant LR (after warm-up): the losses of the first steps do not depend on train.steps
ARGS = ["--config", str(QUICKSTART), "layout=sp2", "train.nproc=2", "train.seq_len=64", "train.lr_schedule=constant",
        "train.warmup_steps=2", "train.eval_every=0", "logging.interval=1", "checkpoint.every=0"]


def losses(run_dir: Path) -> dict[int, float]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return {}
    text = path.read_text()
    return {r["step"]: r["loss"] for r in map(json.loads, text[:text.rfind("\n") + 1].splitlines())}


def start(run_dir: Path, steps: int, tmp: Path, tag: str) -> subprocess.Popen:
    env = {**os.environ, "TMPDIR": str(tmp), "MEGALYSSES_TEST_TAG": tag, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "megalysses.train", *ARGS, f"train.steps={steps}",
                             f"logging.run_dir={run_dir}"], env=env, start_new_session=True, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def tagged_processes(tag: str) -> list[int]:
    """Pids of live processes (launcher, forkserver, ranks) started with this test's tag in their environment."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and f"MEGALYSSES_TEST_TAG={tag}".encode() in (proc / "environ").read_bytes():
                state = (proc / "stat").read_text().split(")")[-1].split()[0]
                if state != "Z":
                    pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int, deadline_s: float = 180) -> None:
    deadline = time.monotonic() + deadline_s
    while len(losses(run_dir)) < step:
        assert proc.poll() is None, f"the run ended early:\n{proc.stdout.read()}"
        assert time.monotonic() < deadline, "no progress within the deadline"
        time.sleep(0.02)


def stop_after_step_2(proc: subprocess.Popen, run_dir: Path, send) -> str:
    """Wait until step 2 is logged, send the stop (send(proc)), and return the run's output once it exits."""
    try:
        wait_for_step(proc, run_dir, 2)
        send(proc)
        return proc.communicate(timeout=180)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.parametrize("how", ["sigint-to-group", "sigterm-to-launcher"])
def test_signal_saves_the_step_and_the_rerun_matches_an_uninterrupted_run(tmp_path, how):
    run_dir, tag = tmp_path / "run", uuid.uuid4().hex
    proc = start(run_dir, 5000, tmp_path, tag)
    if how == "sigint-to-group":
        out = stop_after_step_2(proc, run_dir, lambda p: os.killpg(p.pid, signal.SIGINT))  # Ctrl-C in a terminal
    else:
        out = stop_after_step_2(proc, run_dir, lambda p: os.kill(p.pid, signal.SIGTERM))  # the launcher alone
    stopped = max(losses(run_dir))
    assert proc.returncode == 0 and "Traceback" not in out, out
    assert f"stopped after step {stopped}" in out and "rerun the same command to resume" in out, out
    assert (run_dir / "checkpoints" / f"step-{stopped}").is_dir(), out
    assert not tagged_processes(tag), "a rank outlived its launcher"
    assert not list(tmp_path.glob("megalysses-ranks-*")), "the launcher's scratch folder stayed behind"

    resume = main([*ARGS, f"train.steps={stopped + 2}", f"logging.run_dir={run_dir}"])
    reference_dir = tmp_path / "reference"
    assert resume == 0 and main([*ARGS, f"train.steps={stopped + 2}", f"logging.run_dir={reference_dir}"]) == 0
    assert losses(run_dir) == losses(reference_dir)  # every step, bit for bit (floats compared with ==)
    assert sorted(losses(run_dir)) == list(range(1, stopped + 3))


def test_ranks_do_not_outlive_a_killed_launcher(tmp_path):
    run_dir, tag = tmp_path / "run", uuid.uuid4().hex
    proc = start(run_dir, 5000, tmp_path, tag)
    try:
        wait_for_step(proc, run_dir, 2)
        os.kill(proc.pid, signal.SIGKILL)  # the launcher only: its forkserver and ranks are left behind
        proc.wait()
        deadline = time.monotonic() + 120
        while tagged_processes(tag) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not tagged_processes(tag), "ranks still running two minutes after their launcher died"
    finally:
        for pid in tagged_processes(tag):
            os.kill(pid, signal.SIGKILL)
    stopped = max(losses(run_dir))
    assert (run_dir / "checkpoints" / f"step-{stopped}").is_dir()  # they saved their step on the way out
    assert not list(tmp_path.glob("megalysses-ranks-*")), "the dead launcher's scratch folder stayed behind"


def test_slurm_template_stops_saves_and_requeues_on_sigterm(tmp_path):
    """scripts/train.sbatch under stand-in srun / scontrol: SIGTERM to the batch shell (what --signal=B:TERM@300
    sends before the time limit) reaches the run, which saves its step, and the job requeues itself."""
    bin_dir, run_dir, tag = tmp_path / "bin", tmp_path / "run", uuid.uuid4().hex
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(  # runs the training command on CPU ranks instead of torchrun on GPUs
        f'#!/usr/bin/env bash\nwhile [ "$1" != "megalysses.train" ]; do shift; done; shift\n'
        f'exec {sys.executable} -m megalysses.train "$@"\n')
    (bin_dir / "scontrol").write_text(f'#!/usr/bin/env bash\n[ "$1" = show ] && echo localhost && exit 0\n'
                                      f'echo "$@" > {tmp_path / "scontrol.txt"}\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "node0", "SLURM_NNODES": "1",
           "SLURM_JOB_ID": "4242", "TMPDIR": str(tmp_path), "MEGALYSSES_TEST_TAG": tag, "PYTHONUNBUFFERED": "1"}
    script = Path(__file__).resolve().parents[1] / "scripts" / "train.sbatch"
    proc = subprocess.Popen(["bash", str(script), *ARGS, "train.steps=5000", f"logging.run_dir={run_dir}"], env=env,
                            start_new_session=True, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = stop_after_step_2(proc, run_dir, lambda p: os.kill(p.pid, signal.SIGTERM))  # the batch shell only
    stopped = max(losses(run_dir))
    assert proc.returncode == 0, out
    assert f"stopped after step {stopped}" in out and "requeueing job 4242" in out, out
    assert (run_dir / "checkpoints" / f"step-{stopped}").is_dir()
    assert (tmp_path / "scontrol.txt").read_text().split() == ["requeue", "4242"]
    assert not tagged_processes(tag)
