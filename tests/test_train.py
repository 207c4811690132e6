"""End to end on CPU: the training entry point on 4 gloo ranks learns, logs and stops early on config mistakes."""
import json
import subprocess
import sys


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


def _losses_and_norms(tmp_path, name, *overrides):
    run_dir = tmp_path / name
    assert main(["--config", str(QUICKSTART), f"logging.run_dir={run_dir}", "train.steps=3", "train.eval_every=0",
                 "logging.interval=1", "model.tie_embeddings=true", "model.num_layers=4", *overrides]) == 0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records], [r["grad_norm"] for r in records]


def test_every_layout_trains_like_one_device(tmp_path):
    """Same seed, same data: losses and (clipped) global gradient norms of whole training steps agree across
    tp x pp x sp x dp layouts, ZeRO-1 and FSDP, tied embeddings included (counted once across pipeline stages)."""
    ref_loss, ref_norm = _losses_and_norms(tmp_path, "single", "layout=single", "train.nproc=1")
    for name, overrides in {
        "tp2-pp2-sp2": ["layout=tp2-pp2-sp2", "train.nproc=8"],
        "pp2-dp2-1f1b": ["layout={pp: 2, dp: 2}", "train.nproc=4"],
        "pp2-interleaved": ["layout={pp: 2, vpp: 2, schedule: interleaved-1f1b}", "train.nproc=2"],
        "sp2-dp2-zero1": ["layout={sp: 2, dp: 2, zero: 1}", "train.nproc=4"],
        "dp2-tp2-zero3": ["layout={tp: 2, dp: 2, zero: 3, tp_sequence_parallel: true}", "train.nproc=4"],
    }.items():
        loss, norm = _losses_and_norms(tmp_path, name, *overrides)
        for a, b in zip(loss + norm, ref_loss + ref_norm):
            assert abs(a - b) <= 1e-5 * abs(b), (name, loss, ref_loss, norm, ref_norm)


def test_trains_on_a_preprocessed_packed_dataset(tmp_path):
    """data.source = a megalysses-preprocess prefix: packed documents with resetting positions, split over sp."""
    from megalysses.tools.preprocess import preprocess

    docs = tmp_path / "docs.jsonl"
    text = (QUICKSTART.read_text() * 3).split("\n")
    docs.write_text("\n".join(json.dumps({"text": line}) for line in text if line) + "\n")
    preprocess([str(docs)], str(tmp_path / "corpus"))
    run_dir = tmp_path / "run"
    assert main(["--config", str(QUICKSTART), f"logging.run_dir={run_dir}", "train.steps=6", "train.eval_every=3",
                 "logging.interval=3", f"data.source={tmp_path / 'corpus'}", "data.val_fraction=0.2",
                 "model.vocab_size=257", "layout=sp4", "train.global_batch_size=4", "train.micro_batch_size=2",
                 "train.seq_len=64"]) == 0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [3, 6] and all("val_loss" in r for r in records)
    assert records[-1]["loss"] < records[0]["loss"]


def test_non_finite_steps_are_skipped_then_stop_the_run(tmp_path, capsys):
    """A blown-up model gives non-finite losses: each such step is skipped, and after train.max_bad_steps in a
    row the run stops with one line naming the rank and the step (steps 2 and 3 are the bad ones: step 1's update
    blew up), exit code 1, no traceback."""
    assert main(["--config", str(QUICKSTART), f"logging.run_dir={tmp_path}", "layout=single", "train.nproc=1",
                 "train.lr=1e30", "train.warmup_steps=0", "train.grad_clip=0", "train.max_bad_steps=2",
                 "train.steps=6", "train.eval_every=0"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert ("megalysses.train: rank 0 of 1 failed: FloatingPointError: 2 non-finite steps in a row, the last at "
            "step 3; lower train.lr") in err


def test_debug_shows_the_failing_ranks_traceback(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MEGALYSSES_DEBUG", "0")  # restored after the test: --debug sets it for this process
    assert main(["--config", str(QUICKSTART), f"logging.run_dir={tmp_path}", "layout=single", "train.nproc=1",
                 "train.lr=1e30", "train.warmup_steps=0", "train.grad_clip=0", "train.max_bad_steps=1",
                 "train.steps=3", "train.eval_every=0", "--debug"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "FloatingPointError: 1 non-finite steps in a row" in err
