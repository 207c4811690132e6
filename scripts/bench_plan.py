"""Predicted vs measured peak memory and step time: the planner (megalysses.plan) against megalysses-bench runs.

    python scripts/bench_plan.py                       # one GPU: the default rows, each in a fresh process (~6-8 min)
    python scripts/bench_plan.py --rows 1,2,3,4,5,6,11,12,13,14,15 && python scripts/bench_plan.py --rows 7,8,9,10
    python scripts/bench_plan.py --rows 1,7,8 --core flash
    python scripts/bench_plan.py --rows all            # adds the 1B at 256K (about two minutes more)
    python scripts/bench_plan.py --earlier             # no GPU: the 4 x H200 rows of BENCHMARKS.md, predicted
    python scripts/bench_plan.py --predict --rows all  # no GPU: the predicted columns of every row
    python scripts/bench_plan.py --tiny                # CPU check of the script: tiny model, gloo, no real numbers

Each row runs `torchrun --nproc-per-node 1 -m megalysses.bench --config gpu-bench <row>` in its own process (its
peak is torch.cuda.max_memory_allocated of that process, its step time the mean of the timed steps) and is
predicted with the planner at the bench's settings and the rates of --device. Prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from megalysses.config import load_run_config
from megalysses.plan import GIB, capacity_for_device, evaluate

ONE_B = ["model=llama-3.2-1b"]
EIGHT_B_16 = ["model=llama-3-8b", "model.num_layers=16"]
NONE = ["memory.recompute=none", "memory.offload_activations=false", "memory.mlp_tiles=1", "memory.loss_tiles=1",
        "memory.fused_loss=false"]


def savers(recompute="none", offload=False, mlp=1, loss=1, fused=False) -> list[str]:
    return [f"memory.recompute={recompute}", f"memory.offload_activations={str(offload).lower()}",
            f"memory.mlp_tiles={mlp}", f"memory.loss_tiles={loss}", f"memory.fused_loss={str(fused).lower()}"]


AUTO = savers("auto", "auto", "auto", "auto", "auto")
ROWS = [  # (name, model overrides, seq_len, saver overrides, timed steps); warm-up 1 step each
    ("1B none", ONE_B, 8192, savers(), 3),
    ("1B selective", ONE_B, 8192, savers("selective"), 3),
    ("1B none, loss tiles", ONE_B, 32768, savers(loss=8), 2),
    ("1B around_core", ONE_B, 32768, savers("around_core"), 2),
    ("1B full", ONE_B, 32768, savers("full"), 2),
    ("1B full + offload + tiles", ONE_B, 65536, savers("full", True, 4, 8), 1),
    ("1B around_core + loss tiles", ONE_B, 131072, savers("around_core", loss=8), 1),
    ("1B full + offload + tiles", ONE_B, 131072, savers("full", True, 16, 32), 1),
    ("1B auto", ONE_B, 131072, AUTO, 1),
    ("1B around_core + fused loss", ONE_B, 131072, savers("around_core", fused=True), 1),
    ("8B/16L none", EIGHT_B_16, 8192, savers(), 2),
    ("8B/16L none + fused loss", EIGHT_B_16, 8192, savers(fused=True), 2),
    ("8B/16L full", EIGHT_B_16, 8192, savers("full"), 2),
    ("8B/16L around_core + tiles", EIGHT_B_16, 16384, savers("around_core", False, 4, 8), 1),
    ("8B/16L full + offload + mlp tiles", EIGHT_B_16, 32768, savers("full", True, 4, 1), 1),
    ("1B full + offload + tiles (long)", ONE_B, 262144, savers("full", True, 16, 32), 1),
]
DEFAULT_ROWS = list(range(1, len(ROWS)))  # all but the 256K row (about two minutes of its own)

EARLIER = [  # BENCHMARKS.md, "Llama-3-8B on 4 x H200 with Ulysses sp4": (seq, overrides, batch, s/step, peak GiB)
    (32768, ["memory.loss_tiles=8"], 4, 4.767, 93.9),
    (131072, ["memory.recompute=around_core", "memory.mlp_tiles=4", "memory.loss_tiles=8"], 1, 10.191, 64.7),
    (262144, savers("full", True, 16, 32), 1, 40.763, 39.1),
    (524288, savers("full", True, 16, 32), 1, 166.392, 30.0),
]


def row_overrides(model, seq, memory, core: str, tiny: bool) -> list[str]:
    if tiny:
        return ["layout=single", "train.nproc=1", f"train.seq_len={seq // 256}", f"model.max_seq_len={seq // 256}",
                "train.global_batch_size=1", "train.micro_batch_size=1", *memory]
    return [*model, f"model.attention_core={core}", f"model.max_seq_len={max(seq, 8192)}", f"train.seq_len={seq}",
            "train.global_batch_size=1", *memory]


def predict(config: str, overrides: list[str], device: str, world: int = 1):
    """(peak GiB, s/step, the savers chosen) of the planner for a bench run."""
    from megalysses.plan import resolve_auto

    cfg = load_run_config(config, [*overrides, "train.init=device"])
    capacity = capacity_for_device(device, ranks_per_host=world)
    cfg, _ = resolve_auto(cfg, world, capacity)
    c = evaluate(cfg, world, capacity)
    m = cfg.memory
    chosen = f"{m.recompute}/{m.offload_activations}/{m.mlp_tiles}/{m.loss_tiles}" + ("/fused" if m.fused_loss else "")
    return c.memory_plan.device_total / GIB, c.time.seconds, chosen


def measure(config: str, overrides: list[str], steps: int, tiny: bool) -> dict:
    """One megalysses-bench row in a fresh process: its JSON row, or {'error': last stderr line}."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.jsonl"
        bench = ["-m", "megalysses.bench", "--config", config, *overrides, "--steps", str(steps), "--warmup", "1",
                 "--out", str(out), "--skip-memory-check"]
        cmd = [sys.executable, *bench] if tiny else [sys.executable, "-m", "torch.distributed.run",
                                                     "--nproc-per-node", "1", *bench]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        if proc.returncode or not out.exists():
            lines = [l for l in proc.stderr.splitlines() if l.strip()]
            return {"error": ("out of memory" if "out of memory" in proc.stderr.lower() else
                              (lines[-1] if lines else f"exit {proc.returncode}"))[:120]}
        return json.loads(out.read_text().splitlines()[-1])


def err(pred: float, meas) -> str:
    return f"{(pred - meas) / meas:+.1%}" if meas else "-"


def run_rows(indices: list[int], args) -> None:
    config = "quickstart" if args.tiny else "gpu-bench"
    print("| # | row | seq | savers (recompute/offload/mlp/loss[/fused]) | pred GiB | meas GiB | err | pred s/step | "
          "meas s/step | err | pred tok/s | meas tok/s | measured run's setup |\n|" + "---|" * 13, flush=True)
    for i in indices:
        name, model, seq, memory, steps = ROWS[i - 1]
        overrides = row_overrides(model, seq, memory, args.core, args.tiny)
        pred_gib, pred_s, chosen = predict(config, overrides, args.device)
        row = {} if args.predict else measure(config, overrides, 1 if args.tiny else steps, args.tiny)
        meas_gib, meas_s = row.get("peak GiB"), row.get("s/step")
        tokens = row.get("tok/step") or seq
        cells = [str(i), name, str(row.get("seq", seq)), chosen, f"{pred_gib:.1f}",
                 f"{meas_gib:.1f}" if meas_gib else row.get("error", "-"), err(pred_gib, meas_gib),
                 f"{pred_s:.3f}", f"{meas_s:.3f}" if meas_s else "-", err(pred_s, meas_s),
                 f"{tokens / pred_s:,.0f}", f"{row['tok/s']:,.0f}" if "tok/s" in row else "-", row.get("setup", "-")]
        print("| " + " | ".join(cells) + " |", flush=True)


def earlier_rows(args) -> None:
    """The 4 x H200 rows measured before (BENCHMARKS.md), with the planner's prediction at their settings."""
    print("| seq | savers | pred GiB | meas GiB | err | pred s/step | meas s/step | err |\n|" + "---|" * 8)
    for seq, memory, batch, meas_s, meas_gib in EARLIER:
        overrides = ["model=llama-3-8b", "layout=sp4", "layout.zero=3", "model.attention_core=flash",
                     f"model.max_seq_len={seq}", f"train.seq_len={seq}", f"train.global_batch_size={batch}",
                     *NONE, *memory]
        pred_gib, pred_s, chosen = predict("gpu-bench", overrides, args.device, world=4)
        print(f"| {seq:,} | {chosen} | {pred_gib:.1f} | {meas_gib:.1f} | {err(pred_gib, meas_gib)} | {pred_s:.2f} | "
              f"{meas_s:.2f} | {err(pred_s, meas_s)} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default=None, help="comma-separated row numbers (1-based), or 'all'")
    parser.add_argument("--core", default="sdpa", help="model.attention_core of the rows (flash needs flash-attn-4)")
    parser.add_argument("--device", default="h200", choices=("h200", "h100"), help="rates to predict with")
    parser.add_argument("--tiny", action="store_true", help="CPU check: the quick-start model, short sequences")
    parser.add_argument("--earlier", action="store_true", help="predict the earlier 4-GPU rows (no GPU needed)")
    parser.add_argument("--predict", action="store_true", help="only the predicted columns (no GPU needed)")
    args = parser.parse_args(argv)
    if args.earlier:
        earlier_rows(args)
        return 0
    if args.rows == "all":
        indices = list(range(1, len(ROWS) + 1))
    elif args.rows:
        indices = [int(r) for r in args.rows.split(",")]
    else:
        indices = [1, 2, 4] if args.tiny else DEFAULT_ROWS
    if any(not 1 <= i <= len(ROWS) for i in indices):
        parser.error(f"--rows {args.rows}: rows are 1..{len(ROWS)}")
    run_rows(indices, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
