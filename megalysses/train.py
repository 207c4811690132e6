"""megalysses-train: build mesh, model, optimizer and data from a run config, then run the training loop.

    megalysses-train                                  # CPU quick-start: tiny model, 4 gloo ranks (tp2 x sp2)
    megalysses-train --config run.yaml train.lr=1e-4 layout=sp4
    torchrun --nproc-per-node 4 -m megalysses.train --config run.yaml   # GPUs (NCCL) or CPU (gloo)
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import logging
import math
import os
import sys
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist

from megalysses.models.gpt import GPT, init_on_device
from megalysses.models.pipeline import build_stage_chunks, run_pipeline_step, tied_parameters
from megalysses.parallel import ParallelMesh
from megalysses.parallel import collectives as C
from megalysses.parallel.launch import run_ranks
from megalysses.parallel.sequence import count_valid_tokens, pad_sequence_batch, shard_sequence, token_weighted_loss

from .checkpoint import Checkpointer
from .config import CONFIG_DIR, ConfigError, RunConfig, load_run_config, save_resolved
from .data import PackedCorpus, build_dataset
from .metrics import Throughput
from .optim import build_data_parallel, lr_at
from .signals import stop_agreed, stop_on_signals
from .sinks import MetricsSinks, require_sinks

QUICKSTART = CONFIG_DIR / "runs" / "quickstart.yaml"


class StepData:
    """This dp rank's rows for each step, (ids, labels, positions) each (global_batch / dp, seq_len): random windows
    of a text (quick start) or packed documents of a preprocessed dataset (with resetting positions)."""

    def __init__(self, cfg: RunConfig, mesh: ParallelMesh):
        t = cfg.train
        self.data, self.mesh = build_dataset(cfg.data), mesh
        self.global_batch, self.seq_len = t.global_batch_size, t.seq_len
        if isinstance(self.data, PackedCorpus):
            dp = dict(dp_rank=mesh.rank("dp"), dp_size=mesh.size("dp"))
            self.loaders = {split: self.data.loader(split, t.seq_len, t.global_batch_size, **dp)
                            for split in ("train", "val") if len(self.data.splits[split])}

    def rows(self, step: int, split: str = "train") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if isinstance(self.data, PackedCorpus):
            if split not in self.loaders:
                raise ValueError(f"no {split} documents: set data.val_fraction > 0 or train.eval_every=0")
            b = self.loaders[split].batch_at(step * self.global_batch)
            return b.input_ids, b.labels, b.position_ids
        ids, labels = self.data.batch(step, self.global_batch, self.seq_len, split=split)
        dp = self.mesh.group("dp")
        ids, labels = ids.chunk(dp.size)[dp.rank], labels.chunk(dp.size)[dp.rank]
        return ids, labels, torch.arange(self.seq_len).expand_as(ids)


class Batcher:
    """Cuts this dp rank's rows into micro-batches: padded to the sequence-shard unit, this SP rank's chunk."""

    def __init__(self, cfg: RunConfig, mesh: ParallelMesh, device: torch.device):
        t = cfg.train
        self.mesh, self.device, self.micro = mesh, device, t.micro_batch_size
        self.accum = t.global_batch_size // (t.micro_batch_size * mesh.size("dp"))
        self.unit = mesh.size("sp") * (mesh.size("tp") if mesh.layout.tp_sequence_parallel else 1)

    def micro_batches(self, ids: torch.Tensor, labels: torch.Tensor, pos: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
        """(rows, s) -> [(ids, positions, labels)] each (micro, s_padded / sp) on this rank's device."""
        ids, labels, pos = pad_sequence_batch(ids, labels, pos, self.unit)
        sp = self.mesh.group("sp")
        return [tuple(shard_sequence(t[m * self.micro:(m + 1) * self.micro], sp).to(self.device)
                      for t in (ids, pos, labels)) for m in range(self.accum)]


class Precision:
    """Re-enterable compute context: bf16 autocast and, with the TE backend, an FP8 recipe (amax reduced over every
    rank of this pipeline stage)."""

    def __init__(self, cfg: RunConfig, mesh: ParallelMesh, device: torch.device):
        self.device_type, self.bf16, self.fp8 = device.type, cfg.train.dtype == "bfloat16", cfg.train.fp8
        self.amax_group = mesh.group("dp", "sp", "tp").pg

    def __enter__(self):
        self.stack = contextlib.ExitStack()
        self.stack.enter_context(torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.bf16))
        if self.fp8 != "none":
            from megalysses.models.te import fp8_context

            self.stack.enter_context(fp8_context(self.fp8, self.amax_group))
        return self

    def __exit__(self, *exc):
        return self.stack.__exit__(*exc)


def build_model(cfg: RunConfig, mesh: ParallelMesh, device: torch.device) -> torch.nn.ModuleList:
    """This rank's model chunks (one, or one per virtual pipeline stage), on the device, initialised from the seed
    (train.init: canonical full weights from the CPU, or shards drawn on the device, where they are also built)."""
    on_device = cfg.train.init == "device"
    with torch.device(device) if on_device else contextlib.nullcontext():
        if mesh.size("pp") > 1:
            chunks = build_stage_chunks(cfg.model, mesh, memory=cfg.memory)
        else:
            chunks = [GPT(cfg.model, mesh, memory=cfg.memory)]
    for chunk in chunks:
        chunk.to(device)
        if on_device:
            init_on_device(chunk, cfg.train.seed)
        else:
            chunk.init_weights(cfg.train.seed)
    return torch.nn.ModuleList(chunks)


def step_tokens(batches, mesh: ParallelMesh) -> torch.Tensor:
    """Tokens with a target in this step's micro-batches, summed over dp x sp: the loss's denominator."""
    return count_valid_tokens(torch.cat([labels for _, _, labels in batches]), mesh.group("dp", "sp"))


def forward_backward(chunks, sync, batches, mesh: ParallelMesh, total: torch.Tensor, precision) -> torch.Tensor:
    """Every micro-batch's forward and backward (through the pipeline schedule when pp > 1); gradients synced over
    dp x sp (overlapped with the last backward) and tied embeddings summed over their two stages."""
    if mesh.size("pp") > 1:
        with sync.no_sync():  # the schedule interleaves micro-batches: reduce once, after the last
            loss_sum = run_pipeline_step(list(chunks), mesh.layout.schedule, batches, mesh, total, precision,
                                         sync_tied=False)
        sync.finish()
        tied = tied_parameters(list(chunks))
        if tied:
            sync.all_reduce_main_grads(tied, mesh.embedding_group())
        return loss_sum
    loss_sum = torch.zeros((), device=total.device)
    for i, (ids, pos, labels) in enumerate(batches):
        with sync.no_sync() if i < len(batches) - 1 else contextlib.nullcontext():
            with precision:
                per_token = chunks[0](ids, pos, labels)
            loss = token_weighted_loss(per_token.float(), labels, total)
            loss.backward()
        loss_sum += loss.detach()
    sync.finish()
    return loss_sum


def train_step(chunks, sync, optimizer, batches, mesh: ParallelMesh, cfg: RunConfig, step: int, precision) -> dict:
    """One optimizer step: token-weighted loss over the micro-batches, grad sync, clip, AdamW (skipped when the loss
    or the gradient norm is not finite)."""
    total = step_tokens(batches, mesh)
    loss_sum = forward_backward(chunks, sync, batches, mesh, total, precision)
    grad_norm = sync.clip_grad_norm(cfg.train.grad_clip)
    loss_value = C.all_reduce(loss_sum, mesh.group("dp", "sp")).item()
    finite = math.isfinite(loss_value) and math.isfinite(grad_norm.item())
    lr = lr_at(step, cfg.train)
    if finite:
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
    optimizer.zero_grad()
    return {"loss": loss_value, "lr": lr, "grad_norm": grad_norm.item(), "finite": finite}


@torch.no_grad()
def evaluate(chunks, data: StepData, batcher: Batcher, mesh: ParallelMesh, cfg: RunConfig, precision) -> float:
    """Mean loss over cfg.train.eval_steps validation batches (token-weighted over the whole dp x sp batch)."""
    losses = []
    for i in range(cfg.train.eval_steps):
        batches = batcher.micro_batches(*data.rows(i, split="val"))
        total = step_tokens(batches, mesh)
        if mesh.size("pp") > 1:
            loss = run_pipeline_step(list(chunks), mesh.layout.schedule, batches, mesh, total, precision,
                                     backward=False)
        else:
            loss = torch.zeros((), device=total.device)
            for ids, pos, labels in batches:
                with precision:
                    loss += token_weighted_loss(chunks[0](ids, pos, labels).float(), labels, total)
        losses.append(C.all_reduce(loss, mesh.group("dp", "sp")).item())
    return sum(losses) / len(losses)


@dataclasses.dataclass
class Run:
    """Everything one rank's training loop works with."""

    cfg: RunConfig
    mesh: ParallelMesh
    device: torch.device
    chunks: torch.nn.ModuleList
    sync: object
    optimizer: object
    data: StepData
    batcher: Batcher
    precision: Precision
    checkpoints: Checkpointer


def rank_device(cfg: RunConfig) -> torch.device:
    """This rank's device: its current GPU under train.device = cuda, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if cfg.train.device == "cuda" else torch.device("cpu")


def build_model_and_optimizer(cfg: RunConfig, device: torch.device):
    """(mesh, model chunks, gradient sync, optimizer) for this rank, seeded per rank."""
    mesh = ParallelMesh(cfg.check(dist.get_world_size()), device_type=device.type)
    torch.manual_seed(cfg.train.seed + dist.get_rank())
    chunks = build_model(cfg, mesh, device)
    sync, optimizer = build_data_parallel(chunks, mesh, cfg.train,
                                          shard_modules=[b for c in chunks for b in c.blocks.values()])
    return mesh, chunks, sync, optimizer


def build_run(cfg: RunConfig) -> Run:
    """Mesh, model, gradient sync + optimizer, data and checkpointing for this rank."""
    device = rank_device(cfg)
    mesh, chunks, sync, optimizer = build_model_and_optimizer(cfg, device)
    data = StepData(cfg, mesh)
    checkpoints = Checkpointer(cfg, mesh, chunks, sync, optimizer, loaders=getattr(data, "loaders", {}))
    return Run(cfg, mesh, device, chunks, sync, optimizer, data, Batcher(cfg, mesh, device),
               Precision(cfg, mesh, device), checkpoints)


def train(cfg: RunConfig) -> list[dict]:
    """Run the whole loop on this rank (torch.distributed already initialised); returns rank 0's log records."""
    rank, world = dist.get_rank(), dist.get_world_size()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="megalysses: %(message)s")
    run = build_run(cfg)
    if rank == 0:
        save_resolved(cfg, cfg.logging.run_dir)
        print(f"megalysses: {cfg.model.num_params() / 1e6:.2f}M params, layout {run.mesh.layout.describe()} on "
              f"{world} {run.device.type} ranks, {run.batcher.accum} micro-batches of {run.batcher.micro} x "
              f"{cfg.train.seq_len} per dp rank; run dir {cfg.logging.run_dir}", flush=True)
    start = run.checkpoints.resume()  # model, optimizer, RNG, data position; 0 when starting afresh
    if start >= cfg.train.steps and rank == 0:
        print(f"megalysses: the checkpoint is at step {start} of train.steps = {cfg.train.steps}: nothing to train "
              "(raise train.steps, or set checkpoint.resume=never or another logging.run_dir to start afresh)",
              flush=True)
    # the sinks close on the way out (a crash marks the W&B run failed); signal handlers are restored
    with MetricsSinks(cfg, rank, start_step=start) as log, stop_on_signals() as stop:
        return training_loop(run, start, log, stop)


def calibrate_fp8_scales(run: Run, step: int) -> None:
    """FP8 delayed scaling begins every tensor at scale 1, where most of the first step's gradients (a mean loss over
    many tokens makes them tiny) fall below E5M2's smallest subnormal, 1.5e-5, and flush to zero: that step would
    train little beyond the layers outside FP8, and the FP8 run's curve leaves bf16's from there. One forward and backward of the step's batch, its gradients
    discarded, fills every amax history first, so the first real step runs on measured scales."""
    batches = run.batcher.micro_batches(*run.data.rows(step))
    forward_backward(run.chunks, run.sync, batches, run.mesh, step_tokens(batches, run.mesh), run.precision)
    run.optimizer.zero_grad()


def training_loop(run: Run, start: int, log: MetricsSinks, stop) -> list[dict]:
    """batch -> schedule -> loss -> grad sync -> clip -> step -> log -> eval -> checkpoint, from step `start`."""
    cfg, rank = run.cfg, dist.get_rank()
    if cfg.train.fp8 == "delayed" and start < cfg.train.steps and not run.checkpoints.extra_restored:
        calibrate_fp8_scales(run, start)
    throughput = Throughput(cfg, dist.get_world_size(), run.device)
    throughput.last_step = start
    records, bad_steps = [], 0
    for step in range(start, cfg.train.steps):
        batches = run.batcher.micro_batches(*run.data.rows(step))
        metrics = train_step(run.chunks, run.sync, run.optimizer, batches, run.mesh, cfg, step, run.precision)
        bad_steps = 0 if metrics.pop("finite") else bad_steps + 1
        check_finite(bad_steps, step, cfg, rank)
        done = step + 1
        if cfg.train.eval_every and done % cfg.train.eval_every == 0:
            metrics["val_loss"] = evaluate(run.chunks, run.data, run.batcher, run.mesh, cfg, run.precision)
        if done % cfg.logging.interval == 0 or done == cfg.train.steps or "val_loss" in metrics:
            metrics.update(throughput.since_last(done))
            records.append({"step": done, **metrics})
            log.log(done, metrics)
        saved = run.checkpoints.after_step(done)  # every checkpoint.every steps and after the last
        if done < cfg.train.steps and stop_agreed(stop, run.device):  # SIGTERM/SIGINT on any rank: all stop here
            saved = saved or run.checkpoints.save(done)
            if rank == 0:
                print(f"megalysses: stopped after step {done} ({stop.signal_name or 'signal on another rank'}); "
                      f"checkpoint {saved}; rerun the same command to resume", flush=True)
            break
    return records


def check_finite(bad_steps: int, step: int, cfg: RunConfig, rank: int) -> None:
    """Warn about a skipped non-finite step; stop after train.max_bad_steps of them in a row."""
    if bad_steps == 0:
        return
    if rank == 0:
        print(f"warning: step {step + 1}: non-finite loss or gradient norm; step skipped", flush=True)
    if bad_steps >= cfg.train.max_bad_steps:
        raise FloatingPointError(f"{bad_steps} non-finite steps in a row, the last at step {step + 1}; "
                                 "lower train.lr or check the data")


def _rank_entry(rank: int, world: int, cfg: RunConfig) -> list[dict]:
    return train(cfg)


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="megalysses-train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(QUICKSTART), help="run YAML (default: the bundled CPU quick-start)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-4 layout=sp4")
    return parser.parse_args(argv)


def under_torchrun() -> bool:
    """Whether torchrun (or another launcher) started this process as one rank of a job."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def launch(prog: str, module: str, cfg: RunConfig, run: Callable, rank_entry: Callable, *args) -> int:
    """run(cfg, *args) on every rank: under torchrun in this process (NCCL on CUDA, gloo on CPU); otherwise on
    train.nproc self-spawned gloo CPU ranks through rank_entry(rank, world, cfg, *args) (module-level, picklable)."""
    if under_torchrun():
        backend = "nccl" if cfg.train.device == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
        try:
            run(cfg, *args)
        finally:
            dist.destroy_process_group()
        return 0
    if cfg.train.device == "cuda":
        print(f"{prog}: device cuda needs one process per GPU: start it with "
              f"torchrun --nproc-per-node N -m {module} ...", file=sys.stderr)
        return 2
    run_ranks(rank_entry, cfg.train.nproc, cfg, *args, timeout=7 * 24 * 3600.0)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_run_config(args.config, args.overrides)
        cfg.check(int(os.environ["WORLD_SIZE"]) if under_torchrun() else cfg.train.nproc)
        require_sinks(cfg.logging)  # a missing wandb / tensorboard package stops here, before any rank starts
    except (ConfigError, FileNotFoundError) as err:  # config mistakes stop here, before any heavy work
        print(f"megalysses-train: config error: {err}", file=sys.stderr)
        return 2
    return launch("megalysses-train", "megalysses.train", cfg, train, _rank_entry)


if __name__ == "__main__":
    sys.exit(main())
