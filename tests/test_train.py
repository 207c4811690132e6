"""End to end on CPU: the training entry point on 4 gloo ranks learns, logs and stops early on config mistakes."""
import json
import subprocess
import sys

import yaml

from megalysses.config import load_run_config
from megalysses.train import QUICKSTART, main


def test_quickstart_trains_on_four_ranks(tmp_path):
    run_dir = tmp_path / "run"
    assert main(["--config", str(QUICKSTART), f"logging.run_dir={run_dir}", "train.steps=30", "train.eval_every=15",
                 "logging.interval=5"]) == 0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [5, 10, 15, 20, 25, 30]
    losses = [r["loss"] for r in records]
    assert losses[-1] < losses[0] - 0.5, losses  # bytes start near ln(256) = 5.5
    assert "val_loss" in records[2] and records[2]["val_loss"] < 5.0
    assert all(r["tokens_per_s"] > 0 and r["grad_norm"] > 0 for r in records)
    saved = load_run_config(run_dir / "config.yaml")  # the resolved config is written and loads back
    assert saved.train.steps == 30 and saved.layout.tp == 2 and saved.layout.sp == 2


def test_config_mistakes_stop_before_any_work(tmp_path, capsys):
    assert main(["--config", str(QUICKSTART), "train.lrr=1"]) == 2
    assert "did you mean 'lr'" in capsys.readouterr().err
    assert main(["--config", str(QUICKSTART), "train.nproc=3"]) == 2  # tp2 x sp2 cannot use 3 ranks
    assert "world size 3 is not divisible by tp * sp * pp = 2 * 2 * 1 = 4" in capsys.readouterr().err
    assert main(["--config", str(QUICKSTART), "train.seq_len=seven"]) == 2
    assert "train.seq_len" in capsys.readouterr().err


def test_module_entry_point_reports_config_errors():
    out = subprocess.run([sys.executable, "-m", "megalysses.train", "layout.tp=0"], capture_output=True, text=True)
    assert out.returncode == 2 and "layout.tp = 0" in out.stderr
