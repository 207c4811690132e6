"""megalysses-plot: a run directory's metrics.jsonl becomes loss, throughput and memory PNGs."""
import json
import struct
import subprocess
import sys

import pytest

from megalysses.tools import plot
from megalysses.tools.plot import PlotError, main, plot_run, read_metrics

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_metrics(run_dir, records, tail=""):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    return run_dir


def gpu_like_run(run_dir, steps=20):
    records = [{"step": s, "time": 0.5 * s, "loss": 5.5 / s ** 0.3, "lr": 1e-3, "grad_norm": 1.0,
                "tokens_per_s": 9e4 + 100 * s, "tflops_per_device": 400.0 + s, "mfu": 0.4,
                "peak_mem_gib": 60.0 + 0.1 * s} for s in range(1, steps + 1)]
    for r in records[9::10]:
        r["val_loss"] = r["loss"] + 0.1
    return write_metrics(run_dir, records)


def png_size(path):
    """(width, height) from a PNG's IHDR chunk; fails unless the file starts like a PNG."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR", path
    return struct.unpack(">II", data[16:24])


def test_charts_of_a_gpu_run(tmp_path):
    pytest.importorskip("matplotlib")
    run_dir = gpu_like_run(tmp_path / "run")
    written, notes = plot_run(run_dir)
    assert [p.name for p in written] == ["loss.png", "throughput.png", "memory.png"] and notes == []
    for path in written:
        assert path.parent == run_dir / "plots" and path.stat().st_size > 5000
        width, height = png_size(path)
        assert width == 800 and height >= 300
    assert png_size(run_dir / "plots" / "throughput.png")[1] == 900  # tokens/s, TFLOP/s, MFU panels


def test_cpu_run_skips_memory_with_a_note(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    run_dir = write_metrics(tmp_path / "run", [
        {"step": s, "loss": 5.0 - s, "tokens_per_s": 1000.0, "tflops_per_device": 0.01, "mfu": None,
         "peak_mem_gib": None} for s in (1, 2, 3)])
    assert main([str(run_dir), "--out", str(tmp_path / "charts")]) == 0
    out = capsys.readouterr().out
    assert "memory.png skipped: no peak_mem_gib values" in out
    assert sorted(p.name for p in (tmp_path / "charts").iterdir()) == ["loss.png", "throughput.png"]
    assert png_size(tmp_path / "charts" / "throughput.png")[1] == 600  # no MFU panel on CPU


def test_repeated_steps_keep_the_latest_and_a_torn_last_line_is_dropped(tmp_path):
    run_dir = write_metrics(tmp_path / "run", [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.9},
                                               {"step": 2, "loss": 2.5}, {"step": 3, "loss": 2.0}],
                            tail='{"step": 4, "lo')
    assert [(r["step"], r["loss"]) for r in read_metrics(run_dir)] == [(1, 3.0), (2, 2.5), (3, 2.0)]


def test_clear_errors(tmp_path, capsys, monkeypatch):
    assert main([str(tmp_path)]) == 2
    assert "metrics.jsonl: no such file; pass a run directory" in capsys.readouterr().err
    write_metrics(tmp_path / "bad", [{"step": 1}], tail='not json\n{"step": 3}\n')
    with pytest.raises(PlotError, match=r"metrics.jsonl:2: not a JSON object"):
        read_metrics(tmp_path / "bad")
    write_metrics(tmp_path / "nostep", [{"loss": 1.0}])
    with pytest.raises(PlotError, match=r"metrics.jsonl:1: expected a JSON object with an integer 'step'"):
        read_metrics(tmp_path / "nostep")
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # as if matplotlib were not installed
    assert main([str(gpu_like_run(tmp_path / "run"))]) == 2
    assert 'needs matplotlib, which is not installed: pip install "megalysses[plot]"' in capsys.readouterr().err
    assert not (tmp_path / "run" / "plots").exists()


def test_console_script_is_installed(tmp_path):
    pytest.importorskip("matplotlib")
    run_dir = gpu_like_run(tmp_path / "run", steps=3)
    out = subprocess.run(["megalysses-plot", str(run_dir)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(run_dir / "plots" / f"{n}.png") for n in plot.CHARTS]
