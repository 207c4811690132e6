"""scripts/bench_peer_hf.py --tiny on the CPU: one run prints the megalysses row, the HF transformers row and the ratio."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_peer_hf.py"


def test_tiny_run_prints_both_rows_and_the_ratio():
    out = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--steps", "1", "--warmup", "1"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = {m.group(1): m for m in re.finditer(r"^\| (megalysses|HF) \| ([^|]+) \| ([\d.]+) \| ([\d,]+) \| - \| "
                                                r"([\d.]+) \|$", out.stdout, re.M)}
    assert set(rows) == {"megalysses", "HF"}, out.stdout
    assert rows["HF"].group(2).strip() == "transformers sdpa fp32"
    assert rows["megalysses"].group(2).startswith("0.1M/2L torch sdpa fp32")
    ours, theirs = (float(rows[k].group(4).replace(",", "")) for k in ("megalysses", "HF"))
    ratio = float(re.search(r"ratio megalysses / HF: ([\d.]+)x", out.stdout).group(1))
    assert ratio == pytest.approx(ours / theirs, rel=2e-2)
    assert re.search(r"not kept by HF \(GiB, from [\d,]+ parameters\)", out.stdout)


def test_liger_is_refused_on_the_cpu_check():
    out = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--liger"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2 and "drop --liger" in out.stderr
