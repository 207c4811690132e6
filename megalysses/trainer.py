"""Trainer: one rank's model, data-parallel optimizer and precision, built from a run config, and the training loop
read top to bottom: batch -> pipeline schedule -> loss -> grad sync -> clip -> step -> log -> eval -> checkpoint.

Every layout runs the same path: the model is this rank's chunks (one when pp = 1), and one step is one pipeline
schedule over the micro-batches (with pp = 1 under '1f1b': forward and backward alternate per micro-batch).

    trainer = Trainer(cfg)                                    # torch.distributed already initialised
    metrics = trainer.train_step(trainer.batcher.micro_batches(ids, labels, positions), step)
    records = train(cfg)                                      # a whole run on this rank: resume, loop, checkpoints
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from pathlib import Path

import torch
import torch.distributed as dist

from megalysses.models.build import build_model
from megalysses.models.gpt import init_on_device
from megalysses.models.pipeline import run_pipeline_step, tied_parameters
from megalysses.parallel import ParallelMesh
from megalysses.parallel import collectives as C
from megalysses.parallel.sequence import count_valid_tokens, pad_sequence_batch, shard_ring_sequence
from megalysses.plan.run import prepare_run

from .checkpoint import Checkpointer
from .config import ConfigError, RunConfig, save_resolved
from .data import StepData
from .metrics import Throughput
from .optim import build_data_parallel, lr_at
from .signals import StopRequest, stop_agreed, stop_on_signals
from .sinks import MetricsSinks

MicroBatches = list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # [(ids, positions, labels)], (micro, s/sp/ring)


class Batcher:
    """Cuts this dp rank's rows into micro-batches: padded to the sequence-shard unit, this ring rank's zig-zag shard
    (global positions travel with the tokens, so RoPE and the document masks stay right), this SP rank's chunk."""

    def __init__(self, cfg: RunConfig, mesh: ParallelMesh):
        t = cfg.train
        self.mesh, self.device, self.micro = mesh, mesh.device, t.micro_batch_size
        self.accum = t.global_batch_size // (t.micro_batch_size * mesh.size("dp"))
        self.unit = mesh.layout.sequence_unit

    def micro_batches(self, ids: torch.Tensor, labels: torch.Tensor, pos: torch.Tensor) -> MicroBatches:
        """(rows, s) -> [(ids, positions, labels)] each (micro, s_padded / (sp * ring)) on this rank's device."""
        ids, labels, pos = pad_sequence_batch(ids, labels, pos, self.unit)
        ring, sp = self.mesh.group("ring"), self.mesh.group("sp")
        return [tuple(shard_ring_sequence(t[m * self.micro:(m + 1) * self.micro], ring, sp).to(self.device)
                      for t in (ids, pos, labels)) for m in range(self.accum)]


class Precision:
    """Re-enterable compute context: bf16 autocast and, with the TE backend, an FP8 recipe (amax reduced over every
    rank of this pipeline stage). Every chunk's forward runs inside it, on every stage."""

    def __init__(self, cfg: RunConfig, mesh: ParallelMesh):
        self.device_type, self.bf16, self.fp8 = mesh.device.type, cfg.train.dtype == "bfloat16", cfg.train.fp8
        self.amax_group = mesh.stage_group().pg

    def __enter__(self):
        self.stack = contextlib.ExitStack()
        self.stack.enter_context(torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.bf16))
        if self.fp8 != "none":
            from megalysses.models import te

            self.stack.enter_context(te.fp8_context(self.fp8, self.amax_group))
        return self

    def __exit__(self, *exc):
        return self.stack.__exit__(*exc)


def build_initialised_model(cfg: RunConfig, mesh: ParallelMesh) -> torch.nn.ModuleList:
    """This rank's model chunks on its device, initialised from the seed (train.init: canonical full weights drawn
    on the CPU, layout-independent; or shards drawn on the device, where the layers are then also built)."""
    on_device = cfg.train.init == "device"
    with mesh.device if on_device else contextlib.nullcontext():
        chunks = build_model(cfg.model, mesh, cfg.memory)
    for chunk in chunks:
        chunk.to(mesh.device)
        if on_device:
            init_on_device(chunk, cfg.train.seed)
        else:
            chunk.init_weights(cfg.train.seed)
    return chunks


class Trainer:
    """One rank's training: mesh, model chunks, data-parallel optimizer, precision and micro-batching."""

    def __init__(self, cfg: RunConfig):
        if cfg.memory.auto_keys():  # a library caller's config ('auto' is resolved before the ranks start by the CLIs)
            cfg, why = prepare_run(cfg, dist.get_world_size(), check=False)
            logging.getLogger("megalysses").info("%s", why)
        self.cfg = cfg
        self.mesh = ParallelMesh(cfg.check(dist.get_world_size()), device_type=cfg.train.device)
        self.device = self.mesh.device
        torch.manual_seed(cfg.train.seed + dist.get_rank())
        self.chunks = build_initialised_model(cfg, self.mesh)
        self.dp = build_data_parallel(self.chunks, self.mesh, cfg.train,
                                      shard_modules=[b for c in self.chunks for b in c.blocks.values()])
        self.tied = tied_parameters(self.chunks)  # a tied embedding's copies on the first and last stage (pp > 1)
        self.precision = Precision(cfg, self.mesh)
        self.batcher = Batcher(cfg, self.mesh)

    def step_tokens(self, batches: MicroBatches) -> torch.Tensor:
        """Tokens with a target in this step's micro-batches, summed over dp x ring x sp: the loss's denominator."""
        return count_valid_tokens(torch.cat([labels for _, _, labels in batches]), self.mesh.data_group())

    def forward_backward(self, batches: MicroBatches) -> torch.Tensor:
        """Every micro-batch's forward and backward through the pipeline schedule; gradients summed over dp x ring x sp
        (starting during each chunk's last backward) and the tied embedding's copies over their two stages.
        Returns this rank's share of the step's mean loss."""
        loss_sum = run_pipeline_step(list(self.chunks), self.mesh.layout.schedule, batches, self.mesh,
                                     self.step_tokens(batches), self.precision, sync_tied=False,
                                     no_sync=self.dp.no_sync)
        self.dp.finish()
        if self.tied:
            self.dp.sum_gradients_over(self.tied, self.mesh.embedding_group())
        return loss_sum

    def train_step(self, batches: MicroBatches, step: int) -> dict:
        """One optimizer step: token-weighted loss over the micro-batches, grad sync, clip, AdamW (skipped when the
        loss or the gradient norm is not finite)."""
        loss_sum = self.forward_backward(batches)
        grad_norm = self.dp.clip_grad_norm(self.cfg.train.grad_clip)
        loss = C.all_reduce(loss_sum, self.mesh.data_group()).item()
        finite = math.isfinite(loss) and math.isfinite(grad_norm.item())
        lr = lr_at(step, self.cfg.train)
        if finite:
            self.dp.step(lr)
        self.dp.zero_grad()
        return {"loss": loss, "lr": lr, "grad_norm": grad_norm.item(), "finite": finite}

    @torch.no_grad()
    def evaluate(self, data: StepData) -> float:
        """Mean loss over train.eval_steps validation batches (token-weighted over the whole dp x ring x sp batch)."""
        losses = []
        for i in range(self.cfg.train.eval_steps):
            batches = self.batcher.micro_batches(*data.rows(i, split="val"))
            loss = run_pipeline_step(list(self.chunks), self.mesh.layout.schedule, batches, self.mesh,
                                     self.step_tokens(batches), self.precision, backward=False)
            losses.append(C.all_reduce(loss, self.mesh.data_group()).item())
        return sum(losses) / len(losses)

    def calibrate_fp8_scales(self, data: StepData, step: int) -> None:
        """FP8 delayed scaling begins every tensor at scale 1, where most of the first step's gradients (a mean loss
        over many tokens makes them tiny) fall below E5M2's smallest subnormal, 1.5e-5, and flush to zero: that step
        would train little beyond the layers outside FP8, and the FP8 run's curve leaves bf16's from there. One
        forward and backward of the step's batch, its gradients discarded, fills every amax history first, so the
        first real step runs on measured scales."""
        self.forward_backward(self.batcher.micro_batches(*data.rows(step)))
        self.dp.zero_grad()

    def fit(self, data: StepData, checkpoints: Checkpointer, log: MetricsSinks, stop: StopRequest,
            start: int) -> list[dict]:
        """The loop from step `start` to train.steps: batch -> step -> log -> eval -> checkpoint; a stop signal on
        any rank ends it after the step, with a checkpoint. Returns rank 0's log records."""
        cfg, rank = self.cfg, dist.get_rank()
        if cfg.train.fp8 == "delayed" and start < cfg.train.steps and not checkpoints.extra_restored:
            self.calibrate_fp8_scales(data, start)
        throughput = Throughput(cfg, dist.get_world_size(), self.device)
        throughput.last_step = start
        records, bad_steps = [], 0
        for step in range(start, cfg.train.steps):
            metrics = self.train_step(self.batcher.micro_batches(*data.rows(step)), step)
            bad_steps = 0 if metrics.pop("finite") else bad_steps + 1
            check_finite(bad_steps, step, cfg, rank)
            done = step + 1
            if cfg.train.eval_every and done % cfg.train.eval_every == 0:
                metrics["val_loss"] = self.evaluate(data)
            if done % cfg.logging.interval == 0 or done == cfg.train.steps or "val_loss" in metrics:
                metrics.update(throughput.since_last(done))
                records.append({"step": done, **metrics})
                log.log(done, metrics)
            saved = checkpoints.after_step(done)  # every checkpoint.every steps and after the last
            if done < cfg.train.steps and stop_agreed(stop, self.device):  # a signal on any rank: all stop here
                saved = saved or checkpoints.save(done)
                if rank == 0:
                    print(f"megalysses: stopped after step {done} ({stop.signal_name or 'signal on another rank'}); "
                          f"checkpoint {saved}; rerun the same command to resume", flush=True)
                break
        return records


def with_seq_len(cfg: RunConfig, seq_len: int) -> RunConfig:
    """The run config at another sequence length."""
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seq_len=seq_len))


def check_machine(cfg: RunConfig) -> None:
    """Before any rank starts: what the run needs of this machine (a CUDA device for cuda / TE / FP8 / flash, a
    run directory that can be one); raises ConfigError naming the key, its value and the fix."""
    m, t = cfg.model, cfg.train
    needs_cuda = [(k, v) for k, v, on in (("train.device", t.device, t.device == "cuda"),
                                          ("train.fp8", t.fp8, t.fp8 != "none"),
                                          ("model.backend", m.backend, m.backend == "te"),
                                          ("model.attention_core", m.attention_core,
                                           m.attention_core in ("flash", "te"))) if on]
    if needs_cuda and not torch.cuda.is_available():
        key, value = needs_cuda[0]
        raise ConfigError(f"{key} = {value!r} needs a CUDA GPU and none is visible; run on a GPU machine, or use "
                          "train.device=cpu, train.fp8=none, model.backend=torch, model.attention_core=sdpa")
    run_dir = Path(cfg.logging.run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"logging.run_dir = {str(run_dir)!r} is a file, not a folder: choose another "
                          "logging.run_dir")


def check_finite(bad_steps: int, step: int, cfg: RunConfig, rank: int) -> None:
    """Warn about a skipped non-finite step; stop after train.max_bad_steps of them in a row."""
    if bad_steps == 0:
        return
    if rank == 0:
        print(f"warning: step {step + 1}: non-finite loss or gradient norm; step skipped", flush=True)
    if bad_steps >= cfg.train.max_bad_steps:
        raise FloatingPointError(f"{bad_steps} non-finite steps in a row, the last at step {step + 1}; "
                                 "lower train.lr or check the data")


def train(cfg: RunConfig) -> list[dict]:
    """A whole run on this rank (torch.distributed already initialised): build, resume, loop, checkpoints, metric
    sinks; returns rank 0's log records."""
    rank, world = dist.get_rank(), dist.get_world_size()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="megalysses: %(message)s")
    trainer = Trainer(cfg)
    cfg = trainer.cfg  # memory 'auto' resolved
    data = StepData(cfg, trainer.mesh)
    checkpoints = Checkpointer(cfg, trainer.mesh, trainer.chunks, trainer.dp, loaders=data.loaders)
    if rank == 0:
        save_resolved(cfg, cfg.logging.run_dir)
        print(f"megalysses: {cfg.model.num_params() / 1e6:.2f}M params, layout {trainer.mesh.layout.describe()} on "
              f"{world} {trainer.device.type} ranks, {trainer.batcher.accum} micro-batches of {trainer.batcher.micro} "
              f"x {cfg.train.seq_len} per dp rank; run dir {cfg.logging.run_dir}", flush=True)
    start = checkpoints.resume()  # model, optimizer, RNG, data position; 0 when starting afresh
    if start >= cfg.train.steps and rank == 0:
        print(f"megalysses: the checkpoint is at step {start} of train.steps = {cfg.train.steps}: nothing to train "
              "(raise train.steps, or set checkpoint.resume=never or another logging.run_dir to start afresh)",
              flush=True)
    # the sinks close on the way out (a crash marks the W&B run failed); signal handlers are restored
    with MetricsSinks(cfg, rank, start_step=start) as log, stop_on_signals() as stop:
        return trainer.fit(data, checkpoints, log, stop, start)
