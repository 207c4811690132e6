"""megalysses-train: build mesh, model, optimizer and data from a run config, then run the training loop.

    megalysses-train                                  # CPU quick-start: tiny model, 4 gloo ranks (tp2 x sp2)
    megalysses-train --config run.yaml train.lr=1e-4 layout=sp4
    torchrun --nproc-per-node 4 -m megalysses.train --config run.yaml   # GPUs (NCCL) or CPU (gloo)
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from megalysses.models.gpt import GPT
from megalysses.parallel import ParallelMesh
from megalysses.parallel import collectives as C
from megalysses.parallel.data import all_reduce_gradients, clip_gradients
from megalysses.parallel.launch import run_ranks
from megalysses.parallel.sequence import count_valid_tokens, pad_sequence_batch, shard_sequence, token_weighted_loss

from .config import CONFIG_DIR, ConfigError, RunConfig, load_run_config, save_resolved
from .data import TokenWindows
from .metrics import PEAK_TFLOPS, MetricsLog, flops_per_token
from .optim import build_optimizer, lr_at

QUICKSTART = CONFIG_DIR / "runs" / "quickstart.yaml"


class Batcher:
    """Cuts the step's global batch into this rank's micro-batches: rows by dp, sequence chunk by sp."""

    def __init__(self, cfg: RunConfig, mesh: ParallelMesh, device: torch.device):
        t = cfg.train
        self.mesh, self.device, self.seq_len = mesh, device, t.seq_len
        self.global_batch, self.micro = t.global_batch_size, t.micro_batch_size
        self.accum = t.global_batch_size // (t.micro_batch_size * mesh.size("dp"))
        self.unit = mesh.size("sp") * (mesh.size("tp") if mesh.layout.sequence_parallel else 1)

    def micro_batches(self, ids: torch.Tensor, labels: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
        """(global_batch, s) -> [(ids, positions, labels)] each (micro, s_padded / sp) on this rank's device."""
        dp, sp = self.mesh.group("dp"), self.mesh.group("sp")
        ids, labels = ids.chunk(dp.size)[dp.rank], labels.chunk(dp.size)[dp.rank]
        ids, labels, pos = pad_sequence_batch(ids, labels, None, self.unit)
        out = []
        for m in range(self.accum):
            rows = slice(m * self.micro, (m + 1) * self.micro)
            out.append(tuple(shard_sequence(t[rows], sp).to(self.device) for t in (ids, pos, labels)))
        return out


def train_step(model, optimizer, batches, mesh: ParallelMesh, cfg: RunConfig, step: int, autocast) -> dict:
    """One optimizer step over the micro-batches: token-weighted loss, grad sync, clip, AdamW."""
    total = count_valid_tokens(torch.cat([b[2] for b in batches]), mesh.group("dp", "sp"))
    loss_sum = torch.zeros((), device=total.device)
    for ids, pos, labels in batches:
        with autocast:
            per_token = model(ids, pos, labels)
        loss = token_weighted_loss(per_token.float(), labels, total)
        loss.backward()
        loss_sum += loss.detach()
    all_reduce_gradients(model.parameters(), mesh)
    grad_norm = clip_gradients(list(model.parameters()), cfg.train.grad_clip, mesh)
    loss_value = C.all_reduce(loss_sum, mesh.group("dp", "sp")).item()
    finite = math.isfinite(loss_value) and math.isfinite(grad_norm.item())
    lr = lr_at(step, cfg.train)
    if finite:
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"loss": loss_value, "lr": lr, "grad_norm": grad_norm.item(), "finite": finite}


@torch.no_grad()
def evaluate(model, data: TokenWindows, batcher: Batcher, mesh: ParallelMesh, cfg: RunConfig, autocast) -> float:
    """Mean loss over cfg.train.eval_steps validation batches (token-weighted over the whole dp x sp batch)."""
    losses = []
    for i in range(cfg.train.eval_steps):
        batches = batcher.micro_batches(*data.batch(i, batcher.global_batch, batcher.seq_len, split="val"))
        total = count_valid_tokens(torch.cat([b[2] for b in batches]), mesh.group("dp", "sp"))
        loss = torch.zeros((), device=total.device)
        for ids, pos, labels in batches:
            with autocast:
                loss += token_weighted_loss(model(ids, pos, labels).float(), labels, total)
        losses.append(C.all_reduce(loss, mesh.group("dp", "sp")).item())
    return sum(losses) / len(losses)


def train(cfg: RunConfig) -> list[dict]:
    """Run the whole loop on this rank (torch.distributed already initialised); returns rank 0's log records."""
    world, rank = dist.get_world_size(), dist.get_rank()
    layout = cfg.check(world)
    if layout.pp > 1:
        raise ConfigError(f"layout.pp = {layout.pp}: pipeline parallelism is not available in this version; use pp=1")
    device = torch.device("cuda", torch.cuda.current_device()) if cfg.train.device == "cuda" else torch.device("cpu")
    mesh = ParallelMesh(layout, device_type=device.type)
    torch.manual_seed(cfg.train.seed + rank)
    model = GPT(cfg.model, mesh).to(device)
    model.init_weights(cfg.train.seed)
    optimizer = build_optimizer(model, cfg.train)
    data = TokenWindows.from_config(cfg.data)
    batcher = Batcher(cfg, mesh, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.train.dtype == "bfloat16")
    run_dir = Path(cfg.logging.run_dir)
    if rank == 0:
        save_resolved(cfg, run_dir)
        print(f"megalysses: {cfg.model.num_params() / 1e6:.2f}M params, layout {layout.describe()} on {world} "
              f"{device.type} ranks, {batcher.accum} micro-batches of {batcher.micro} x {cfg.train.seq_len} per dp rank; "
              f"run dir {run_dir}", flush=True)
    log = MetricsLog(run_dir, enabled=rank == 0, total_steps=cfg.train.steps)
    tokens_per_step = cfg.train.global_batch_size * cfg.train.seq_len
    flops_step = flops_per_token(cfg.model, cfg.train.seq_len) * tokens_per_step
    records, bad_steps, tic = [], 0, time.monotonic()
    for step in range(cfg.train.steps):
        metrics = train_step(model, optimizer, batcher.micro_batches(*data.batch(step, batcher.global_batch,
                                                                                  batcher.seq_len)),
                             mesh, cfg, step, autocast)
        bad_steps = 0 if metrics["finite"] else bad_steps + 1
        if not metrics["finite"]:
            if rank == 0:
                print(f"warning: step {step + 1}: non-finite loss or gradient norm; step skipped", flush=True)
            if bad_steps >= cfg.train.max_bad_steps:
                raise FloatingPointError(f"{bad_steps} non-finite steps in a row, the last at step {step + 1}; "
                                         "lower train.lr or check the data")
        done = step + 1
        if cfg.train.eval_every and done % cfg.train.eval_every == 0:
            metrics["val_loss"] = evaluate(model, data, batcher, mesh, cfg, autocast)
        if done % cfg.logging.interval == 0 or done == cfg.train.steps or "val_loss" in metrics:
            if device.type == "cuda":
                torch.cuda.synchronize()
            elapsed, tic = time.monotonic() - tic, time.monotonic()
            steps_done = done - (records[-1]["step"] if records else 0)
            tflops = flops_step * steps_done / elapsed / world / 1e12
            peak = PEAK_TFLOPS[device.type]
            metrics.update(tokens_per_s=tokens_per_step * steps_done / elapsed, tflops_per_device=tflops,
                           mfu=tflops / peak if peak else None,
                           peak_mem_gib=torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None)
            metrics.pop("finite")
            records.append({"step": done, **metrics})
            log.log(done, metrics)
    log.close()
    return records


def _rank_entry(rank: int, world: int, cfg: RunConfig) -> list[dict]:
    return train(cfg)


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="megalysses-train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(QUICKSTART), help="run YAML (default: the bundled CPU quick-start)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-4 layout=sp4")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_run_config(args.config, args.overrides)
        under_torchrun = "WORLD_SIZE" in os.environ and "RANK" in os.environ
        cfg.check(int(os.environ["WORLD_SIZE"]) if under_torchrun else cfg.train.nproc)
    except (ConfigError, FileNotFoundError) as err:  # config mistakes stop here, before any heavy work
        print(f"megalysses-train: config error: {err}", file=sys.stderr)
        return 2
    if under_torchrun:
        backend = "nccl" if cfg.train.device == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
        try:
            train(cfg)
        finally:
            dist.destroy_process_group()
        return 0
    if cfg.train.device == "cuda":
        print("megalysses-train: device cuda needs one process per GPU: start it with "
              "torchrun --nproc-per-node N -m megalysses.train ...", file=sys.stderr)
        return 2
    run_ranks(_rank_entry, cfg.train.nproc, cfg, timeout=7 * 24 * 3600.0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
