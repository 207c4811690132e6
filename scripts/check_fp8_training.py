"""FP8 training through the trainer follows bf16: loss curves of the GPU smoke model with TE layers, side by side.

    python3 scripts/check_fp8_training.py [--steps 300] [--window 50] [--runs NAME,...] [--out DIR]

Each run is `megalysses-train --config gpu-smoke` under torchrun with the overrides below; runs are packed onto the
visible GPUs (several one-GPU runs at once). Printed: mean loss per window of steps for every run, then each run's
largest relative window gap to its reference (the bf16 TE run of the same layout and micro-batching).
Two controls say how far apart two bf16 runs drift by themselves: the torch backend (the same weights and data;
only kernel rounding differs) and another initialisation seed.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

import torch

from megalysses.tools.plot import read_metrics

# name -> (GPUs, reference run, trainer overrides)
RUNS: dict[str, tuple[int, str, list[str]]] = {
    "te-bf16": (1, "te-bf16", ["model.backend=te"]),
    "torch-bf16": (1, "te-bf16", ["model.backend=torch"]),
    "te-bf16-seed": (1, "te-bf16", ["model.backend=te", "train.seed=4321"]),
    "fp8-delayed": (1, "te-bf16", ["model.backend=te", "train.fp8=delayed"]),
    "fp8-current": (1, "te-bf16", ["model.backend=te", "train.fp8=current"]),
    "te-bf16-1mb": (1, "te-bf16-1mb", ["model.backend=te", "train.micro_batch_size=8"]),
    "fp8-delayed-1mb": (1, "te-bf16-1mb", ["model.backend=te", "train.fp8=delayed", "train.micro_batch_size=8"]),
    "te-fp32": (1, "te-fp32", ["model.backend=te", "train.dtype=float32"]),
    "fp8-delayed-fp32": (1, "te-fp32", ["model.backend=te", "train.dtype=float32", "train.fp8=delayed"]),
    "te-bf16-tp2": (2, "te-bf16-tp2", ["model.backend=te", "layout=tp2"]),
    "fp8-delayed-tp2": (2, "te-bf16-tp2", ["model.backend=te", "layout=tp2", "train.fp8=delayed"]),
}
COMMON = ["--config", "gpu-smoke", "train.eval_every=0", "logging.interval=1", "checkpoint.keep_last=1"]


def command(name: str, steps: int, out: pathlib.Path) -> list[str]:
    nproc, _, overrides = RUNS[name]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "megalysses.train", *COMMON, f"train.nproc={nproc}", f"train.steps={steps}",
            f"logging.run_dir={out / name}", *overrides]


def run_all(names: list[str], steps: int, out: pathlib.Path, gpus: int) -> dict[str, float]:
    """Start each run when enough GPUs are free; wait for all. Returns wall seconds per run."""
    free, pending, running, seconds = list(range(gpus)), list(names), [], {}
    while pending or running:
        for name in list(pending):
            need = RUNS[name][0]
            if need > gpus:
                raise SystemExit(f"run {name!r} needs {need} GPUs, {gpus} visible")
            if need <= len(free):
                mine, free = free[:need], free[need:]
                env = dict(os.environ, CUDA_VISIBLE_DEVICES=",".join(map(str, mine)))
                log = open(out / f"{name}.log", "w")
                proc = subprocess.Popen(command(name, steps, out), env=env, stdout=log, stderr=subprocess.STDOUT)
                running.append((name, proc, mine, time.time()))
                pending.remove(name)
        time.sleep(1)
        for item in list(running):
            name, proc, mine, start = item
            if proc.poll() is not None:
                running.remove(item)
                free += mine
                seconds[name] = time.time() - start
                if proc.returncode != 0:
                    lines = (out / f"{name}.log").read_text().splitlines()
                    errors = [ln for ln in lines if "Error" in ln or "error:" in ln][:20]
                    print(f"run {name} failed (exit {proc.returncode}); from {out / name}.log:", *errors, sep="\n  ")
    return seconds


def losses(out: pathlib.Path, name: str) -> list[float]:
    """The run's training loss per step (logged every step); none when the run failed before logging."""
    if not (out / name / "metrics.jsonl").exists():
        return []
    return [r["loss"] for r in read_metrics(out / name)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--window", type=int, default=50)
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated, from: {', '.join(RUNS)}")
    parser.add_argument("--out", default="runs/check-fp8")
    args = parser.parse_args()
    names = [n for n in args.runs.split(",") if n]
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        raise SystemExit(f"--runs: unknown {unknown}; choose from {list(RUNS)}")
    names += [RUNS[n][1] for n in names if RUNS[n][1] not in names]  # every reference runs too
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seconds = run_all(names, args.steps, out, torch.cuda.device_count())

    curves = {n: losses(out, n) for n in names}
    (out / "curves.json").write_text(json.dumps(curves))
    windows = [(a, min(a + args.window, args.steps)) for a in range(0, args.steps, args.window)]
    mean = {n: [sum(c[a:b]) / (b - a) if len(c) >= b else float("nan") for a, b in windows] for n, c in curves.items()}
    print(f"\n## Mean loss per {args.window} steps (gpu-smoke, {args.steps} steps)\n")
    print("| run | " + " | ".join(f"{a + 1}-{b}" for a, b in windows) + " | wall s |")
    print("|---|" + "---:|" * (len(windows) + 1))
    for n in names:
        print(f"| {n} | " + " | ".join(f"{m:.4f}" for m in mean[n]) + f" | {seconds.get(n, float('nan')):.0f} |")
    print("\n## Largest relative window gap to the reference run (after the first window)\n")
    print("| run | reference | abs | rel | window |")
    print("|---|---|---:|---:|---|")
    for n in names:
        ref = RUNS[n][1]
        if ref == n:
            continue
        gaps = [(abs(x - r) / r, abs(x - r), w) for x, r, w in zip(mean[n][1:], mean[ref][1:], windows[1:])]
        rel, gap, (a, b) = max(gaps) if gaps else (float("nan"), float("nan"), (0, 0))
        print(f"| {n} | {ref} | {gap:.4f} | {rel:.1%} | {a + 1}-{b} |")


if __name__ == "__main__":
    main()
