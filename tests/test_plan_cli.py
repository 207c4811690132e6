"""megalysses-plan and the planner at the start of megalysses-train: the report, the ranked search, 'auto' savers,
a run predicted not to fit refused before any rank starts, and --print-config."""
import dataclasses

import pytest

from megalysses.config import load_run_config
from megalysses.models.config import MemoryConfig
from megalysses.plan import GIB, Capacity, capacity_for_device, evaluate, resolve_auto, search
from megalysses.plan.cli import main as plan_main
from megalysses.train import load_checked, main as train_main

ONE_B_128K = ["model=llama-3.2-1b", "model.attention_core=flash", "train.seq_len=131072",
              "model.max_seq_len=131072"]
AUTO = ["memory.recompute=auto", "memory.offload_activations=auto", "memory.mlp_tiles=auto", "memory.loss_tiles=auto",
        "memory.fused_loss=auto"]


def test_plan_prints_the_breakdown_and_the_prediction(capsys):
    assert plan_main(["--config", "gpu-bench", *ONE_B_128K, *AUTO, "--gpus", "1"]) == 0
    out = capsys.readouterr().out
    for text in ("AdamW moments (fp32)", "activations:", "predicted step", "tokens/s per device", "MFU",
                 "auto    memory: recompute="):
        assert text in out
    assert "recompute=none" not in out.split("auto")[1].split(":")[1]  # 128K without recompute does not fit


def test_auto_picks_a_cheap_recompute_over_full_where_it_fits():
    """The 1B at 128K on one H200: 'auto' is predicted >= 1.25x the tokens/s of full recompute + offload + tiles."""
    capacity = capacity_for_device("h200", ranks_per_host=1)
    cfg, why = resolve_auto(load_run_config("gpu-bench", ONE_B_128K + AUTO), 1, capacity)
    full = evaluate(load_run_config("gpu-bench", ONE_B_128K + [
        "memory.recompute=full", "memory.offload_activations=true", "memory.mlp_tiles=16", "memory.loss_tiles=32",
        "memory.fused_loss=false"]),
        1, capacity)
    chosen = evaluate(cfg, 1, capacity)
    assert chosen.fits and cfg.memory.recompute in ("around_core", "selective") and "fastest" in why
    assert chosen.time.tokens_per_s >= 1.25 * full.time.tokens_per_s
    smaller = dataclasses.replace(capacity, device_bytes=40 * GIB)  # less memory: heavier savers, still fitting
    tight, _ = resolve_auto(load_run_config("gpu-bench", ONE_B_128K + AUTO), 1, smaller)
    assert evaluate(tight, 1, smaller).fits and tight.memory != cfg.memory


def test_search_ranks_fitting_layouts_by_speed_and_marks_the_rest(capsys):
    cfg = load_run_config("gpu-bench", ["model=llama-3-8b", "train.seq_len=131072", "model.max_seq_len=131072",
                                        "train.global_batch_size=8"])
    rows = search(cfg, 32, capacity_for_device("h200"), top=200)
    fitting = [r for r in rows if r.fits]
    assert fitting and not all(r.fits for r in rows)
    speeds = [r.time.tokens_per_s for r in fitting]
    assert speeds == sorted(speeds, reverse=True) and rows[:len(fitting)] == fitting
    assert plan_main(["--config", "gpu-bench", "model=llama-3-8b", "train.seq_len=131072", "model.max_seq_len=131072",
                      "train.global_batch_size=8", "--gpus", "32", "--search", "--top", "5"]) == 0
    out = capsys.readouterr().out
    assert out.count("| yes |") + out.count("| NO |") == 5 and "longest sequence that fits" in out


@pytest.mark.parametrize("gpus", [8, 512])
def test_search_runs_in_seconds_for_any_gpu_count(gpus):
    import time

    cfg = load_run_config("gpu-bench", ["model=llama-3-70b", "train.seq_len=32768", "model.max_seq_len=32768",
                                        "train.global_batch_size=512"])
    tic = time.perf_counter()
    rows = search(cfg, gpus, capacity_for_device("h200"))
    assert rows and time.perf_counter() - tic < 20  # seconds (on the shared 2-core test machine)


def test_a_run_that_does_not_fit_is_refused_before_ranks_start(capsys):
    assert load_checked("megalysses-train", "quickstart", ["model=llama-3-8b"], data=False) is None
    err = capsys.readouterr().err
    assert "does not fit" in err and "AdamW moments (fp32)" in err and "GiB" in err and "nearest" in err or \
        "nothing tried fits" in err


def test_nearest_fit_names_savers_that_fit(capsys):
    capacity = Capacity(60 * GIB, None)
    cfg = load_run_config("gpu-bench", ONE_B_128K + ["memory.recompute=none", "memory.offload_activations=false",
                                                     "memory.mlp_tiles=1", "memory.loss_tiles=1",
                                                     "memory.fused_loss=false"])
    from megalysses.plan import check_fits
    from megalysses.config import ConfigError

    fits = r"(?s)does not fit.*activations.*nearest setting that fits: memory\.recompute="
    with pytest.raises(ConfigError, match=fits):
        check_fits(cfg, 1, capacity)


def test_quickstart_fits_and_dry_run_prints_the_plan(capsys):
    assert train_main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "cpu (host RAM" in out and "fits" in out and "predicted step" in out


def test_print_config_lists_every_key_with_its_docstring(capsys):
    assert train_main(["--print-config", "memory.recompute=auto"]) == 0
    out = capsys.readouterr().out
    assert "memory.recompute = 'auto'" in out and "Activation checkpointing" in out
    assert "train.lr = " in out and "Peak learning rate" in out and "[layout]" in out
    train_help = pytest.raises(SystemExit, train_main, ["--help"])
    assert train_help.value.code == 0 and "--print-config" in capsys.readouterr().out


def test_auto_memory_keys_load_and_unresolved_auto_is_refused_by_the_model():
    from megalysses.models.config import ModelConfigError
    from megalysses.models.gpt import GPT

    cfg = load_run_config("quickstart", AUTO)
    assert cfg.memory.auto_keys() == ("recompute", "offload_activations", "mlp_tiles", "loss_tiles", "fused_loss")
    with pytest.raises(ModelConfigError, match="unresolved"):
        GPT(cfg.model, memory=cfg.memory)
    assert load_run_config("quickstart", ["memory.mlp_tiles=4"]).memory.mlp_tiles == 4
    with pytest.raises(Exception, match="expected int or one of 'auto'"):
        load_run_config("quickstart", ["memory.mlp_tiles=many"])
    assert MemoryConfig(recompute="auto", offload_activations=True)  # the planner skips 'none' for it


def _trainer_memory(rank: int, world: int, cfg):
    from megalysses.trainer import Trainer

    return Trainer(cfg).cfg.memory


def test_the_trainer_resolves_auto_for_a_library_caller():
    from megalysses.parallel.launch import run_ranks

    cfg = load_run_config("quickstart", ["layout=single", "train.nproc=1", *AUTO])
    (memory,) = run_ranks(_trainer_memory, 1, cfg)
    assert not memory.auto_keys() and memory.recompute in ("none", "selective", "around_core", "full")


def test_bench_plan_script_runs_a_row_on_cpu():
    """scripts/bench_plan.py --tiny: the predicted and the measured columns of one row, from a fresh bench process."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_plan.py"
    out = subprocess.run([sys.executable, str(script), "--tiny", "--rows", "4"], capture_output=True, text=True,
                         timeout=240)
    assert out.returncode == 0, out.stderr
    row = out.stdout.strip().splitlines()[-1].split(" | ")
    assert row[1] == "1B around_core" and row[3] == "around_core/False/1/1" and float(row[8]) > 0, out.stdout
