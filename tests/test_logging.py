"""Metric sinks: metrics.jsonl, the progress line, wandb (offline / online / auto), TensorBoard, rank 0 only."""
import importlib.util
import io
import json
import os

import pytest

import megalysses.sinks as sinks
from megalysses.config import ConfigError, load_run_config
from megalysses.parallel.launch import run_ranks
from megalysses.sinks import (MetricsSinks, ProgressLine, SinkUnavailable, format_duration, require_sinks,
                              wandb_key_configured, wandb_mode)
from megalysses.train import QUICKSTART

STEP = {"loss": 2.5, "lr": 1e-3, "grad_norm": 0.5, "tokens_per_s": 1234.4, "tflops_per_device": 1.5, "mfu": 0.12,
        "peak_mem_gib": 3.25}


def run_config(run_dir, *overrides):
    return load_run_config(QUICKSTART, [f"logging.run_dir={run_dir}", "train.steps=4", *overrides])


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    """wandb offline, with everything it writes outside the run directory kept inside the test's temp dir."""
    pytest.importorskip("wandb")
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    env.update({k: str(tmp_path / "wandb-home") for k in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR",
                                                         "WANDB_DATA_DIR")})
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


def offline_runs(run_dir):
    return sorted((run_dir / "wandb").glob("offline-run-*"))


def test_rank_zero_writes_jsonl_and_progress_line(tmp_path):
    run_dir, out = tmp_path / "run", io.StringIO()
    with MetricsSinks(run_config(run_dir), rank=0, stream=out) as log:
        log.log(1, STEP)
        log.log(2, {**STEP, "loss": 2.0, "val_loss": 2.2, "mfu": None, "peak_mem_gib": None})
    got = records(run_dir)
    assert [r["step"] for r in got] == [1, 2] and got[1]["loss"] == 2.0 and got[1]["mfu"] is None
    assert all(r["time"] >= 0 for r in got)
    first, second = out.getvalue().splitlines()
    assert first.startswith("step 1/4 | loss 2.5000 | lr 1.00e-03 | gnorm 0.500 | 1,234 tok/s | 1.5 TFLOP/s/dev | "
                            "MFU 12.0% | mem 3.25 GiB | ETA ")
    assert "val 2.2000" in second and "MFU" not in second and "mem" not in second


def test_other_ranks_write_nothing(tmp_path, capsys):
    run_dir = tmp_path / "run"
    extras = [f"logging.{name}=true" for name in ("wandb", "tensorboard") if importlib.util.find_spec(name)]
    with MetricsSinks(run_config(run_dir, *extras), rank=3) as log:
        log.log(1, STEP)
    assert not run_dir.exists() and capsys.readouterr().out == ""


def test_eta_counts_only_the_steps_run_by_this_process(monkeypatch):
    clock = iter([100.0, 160.0])  # created at t=100; step 110 logged at t=160, after 10 steps since resuming at 100
    monkeypatch.setattr(sinks.time, "monotonic", lambda: next(clock))
    line = ProgressLine(total_steps=1000, start_step=100).line(110, {"loss": 1.0})
    assert line == "step  110/1000 | loss 1.0000 | ETA 1h29m"  # 6 s/step * 890 steps
    assert [format_duration(s) for s in (0.4, 59, 61, 3600 * 5 + 7 * 60 + 3, float("inf"))] == \
        ["0s", "59s", "1m01s", "5h07m", "?"]


def test_wandb_mode_online_only_with_a_key(tmp_path):
    assert wandb_mode("offline", {"WANDB_API_KEY": "k"}) == ("offline", None)
    assert wandb_mode("online", {}) == ("online", None)
    missing = tmp_path / "no-netrc"
    assert wandb_mode("auto", {"WANDB_API_KEY": "k"}, missing) == ("online", None)
    mode, note = wandb_mode("auto", {}, missing)
    assert mode == "offline" and "no API key" in note and "wandb sync" in note
    netrc = tmp_path / "netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password secret\n")
    assert wandb_mode("auto", {}, netrc) == ("online", None)
    assert wandb_key_configured({"NETRC": str(netrc)})
    assert not wandb_key_configured({"WANDB_BASE_URL": "https://wandb.example.com"}, netrc)  # another host's key
    netrc.write_text("machine wandb.example.com login user password secret\n")
    assert wandb_key_configured({"WANDB_BASE_URL": "https://wandb.example.com"}, netrc)
    netrc.write_text("machine api.wandb.ai login")  # unparsable: no key
    assert not wandb_key_configured({}, netrc)
    with pytest.raises(ConfigError, match="choose one of"):
        wandb_mode("sometimes", {})


def test_missing_packages_name_the_install_command(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(sinks.importlib.util, "find_spec",
                        lambda name, *a: None if name in ("wandb", "tensorboard") else real(name, *a))
    with pytest.raises(SinkUnavailable, match=r'logging.wandb = true needs the wandb package.*'
                                              r'pip install "megalysses\[wandb\]"'):
        MetricsSinks(run_config(tmp_path / "run", "logging.wandb=true"), rank=1)  # every rank checks
    with pytest.raises(ConfigError, match="logging.tensorboard = true needs the tensorboard package"):
        require_sinks(run_config(tmp_path / "run", "logging.tensorboard=true").logging)
    assert not (tmp_path / "run").exists()


def test_wandb_offline_run_and_resume(tmp_path, wandb_env):
    run_dir = tmp_path / "run"
    cfg = run_config(run_dir, "logging.wandb=true")
    with MetricsSinks(cfg, rank=0, stream=io.StringIO()) as log:
        for step in (1, 2, 3):
            log.log(step, {**STEP, "loss": 3.0 / step, "mfu": None})
    (run,) = offline_runs(run_dir)
    run_id = (run_dir / "wandb.id").read_text().strip()
    assert run.name.endswith(run_id) and (run / f"run-{run_id}.wandb").stat().st_size > 0
    with MetricsSinks(cfg, rank=0, start_step=3, stream=io.StringIO()) as log:  # a resumed run: same W&B run id
        log.log(4, STEP)
    runs = offline_runs(run_dir)  # offline-run-<time>-<id>[-1 when started in the same second]
    assert len(runs) == 2 and all(list(r.glob(f"run-{run_id}.wandb")) for r in runs)
    assert [r["step"] for r in records(run_dir)] == [1, 2, 3, 4]
    assert not any(p.name.startswith("offline-run") for p in (tmp_path / "wandb-home").rglob("*"))


def test_wandb_auto_without_key_logs_offline_with_a_note(tmp_path, wandb_env, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    out = io.StringIO()
    MetricsSinks(run_config(tmp_path / "run", "logging.wandb=true", "logging.wandb_mode=auto"), 0, stream=out).close()
    assert "logging offline" in out.getvalue() and len(offline_runs(tmp_path / "run")) == 1


def test_tensorboard_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    with MetricsSinks(run_config(run_dir, "logging.tensorboard=true"), rank=0, stream=io.StringIO()) as log:
        log.log(1, {**STEP, "mfu": None})
        log.log(2, {**STEP, "loss": 2.0})
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 2.5), (2, 2.0)]
    assert [e.step for e in events.Scalars("mfu")] == [2]


class _Recorder:
    def __init__(self, fail=False):
        self.closed, self.fail = None, fail

    def log(self, step, metrics):
        pass

    def close(self, failed=False):
        self.closed = failed
        if self.fail:
            raise OSError("disk full")


def test_every_sink_is_closed_and_a_crash_is_marked(tmp_path):
    log = MetricsSinks(run_config(tmp_path / "run"), rank=1)
    log.sinks = [_Recorder(), _Recorder(fail=True), _Recorder()]
    with pytest.raises(RuntimeError, match="training blew up"):
        with log:
            raise RuntimeError("training blew up")
    assert [s.closed for s in log.sinks] == [True, True, True]
    log = MetricsSinks(run_config(tmp_path / "run"), rank=1)
    log.sinks = [_Recorder(), _Recorder(fail=True)]
    with pytest.raises(OSError, match="disk full"):
        log.close()
    assert log.sinks[0].closed is False
    log.close()  # closing twice is harmless


def _log_three_steps(rank, world, cfg, env):
    os.environ.update(env)  # the forkserver may predate the test's environment
    with MetricsSinks(cfg, rank, stream=io.StringIO()) as log:
        for step in (1, 2, 3):
            log.log(step, {"loss": 3.0 / step, "lr": 1e-3})


def test_four_ranks_one_writer(tmp_path, wandb_env):
    """What the trainer does on 4 ranks: every rank builds the sinks and logs; only rank 0 writes (one W&B run)."""
    run_dir = tmp_path / "run"
    run_ranks(_log_three_steps, 4, run_config(run_dir, "logging.wandb=true"), wandb_env, timeout=120)
    assert [r["step"] for r in records(run_dir)] == [1, 2, 3]
    (run,) = offline_runs(run_dir)
    assert list(run.glob("run-*.wandb"))


def test_a_torn_last_record_is_cut_off_on_resume_and_the_file_plots(tmp_path, capsys):
    """A kill mid-write leaves half a record: the resumed run's first record must start on its own line, the torn
    bytes go to metrics.jsonl.torn (warned once), and megalysses-plot reads the repaired file."""
    from megalysses.tools.plot import read_metrics

    cfg = run_config(tmp_path)
    with MetricsSinks(cfg, rank=0, stream=io.StringIO()) as log:
        log.log(1, {"loss": 3.0})
        log.log(2, {"loss": 2.5})
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(path.read_bytes() + b'{"step": 3, "time": 0.1, "lo')  # killed mid-write
    with MetricsSinks(cfg, rank=0, start_step=2, stream=io.StringIO()) as log:
        log.log(3, {"loss": 2.0})
    assert [r["step"] for r in records(tmp_path)] == [1, 2, 3]  # every line whole JSON
    assert (tmp_path / "metrics.jsonl.torn").read_bytes() == b'{"step": 3, "time": 0.1, "lo\n'
    err = capsys.readouterr().err
    assert err.count("the last record was cut off mid-write (28 bytes") == 1
    assert [r["loss"] for r in read_metrics(tmp_path)] == [3.0, 2.5, 2.0]
    with MetricsSinks(cfg, rank=0, start_step=3, stream=io.StringIO()):
        pass  # a whole file is left as it is
    assert "cut off" not in capsys.readouterr().err and len(records(tmp_path)) == 3


def test_a_file_whose_only_record_is_torn_is_emptied(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_bytes(b'{"step": 1, "lo')
    with MetricsSinks(run_config(tmp_path), rank=0, stream=io.StringIO()) as log:
        log.log(2, {"loss": 1.0})
    assert [r["step"] for r in records(tmp_path)] == [2]
