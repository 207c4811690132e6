"""Launchers and run configs: every bundled run fits its world size, and two torchrun agents meeting at a c10d
rendezvous on localhost (the multi-node launcher, two 'nodes' on one machine) train together."""
import json
import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from megalysses.config import CONFIG_DIR, bundled, load_model_config, load_run_config

ROOT = Path(__file__).resolve().parents[1]
LAUNCHERS = ["scripts/train_single_node.sh", "scripts/train_multi_node.sh", "scripts/train.sbatch"]
RUNS = {"quickstart": 4, "gpu-smoke": 1, "gpu-bench": 1, "gpu-sp4-8b-long": 4, "gpu-tp2-sp4-8b": 8,
        "gpu-sft-llama-3.1-8b": 8}
"""Bundled run -> the world size it is written for."""


def test_every_bundled_run_is_listed():
    assert sorted(RUNS) == bundled("runs")


@pytest.mark.parametrize("name", sorted(RUNS))
def test_run_config_fits_its_world_size(name):
    cfg = load_run_config(name)
    layout = cfg.check(RUNS[name])
    assert layout.tp * layout.sp * layout.pp * layout.dp == RUNS[name] == cfg.train.nproc
    assert cfg.train.global_batch_size % (cfg.train.micro_batch_size * layout.dp) == 0
    assert (cfg.train.device == "cuda") == name.startswith("gpu-")


@pytest.mark.parametrize("name", ["gpu-sp4-8b-long", "gpu-tp2-sp4-8b"])
def test_long_context_runs_use_the_llama_3_8b_geometry(name):
    cfg, llama = load_run_config(name), load_model_config("llama-3-8b")
    same = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "intermediate_size",
            "rope_theta", "tie_embeddings")
    assert {k: getattr(cfg.model, k) for k in same} == {k: getattr(llama, k) for k in same}
    assert cfg.train.seq_len == cfg.model.max_seq_len == 131072 and cfg.model.rope_scaling.factor == 8.0
    assert cfg.layout.sp == 4 and cfg.layout.tp == (2 if "tp2" in name else 1)
    assert cfg.train.dtype == "bfloat16" and cfg.train.micro_batch_size == 1
    assert len(cfg.memory.auto_keys()) == 5  # the planner picks the savers for the GPUs it runs on
    from megalysses.plan import capacity_for_device, evaluate, resolve_auto

    capacity = capacity_for_device("h200", ranks_per_host=cfg.train.nproc)
    resolved, why = resolve_auto(cfg, cfg.train.nproc, capacity)
    assert evaluate(resolved, cfg.train.nproc, capacity).fits and "fastest" in why


@pytest.mark.parametrize("script", LAUNCHERS)
def test_launcher_scripts_parse(script):
    out = subprocess.run(["bash", "-n", str(ROOT / script)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_torchrun_agents_train_through_a_localhost_rendezvous(tmp_path):
    """scripts/train_multi_node.sh twice: NNODES=2 x NPROC=2 CPU ranks (tp2 x sp2, gloo) meet at 127.0.0.1."""
    port, run_dir = free_port(), tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NNODES": "2", "NPROC": "2", "MASTER": f"127.0.0.1:{port}",
           "RUN_ID": f"test-{port}", "PYTHONUNBUFFERED": "1"}
    command = ["bash", str(ROOT / "scripts" / "train_multi_node.sh"),
               "--config", str(CONFIG_DIR / "runs" / "quickstart.yaml"), "train.steps=4", "train.warmup_steps=1", "train.eval_every=0", "logging.interval=1",
               f"logging.run_dir={run_dir}"]
    logs = [(tmp_path / f"node{i}.log").open("w+") for i in range(2)]
    agents = [subprocess.Popen(command, env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True) for log in logs]  # own process group: agent + its workers
    try:
        codes = [agent.wait(timeout=240) for agent in agents]
    finally:
        for agent in agents:
            if agent.poll() is None:
                os.killpg(agent.pid, signal.SIGKILL)
                agent.wait()
    output = "\n".join(f"--- node {i} ---\n" + (tmp_path / f"node{i}.log").read_text() for i in range(2))
    assert codes == [0, 0], output
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records]
    assert [r["step"] for r in records] == [1, 2, 3, 4], output
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < losses[0] - 0.3, losses
    assert "layout tp2-sp2 on 4 cpu ranks" in output and "step 4/4 | loss" in output
