"""Graceful stop under torchrun: SIGTERM to the agent reaches every worker, which finishes its step, saves a
checkpoint and exits; the same command then resumes from that step."""
import json
import os
import signal
import subprocess
import time

from megalysses.train import QUICKSTART


def metrics_steps(run_dir):
    path = run_dir / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.is_file() else []


def torchrun(run_dir, steps, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(["torchrun", "--standalone", "--nproc-per-node", "2", "-m", "megalysses.train",
                             "--config", str(QUICKSTART), "layout=sp2", "train.nproc=2", f"train.steps={steps}",
                             "train.eval_every=0", "logging.interval=1", f"logging.run_dir={run_dir}"],
                            env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # own process group: the agent and its workers


def finish(proc, timeout=180) -> str:
    try:
        return proc.communicate(timeout=timeout)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_sigterm_checkpoints_the_current_step_and_the_run_resumes(tmp_path):
    run_dir = tmp_path / "run"
    proc = torchrun(run_dir, 5000, tmp_path)
    deadline = time.monotonic() + 120
    while len(metrics_steps(run_dir)) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGTERM)  # torchrun forwards it to both workers
    out = finish(proc)
    steps = metrics_steps(run_dir)
    stopped = steps[-1]
    assert 2 <= stopped < 5000 and steps == list(range(1, stopped + 1)), out
    assert f"stopped after step {stopped}" in out and (run_dir / "checkpoints" / f"step-{stopped}").is_dir(), out

    out = finish(torchrun(run_dir, stopped + 2, tmp_path))
    assert metrics_steps(run_dir) == list(range(1, stopped + 3)), out
