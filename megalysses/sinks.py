"""Metric sinks: metrics.jsonl, the live progress line, Weights & Biases and TensorBoard, fanned out from rank 0.

    sinks = MetricsSinks(cfg, rank)                  # every rank: a missing package fails all ranks alike
    sinks.log(step, {"loss": 2.1, "lr": 3e-4, ...})  # rank 0 writes; the other ranks do nothing
    sinks.close()                                    # or `with MetricsSinks(cfg, rank) as sinks:`

wandb and TensorBoard are optional packages, imported only when the config asks for them.
"""
from __future__ import annotations

import importlib.util
import json
import math
import netrc
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Mapping, Optional, Protocol, TextIO
from urllib.parse import urlparse

from .config import ConfigError, LoggingConfig, RunConfig, to_dict

PACKAGES = {"wandb": ("wandb", 'pip install "megalysses[wandb]"'),
            "tensorboard": ("tensorboard", "pip install tensorboard")}
"""Optional sink -> (the module it needs, the command that installs it)."""
WANDB_HOST = "api.wandb.ai"


class SinkUnavailable(ConfigError):
    """logging asks for a sink whose package is not installed; the message names the install command."""


class Sink(Protocol):
    """Anything that takes one logged step at a time."""

    def log(self, step: int, metrics: Mapping) -> None: ...

    def close(self, failed: bool = False) -> None: ...


def require_sinks(logging: LoggingConfig) -> None:
    """Raise SinkUnavailable when logging.wandb / logging.tensorboard is on and its package is missing (no import)."""
    for key, (module, install) in PACKAGES.items():
        if getattr(logging, key) and importlib.util.find_spec(module) is None:
            raise SinkUnavailable(f"logging.{key} = true needs the {module} package, which is not installed: "
                                  f"{install} (or set logging.{key}=false)")


def scalars(metrics: Mapping) -> dict[str, float]:
    """The metrics that are real numbers, as floats (None, bools and text dropped): what charting sinks take."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def format_duration(seconds: float) -> str:
    """Seconds as '45s', '12m05s' or '3h07m'."""
    if not math.isfinite(seconds):
        return "?"
    s = max(int(round(seconds)), 0)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


# ------------------------------------------------------------------------------------------ run directory


def repair_torn_tail(path: Path) -> int:
    """Cut a last record torn by a kill mid-write (bytes after the last newline) off path, keep them in
    <path>.torn, warn once; returns how many bytes were cut (0: the file ends with a whole line, or is absent)."""
    if not path.is_file() or path.stat().st_size == 0:
        return 0
    with path.open("rb+") as f:
        data = f.read()
        if data.endswith(b"\n"):
            return 0
        keep = data.rfind(b"\n") + 1  # 0 when not even the first line is whole
        side = path.with_name(path.name + ".torn")
        with side.open("ab") as torn:
            torn.write(data[keep:] + b"\n")
        f.truncate(keep)
    print(f"warning: {path}: the last record was cut off mid-write ({len(data) - keep} bytes, kept in {side}); "
          "truncated to the last complete line before appending", file=sys.stderr, flush=True)
    return len(data) - keep


class JsonlSink:
    """One JSON object per logged step appended to <run_dir>/metrics.jsonl: step, seconds since start, metrics. A
    record torn by a kill mid-write is cut off first (repair_torn_tail), so the next one starts on its own line."""

    def __init__(self, run_dir: Path | str):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        repair_torn_tail(self.path)
        self.file, self.start = self.path.open("a"), time.monotonic()

    def log(self, step: int, metrics: Mapping) -> None:
        record = {"step": step, "time": round(time.monotonic() - self.start, 3), **metrics}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self, failed: bool = False) -> None:
        self.file.close()


PROGRESS_FIELDS = (("loss", "loss {:.4f}"), ("val_loss", "val {:.4f}"), ("lr", "lr {:.2e}"),
                   ("grad_norm", "gnorm {:.3f}"), ("tokens_per_s", "{:,.0f} tok/s"),
                   ("tflops_per_device", "{:.3g} TFLOP/s/dev"), ("mfu", "MFU {:.1%}"),
                   ("peak_mem_gib", "mem {:.2f} GiB"))
"""Progress-line fields in order, each shown when the step's metrics have it."""


class ProgressLine:
    """The live progress line: step, loss, lr, grad norm, tokens/s, TFLOP/s and MFU per device, peak memory, ETA."""

    def __init__(self, total_steps: int, start_step: int = 0, stream: Optional[TextIO] = None):
        self.total_steps, self.start_step, self.stream = total_steps, start_step, stream
        self.start = time.monotonic()

    def line(self, step: int, metrics: Mapping) -> str:
        """The text for one step; the ETA extrapolates the mean time per step since this process started."""
        done = step - self.start_step
        eta = (time.monotonic() - self.start) / done * (self.total_steps - step) if done > 0 else math.inf
        parts = [f"step {step:>{len(str(self.total_steps))}}/{self.total_steps}"]
        parts += [fmt.format(metrics[key]) for key, fmt in PROGRESS_FIELDS if metrics.get(key) is not None]
        return " | ".join(parts + [f"ETA {format_duration(eta)}"])

    def log(self, step: int, metrics: Mapping) -> None:
        print(self.line(step, metrics), file=self.stream or sys.stdout, flush=True)

    def close(self, failed: bool = False) -> None:
        pass


# ------------------------------------------------------------------------------------------ Weights & Biases


def wandb_key_configured(env: Mapping[str, str] = os.environ, netrc_path: Optional[Path | str] = None) -> bool:
    """Whether a W&B API key is set: WANDB_API_KEY, or a ~/.netrc (or $NETRC) entry for the W&B host."""
    if env.get("WANDB_API_KEY"):
        return True
    host = urlparse(env.get("WANDB_BASE_URL") or f"https://{WANDB_HOST}").hostname or WANDB_HOST
    path = Path(netrc_path or env.get("NETRC") or Path.home() / ".netrc")
    try:
        entry = netrc.netrc(str(path)).authenticators(host) if path.is_file() else None
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(entry and entry[2])


def wandb_mode(requested: str, env: Mapping[str, str] = os.environ,
               netrc_path: Optional[Path | str] = None) -> tuple[str, Optional[str]]:
    """logging.wandb_mode -> (wandb.init mode, a note to print or None): 'auto' is online only with an API key."""
    if requested in ("offline", "online"):
        return requested, None
    if requested != "auto":
        raise ConfigError(f"logging.wandb_mode = {requested!r}: choose one of 'offline', 'online', 'auto'")
    if wandb_key_configured(env, netrc_path):
        return "online", None
    return "offline", ("wandb: no API key configured (WANDB_API_KEY or `wandb login`), logging offline; "
                       "upload later with `wandb sync <run_dir>/wandb/offline-run-*`")


def wandb_run_id(run_dir: Path) -> str:
    """The W&B run id kept in <run_dir>/wandb.id, created on first use, so a resumed run continues the same run."""
    path = run_dir / "wandb.id"
    if path.is_file() and path.read_text().strip():
        return path.read_text().strip()
    run_id = secrets.token_hex(4)
    path.write_text(run_id + "\n")
    return run_id


class WandbSink:
    """A W&B run in <run_dir>/wandb: the resolved config at start, the numeric metrics of every logged step."""

    def __init__(self, cfg: RunConfig, stream: Optional[TextIO] = None):
        import wandb  # optional: require_sinks has checked it is installed

        run_dir = Path(cfg.logging.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        mode, note = wandb_mode(cfg.logging.wandb_mode)
        if note:
            print(note, file=stream or sys.stdout, flush=True)
        self.run = wandb.init(project=cfg.logging.wandb_project, dir=str(run_dir), config=to_dict(cfg), mode=mode,
                              name=run_dir.resolve().name, id=wandb_run_id(run_dir), resume="allow")

    def log(self, step: int, metrics: Mapping) -> None:
        self.run.log(scalars(metrics), step=step)

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


# ------------------------------------------------------------------------------------------ TensorBoard


class TensorBoardSink:
    """TensorBoard event files in <run_dir>/tensorboard: one scalar per numeric metric per logged step."""

    def __init__(self, run_dir: Path | str):
        from torch.utils.tensorboard import SummaryWriter  # needs the optional tensorboard package

        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))

    def log(self, step: int, metrics: Mapping) -> None:
        for key, value in scalars(metrics).items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self, failed: bool = False) -> None:
        self.writer.close()


# ------------------------------------------------------------------------------------------ fan-out


def build_sinks(cfg: RunConfig, start_step: int = 0, stream: Optional[TextIO] = None) -> list[Sink]:
    """The sinks logging asks for: metrics.jsonl and the progress line always, then wandb and TensorBoard."""
    run_dir = Path(cfg.logging.run_dir)
    makers = [lambda: JsonlSink(run_dir), lambda: ProgressLine(cfg.train.steps, start_step, stream)]
    if cfg.logging.wandb:
        makers.append(lambda: WandbSink(cfg, stream))
    if cfg.logging.tensorboard:
        makers.append(lambda: TensorBoardSink(run_dir))
    sinks: list[Sink] = []
    try:
        for make in makers:
            sinks.append(make())
    except BaseException:
        close_all(sinks, failed=True)
        raise
    return sinks


def close_all(sinks: list[Sink], failed: bool = False) -> None:
    """Close every sink (last opened first) even if one raises; re-raise the first error."""
    error = None
    for sink in reversed(sinks):
        try:
            sink.close(failed=failed)
        except Exception as e:  # noqa: BLE001 - the others must still be closed
            error = error or e
    if error is not None:
        raise error


class MetricsSinks:
    """Fans each logged step out to every configured sink on rank 0; the other ranks write nothing."""

    def __init__(self, cfg: RunConfig, rank: int, start_step: int = 0, stream: Optional[TextIO] = None):
        require_sinks(cfg.logging)  # on every rank, so a missing package stops all ranks alike
        self.sinks: list[Sink] = build_sinks(cfg, start_step, stream) if rank == 0 else []
        self.closed = False

    def log(self, step: int, metrics: Mapping) -> None:
        """Send one step's metrics (plain numbers or None) to every sink."""
        for sink in self.sinks:
            sink.log(step, metrics)

    def close(self, failed: bool = False) -> None:
        """Flush and close every sink once; failed=True marks the W&B run as crashed."""
        if not self.closed:
            self.closed = True
            close_all(self.sinks, failed)

    def __enter__(self) -> "MetricsSinks":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.close(failed=exc_type is not None)
        except Exception as e:  # noqa: BLE001 - never hide the error that ended training behind a logging one
            if exc_type is None:
                raise
            print(f"megalysses: closing the metric sinks also failed: {e!r}", file=sys.stderr, flush=True)
