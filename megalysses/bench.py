"""megalysses-bench: time whole training steps of a model + layout at one or more sequence lengths on the devices
present, and print one table row per length (BENCHMARKS.md holds measured rows with their commands).

    torchrun --nproc-per-node 4 -m megalysses.bench --config gpu-bench model=llama-3-8b layout=sp4 \\
        --seq-lens 32768,131072
    megalysses-bench                # CPU check of the command: tiny model on 4 gloo ranks (tp2 x sp2), no real speed

Per length: `--warmup` untimed optimizer steps, then `--steps` timed ones (forward, backward, gradient sync, clip,
AdamW; the trainer's own train_step) on random tokens, with the batch and micro-batches of train.*. Weights are drawn
on the device (train.init=device) unless the config or an override says otherwise. Columns, per device (FLOPs are
counted as megalysses/metrics.py says):
  tok/s      tokens per second per device
  TFLOP/s    model TFLOP/s per device; MFU = TFLOP/s / 989 (dense bf16 peak of H100/H200), MFU/ceil = TFLOP/s / the
             bf16 matmul rate measured on this GPU at start-up (8192^3)
  HW TFLOP/s counting the forwards that the memory savers recompute
  peak GiB   most memory allocated on any rank since the length's first step
  host GiB   most host memory any rank's process has held (peak resident set: offloaded optimizer state and
             activations, pinned buffers, the Python process itself)
  a2a / coll / p2p   exposed communication, as a share of step time, mean over ranks: the Ulysses all-to-alls,
             the other collectives (gradient reduce / all-gather, loss reduce), pipeline p2p waits (incl. bubble).
             FSDP2 (zero 3) runs its own collectives inside torch: those show in --profile, not here.
A length that runs out of memory ends the run after the rows before it (rank 0 says which length).
`--profile DIR` adds one profiled step per length: rank 0's Chrome trace, its top kernels, and device time by kind
(megalysses/profiling.py's kinds; scripts/profile_step.py breaks one step down further).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from megalysses.parallel import collectives as C
from megalysses.parallel import ParallelMesh

from megalysses.parallel.launch import add_debug_flag, apply_debug_flag, launch

from .config import RunConfig
from .profiling import kernel_kind
from .metrics import flops_per_token, hardware_flops_per_token, matmul_tflops, mfu
from .train import QUICKSTART, load_checked
from .trainer import Trainer, with_seq_len

COLUMNS = ("setup", "layout", "dev", "seq", "tok/step", "s/step", "tok/s", "TFLOP/s", "MFU", "MFU/ceil",
           "HW TFLOP/s", "peak GiB", "host GiB", "a2a", "coll", "p2p")


def describe_setup(cfg: RunConfig) -> str:
    """Model geometry, layer backend, attention core and precision in a few words."""
    m = cfg.model
    precision = f"fp8-{cfg.train.fp8}" if cfg.train.fp8 != "none" else ("bf16" if cfg.train.dtype == "bfloat16" else "fp32")
    savers = [f"recompute={cfg.memory.recompute}"] if cfg.memory.recompute != "none" else []
    savers += ([f"offload<{cfg.memory.offload_layers}" if cfg.memory.offload_layers else "offload"]
               if cfg.memory.offload_activations else [])
    savers += ["optimizer-offload"] if cfg.train.offload_optimizer else []
    savers += [f"{k}={getattr(cfg.memory, k)}" for k in ("mlp_tiles", "loss_tiles") if getattr(cfg.memory, k) > 1]
    savers += ["fused_loss"] if cfg.memory.fused_loss else []
    size = f"{m.num_params() / 1e9:.2f}B" if m.num_params() >= 1e8 else f"{m.num_params() / 1e6:.1f}M"
    return " ".join([f"{size}/{m.num_layers}L", m.backend, m.attention_core, precision] + savers)


def random_rows(cfg: RunConfig, mesh: ParallelMesh, seq_len: int, seed: int):
    """This dp rank's (ids, labels, positions), each (global_batch / dp, seq_len): uniform random tokens."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.model.vocab_size, (cfg.train.global_batch_size, seq_len + 1), generator=gen)
    mine = tokens.chunk(mesh.size("dp"))[mesh.rank("dp")]
    return mine[:, :-1], mine[:, 1:], torch.arange(seq_len).expand(mine.shape[0], seq_len)


def peak_host_gib() -> float:
    """This process's peak resident set size (Linux reports ru_maxrss in KiB), GiB."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class Bench:
    """One rank's Trainer, built once and timed at each sequence length."""

    def __init__(self, cfg: RunConfig):
        self.cfg, self.world = cfg, dist.get_world_size()
        self.trainer = Trainer(cfg)
        self.mesh, self.device = self.trainer.mesh, self.trainer.device
        device = self.device
        self.everyone = C.CommGroup(None, tuple(range(self.world)), dist.get_rank())  # the default group
        self.ceiling = matmul_tflops(device) if device.type == "cuda" else None

    def sync_device(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def steps(self, batches, n: int) -> list[dict]:
        return [self.trainer.train_step(batches, i) for i in range(n)]

    def measure(self, seq_len: int, steps: int, warmup: int, profile: Optional[Path] = None) -> dict:
        """Warm up, time `steps` training steps at this length; the row as a dict (identical on every rank)."""
        cfg = with_seq_len(self.cfg, seq_len)
        cfg.check(self.world)
        batches = self.trainer.batcher.micro_batches(*random_rows(cfg, self.mesh, seq_len, seq_len))
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.steps(batches, warmup)
        self.sync_device()
        C.barrier(self.everyone)
        self.mesh.clock.start()
        tic = time.perf_counter()
        losses = [m["loss"] for m in self.steps(batches, steps)]
        self.sync_device()
        elapsed = time.perf_counter() - tic
        comm = self.mesh.clock.stop()
        # mean exposed communication and slowest wall time over the ranks; largest peak memory
        peak = torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else 0.0
        stats = torch.tensor([comm[k] for k in C.CommClock.KINDS] + [elapsed, peak, peak_host_gib()],
                             dtype=torch.float64, device=self.device)
        shares = C.all_reduce(stats[:3].clone(), self.everyone) / self.world
        slowest = C.all_reduce(stats[3:].clone(), self.everyone, op="max")
        elapsed, peak, host = slowest.tolist()
        row = self.row(cfg, seq_len, elapsed / steps, {k: s / steps for k, s in zip(C.CommClock.KINDS, shares.tolist())},
                       peak, losses[-1])
        row["host GiB"] = host
        if profile is not None:
            row["profile"] = self.profile(batches, cfg, profile, elapsed / steps)
        return row

    def row(self, cfg: RunConfig, seq_len: int, step_s: float, comm_s: dict, peak_gib: float, loss: float) -> dict:
        tokens = cfg.train.global_batch_size * seq_len
        tflops = flops_per_token(cfg.model, seq_len) * tokens / step_s / self.world / 1e12
        hw = hardware_flops_per_token(cfg.model, cfg.memory, seq_len) * tokens / step_s / self.world / 1e12
        return {"setup": describe_setup(cfg), "layout": self.mesh.layout.describe(), "dev": self.world,
                "device": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu",
                "seq": seq_len, "tok/step": tokens, "s/step": step_s, "tok/s": tokens / step_s / self.world,
                "TFLOP/s": tflops, "MFU": mfu(tflops, self.device.type),
                "MFU/ceil": tflops / self.ceiling if self.ceiling else None, "ceiling TFLOP/s": self.ceiling,
                "HW TFLOP/s": hw, "peak GiB": peak_gib if self.device.type == "cuda" else None,
                **{key: comm_s[kind] / step_s for key, kind in zip(("a2a", "coll", "p2p"), C.CommClock.KINDS)},
                "loss": loss}

    def profile(self, batches, cfg: RunConfig, folder: Path, step_s: float) -> dict:
        """One more step under torch.profiler (rank 0 records); rank 0 writes the trace and returns device time by
        kind as shares of the timed step."""
        from torch.profiler import ProfilerActivity, profile

        if dist.get_rank() != 0:
            self.steps(batches, 1)
            return {}
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            self.steps(batches, 1)
            self.sync_device()
        folder.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(folder / f"trace-seq{cfg.train.seq_len}-rank0.json.gz"))
        sort = "self_cuda_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=sort, row_limit=15, max_name_column_width=70), flush=True)
        return kernel_time_by_kind(prof.key_averages(), step_s) if self.device.type == "cuda" else {}


def kernel_time_by_kind(events, step_s: float) -> dict:
    """Self device time of the profiled kernels summed by kind, as shares of the step time."""
    totals: dict[str, float] = {}
    for e in events:
        us = getattr(e, "self_device_time_total", None)
        if us is None:
            us = getattr(e, "self_cuda_time_total", 0.0)
        if us > 0 and getattr(e, "device_type", None) is not None and str(e.device_type).endswith("CUDA"):
            kind = kernel_kind(e.key)
            totals[kind] = totals.get(kind, 0.0) + us / 1e6
    return {kind: round(s / step_s, 4) for kind, s in sorted(totals.items())}


def table_header() -> str:
    return "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS)


def table_row(row: dict) -> str:
    cells = []
    for col in COLUMNS:
        v = row.get(col)
        if col in ("MFU", "MFU/ceil", "a2a", "coll", "p2p") and v is not None:
            cells.append(f"{v:.1%}")
        elif col in ("tok/s", "TFLOP/s", "HW TFLOP/s") and v is not None:
            cells.append(f"{v:,.0f}" if v >= 100 else f"{v:.3g}")
        elif col == "s/step":
            cells.append(f"{v:.3f}")
        elif v is None:
            cells.append("-")
        elif col in ("peak GiB", "host GiB"):
            cells.append(f"{v:.1f}")
        else:
            cells.append(str(v))
    return "| " + " | ".join(cells) + " |"


def run_bench(cfg: RunConfig, args: argparse.Namespace) -> list[dict]:
    """Every requested length on this rank, printing rows (rank 0) as they finish; returns the rows."""
    rank = dist.get_rank()
    bench = Bench(cfg)
    device = bench.device
    if rank == 0:
        ceiling = f"{bench.ceiling:.0f} TFLOP/s measured bf16 matmul" if bench.ceiling else "no matmul ceiling on CPU"
        print(f"megalysses-bench: {bench.world} x {device.type} "
              f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), {ceiling}; "
              f"{args.warmup} warm-up + {args.steps} timed steps per length\n{table_header()}", flush=True)
    rows = []
    for seq_len in args.seq_lens or [cfg.train.seq_len]:
        try:
            row = bench.measure(seq_len, args.steps, args.warmup, args.profile)
        except torch.OutOfMemoryError:
            print(f"megalysses-bench: rank {rank} ran out of device memory at seq {seq_len}", file=sys.stderr,
                  flush=True)
            raise
        rows.append(row)
        if rank == 0:
            print(table_row(row), flush=True)
            if "profile" in row:
                print(f"  device time by kind (share of the step): {row['profile']}", flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")
    return rows


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="megalysses-bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(QUICKSTART), help="run YAML (default: the bundled CPU quick-start)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model=llama-3-8b layout=sp4")
    parser.add_argument("--seq-lens", type=lambda s: [int(x) for x in s.split(",")], default=None,
                        help="comma-separated sequence lengths, in order (default: train.seq_len)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per length")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    parser.add_argument("--out", default=None, help="append each row as a JSON line to this file")
    parser.add_argument("--profile", type=Path, default=None, help="folder for one profiled step per length")
    parser.add_argument("--skip-memory-check", action="store_true",
                        help="run even where the planner predicts the run does not fit (to measure it)")
    add_debug_flag(parser)
    args = parser.parse_intermixed_args(argv)  # overrides may follow the options
    apply_debug_flag(args)
    if args.steps < 1 or args.warmup < 0:
        parser.error(f"--steps {args.steps} / --warmup {args.warmup}: need steps >= 1 and warmup >= 0")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    cfg = load_checked("megalysses-bench", args.config, ["train.init=device", *args.overrides], data=False,
                       seq_lens=args.seq_lens or (), check_memory=not args.skip_memory_check)
    if cfg is None:
        return 2
    return launch(run_bench, cfg, args, nproc=cfg.train.nproc, device_type=cfg.train.device, command="megalysses.bench")


if __name__ == "__main__":
    sys.exit(main())
