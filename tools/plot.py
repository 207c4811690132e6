"""megalysses-plot: a run directory's metrics.jsonl -> PNG charts of loss, throughput and memory.

    megalysses-plot runs/quickstart                  # writes runs/quickstart/plots/{loss,throughput,memory}.png
    megalysses-plot runs/quickstart --out charts/

loss.png: training and validation loss; throughput.png: tokens/s, TFLOP/s per device and MFU (when logged, as on
GPUs); memory.png: peak GPU memory (skipped with a note when the run logged none, as CPU runs do). A step logged
twice (a resumed run repeats the steps after its last checkpoint) is drawn once, from its latest record. Needs
matplotlib (`pip install "megalysses[plot]"`); renders through Agg, so no display is needed.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

INSTALL = 'pip install "megalysses[plot]"'


class PlotError(ValueError):
    """The run directory cannot be charted; the message names the file and what is wrong."""


def read_metrics(run_dir: Path | str) -> list[dict]:
    """The records of <run_dir>/metrics.jsonl by step, the latest record of a repeated step winning; a truncated
    last line (a run killed mid-write) is dropped."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise PlotError(f"{path}: no such file; pass a run directory (the run's logging.run_dir)")
    lines = path.read_text().splitlines()
    by_step: dict[int, dict] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if number == len(lines):
                break
            raise PlotError(f"{path}:{number}: not a JSON object: {e}") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise PlotError(f"{path}:{number}: expected a JSON object with an integer 'step'")
        by_step[record["step"]] = record
    if not by_step:
        raise PlotError(f"{path}: no records yet")
    return [by_step[s] for s in sorted(by_step)]


def series(records: list[dict], key: str, scale: float = 1.0) -> tuple[list[int], list[float]]:
    """(steps, values) of the records that logged key as a number."""
    pairs = [(r["step"], r[key] * scale) for r in records
             if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]
    return [p[0] for p in pairs], [p[1] for p in pairs]


CHARTS = {
    "loss": [("Loss", [("loss", "train", 1.0), ("val_loss", "validation", 1.0)])],
    "throughput": [("Tokens/s", [("tokens_per_s", "tokens/s", 1.0)]),
                   ("TFLOP/s per device", [("tflops_per_device", "TFLOP/s per device", 1.0)]),
                   ("MFU (%)", [("mfu", "MFU", 100.0)])],
    "memory": [("Peak memory (GiB)", [("peak_mem_gib", "peak allocated", 1.0)])],
}
"""Chart name -> panels, each (y label, [(metric, legend label, scale)]); panels without data are left out."""


def _matplotlib():
    """matplotlib's Figure, Agg canvas and integer tick locator, or a PlotError naming the install command."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise PlotError(f"megalysses-plot needs matplotlib, which is not installed: {INSTALL}") from None
    return Figure, FigureCanvasAgg, MaxNLocator


def draw(records: list[dict], panels: list, title: str, out: Path) -> bool:
    """One PNG with a panel per metric group that has data; False (nothing written) when none has."""
    filled = [(ylabel, [(series(records, key, scale), label) for key, label, scale in lines])
              for ylabel, lines in panels]
    filled = [(ylabel, [(xy, label) for xy, label in lines if xy[0]]) for ylabel, lines in filled]
    filled = [(ylabel, lines) for ylabel, lines in filled if lines]
    if not filled:
        return False
    Figure, FigureCanvasAgg, MaxNLocator = _matplotlib()
    fig = Figure(figsize=(8, 3 * len(filled)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(filled), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (ylabel, lines) in zip(axes, filled):
        for (steps, values), label in lines:
            ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=label)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if len(lines) > 1:
            ax.legend()
    axes[0].set_title(title)
    axes[-1].set_xlabel("step")
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.savefig(out, dpi=100)
    return True


def plot_run(run_dir: Path | str, out_dir: Optional[Path | str] = None) -> tuple[list[Path], list[str]]:
    """Write the charts of a run; returns (written PNG paths, notes about charts skipped for lack of data)."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    _matplotlib()  # fail before creating anything
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    written, notes = [], []
    for name, panels in CHARTS.items():
        out = out_dir / f"{name}.png"
        if draw(records, panels, f"{run_dir.resolve().name}: {name}", out):
            written.append(out)
        else:
            keys = ", ".join(key for _, lines in panels for key, _, _ in lines)
            notes.append(f"{name}.png skipped: no {keys} values in metrics.jsonl")
    return written, notes


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="megalysses-plot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a run directory (holds metrics.jsonl)")
    parser.add_argument("--out", default=None, help="folder for the PNGs (default: RUN_DIR/plots)")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        written, notes = plot_run(args.run_dir, args.out)
    except (PlotError, OSError) as err:
        print(f"megalysses-plot: error: {err}", file=sys.stderr)
        return 2
    for note in notes:
        print(f"megalysses-plot: {note}")
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
