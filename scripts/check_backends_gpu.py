"""GPU checks of the layer backends and attention cores (run on 2 GPUs):

    torchrun --nproc-per-node 2 scripts/check_backends_gpu.py --sections parity,cores,throughput

parity:     TE vs torch backend, same weights, bf16: logits, loss and every gradient, on 1 GPU and under tp2 / sp2
cores:      flash-attn and TE fused attention vs SDPA inside the full model under sp2, packed documents included
throughput: a Llama-3-8B-geometry layer stack, torch vs TE backend, bf16 and FP8, one GPU
Rank 0 prints one table per section. FP8 training against bf16 runs through the trainer: scripts/check_fp8_training.py.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import time

import torch
import torch.distributed as dist

from megalysses.parallel.tensor import param_info
from megalysses.config import load_model_config
from megalysses.metrics import flops_per_token
from megalysses.models.config import GPTConfig
from megalysses.models.gpt import GPT
from megalysses.parallel import ParallelLayout, ParallelMesh
from megalysses.parallel import collectives as C
from megalysses.parallel.dp import all_reduce_gradients
from megalysses.parallel.sequence import count_valid_tokens, shard_sequence, token_weighted_loss
from megalysses.parallel.tensor import gather_full

SMALL = GPTConfig(vocab_size=1000, hidden_size=512, num_layers=2, num_heads=8, num_kv_heads=2,
                  intermediate_size=1408, max_seq_len=4096)


def say(*args):
    if dist.get_rank() == 0:
        print(*args, flush=True)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30)).item()


def build(cfg: GPTConfig, mesh: ParallelMesh, seed: int = 7) -> GPT:
    """The model in bf16 on this GPU, initialised from the layout-independent seed."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # TE builds its parameters in the default dtype, on the GPU
    try:
        model = GPT(cfg, mesh).cuda().to(torch.bfloat16)
    finally:
        torch.set_default_dtype(previous)
    model.init_weights(seed)
    return model


def make_batch(cfg: GPTConfig, b: int, s: int, packed: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (b, s), generator=g)
    labels = torch.randint(0, cfg.vocab_size, (b, s), generator=g)
    pos = torch.arange(s).repeat(b, 1)
    if packed:  # three documents per row, one of them short
        for cut in (s // 3, s // 3 + 5):
            pos[:, cut:] = torch.arange(s - cut)
    return ids, labels, pos


def loss_and_grads(model: GPT, mesh: ParallelMesh, batch, with_logits: bool = True):
    """Token-weighted loss, gathered canonical gradients and (optionally) gathered logits of one step."""
    sp = mesh.group("sp")
    ids, labels, pos = (shard_sequence(t, sp).cuda() for t in batch)
    logits = None
    if with_logits:
        with torch.no_grad():
            local = model(ids, pos)  # (b, s/sp, V_padded/tp)
            logits = C.all_gather(C.all_gather(local, mesh.group("tp"), dim=2), sp, dim=1)
    total = count_valid_tokens(labels, mesh.data_group())
    loss = token_weighted_loss(model(ids, pos, labels).float(), labels, total)
    loss.backward()
    all_reduce_gradients(model.parameters(), mesh)
    value = C.all_reduce(loss.detach(), mesh.data_group()).item()
    grads = {n: gather_full(p.grad, param_info(p).shard, mesh.group("tp")) for n, p in model.canonical_parameters()}
    return value, grads, logits


def compare(ref, got) -> tuple[float, float, float, str]:
    (l0, g0, z0), (l1, g1, z1) = ref, got
    worst = max(((rel(g1[n], g0[n]), n) for n in g0), default=(0.0, ""))
    return abs(l1 - l0) / abs(l0), rel(z1, z0) if z0 is not None else float("nan"), worst[0], worst[1]


def section_parity(world: int):
    say("\n## TE vs torch backend, same weights, bf16 (loss, logits and every gradient, relative)")
    say("| layout | docs | loss rel | logits rel | worst grad rel | worst grad |")
    say("|---|---|---:|---:|---:|---|")
    layouts = [("1 GPU", ParallelLayout(dp=world)), ("tp2", ParallelLayout(tp=2)),
               ("tp2 + seq-par", ParallelLayout(tp=2, tp_sequence_parallel=True)), ("sp2", ParallelLayout(sp=2))]
    for name, layout in layouts:
        mesh = ParallelMesh(layout, device_type="cuda")
        for packed in (False, True):
            batch = make_batch(SMALL, 2, 1024, packed)
            ref = loss_and_grads(build(SMALL, mesh), mesh, batch)
            te_cfg = dataclasses.replace(SMALL, backend="te", attention_core="te")
            got = loss_and_grads(build(te_cfg, mesh), mesh, batch)
            lr_, zr, gr, gn = compare(ref, got)
            say(f"| {name} | {'packed' if packed else 'one'} | {lr_:.2e} | {zr:.2e} | {gr:.2e} | {gn} |")


def section_cores(world: int):
    say("\n## attention cores vs SDPA inside the full model (torch layers, bf16), relative")
    say("| layout | core | docs | loss rel | logits rel | worst grad rel |")
    say("|---|---|---|---:|---:|---:|")
    for name, layout in [("sp2", ParallelLayout(sp=2)), ("1 GPU", ParallelLayout(dp=world))]:
        mesh = ParallelMesh(layout, device_type="cuda")
        for core in ("flash", "te"):
            for packed in (False, True):
                batch = make_batch(SMALL, 2, 2048, packed, seed=1)
                ref = loss_and_grads(build(SMALL, mesh), mesh, batch)
                try:
                    got = loss_and_grads(build(dataclasses.replace(SMALL, attention_core=core), mesh), mesh, batch)
                except Exception as err:  # noqa: BLE001 - report and go on
                    say(f"| {name} | {core} | {'packed' if packed else 'one'} | {type(err).__name__}: {err} | | |")
                    continue
                lr_, zr, gr, _ = compare(ref, got)
                say(f"| {name} | {core} | {'packed' if packed else 'one'} | {lr_:.2e} | {zr:.2e} | {gr:.2e} |")


def fp8_autocast(recipe: str):
    if recipe == "bf16":
        return contextlib.nullcontext()
    from megalysses.models.te import fp8_context

    return fp8_context(recipe, None)


def time_steps(model: GPT, seq: int, recipe: str, iters: int = 8) -> float:
    ids = torch.randint(0, model.cfg.vocab_size, (1, seq), device="cuda")
    times = []
    for i in range(iters + 3):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with fp8_autocast(recipe):
            loss = model(ids, None, ids).float().mean()
        loss.backward()
        torch.cuda.synchronize()
        if i >= 3:
            times.append(time.perf_counter() - t0)
        model.zero_grad(set_to_none=True)
    return sorted(times)[len(times) // 2]


def section_throughput(layers: int, seq: int):
    base = dataclasses.replace(load_model_config("llama-3-8b"), num_layers=layers, max_seq_len=seq)
    say(f"\n## Llama-3-8B geometry, {layers} layers, seq {seq}, batch 1, one GPU: fwd+bwd (embedding + head included)")
    say("| backend | precision | ms/step | tokens/s | model TFLOP/s |")
    say("|---|---|---:|---:|---:|")
    flops = flops_per_token(base, seq) * seq
    mesh = ParallelMesh.single_device("cuda")
    for backend, core, recipe in [("torch", "sdpa", "bf16"), ("te", "te", "bf16"), ("te", "te", "delayed"),
                                  ("te", "te", "current")]:
        model = build(dataclasses.replace(base, backend=backend, attention_core=core), mesh)
        try:
            t = time_steps(model, seq, recipe)
            say(f"| {backend} | {recipe} | {t * 1e3:.1f} | {seq / t:,.0f} | {flops / t / 1e12:.0f} |")
        except Exception as err:  # noqa: BLE001
            say(f"| {backend} | {recipe} | {type(err).__name__}: {str(err)[:120]} | | |")
        del model
        torch.cuda.empty_cache()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sections", default="parity,cores,throughput")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=8192)
    args = parser.parse_args()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl")
    world = dist.get_world_size()
    say(f"device: {world} x {torch.cuda.get_device_name()}, torch {torch.__version__}")
    sections = args.sections.split(",")
    if "parity" in sections:
        section_parity(world)
    if "cores" in sections:
        section_cores(world)
    if "throughput" in sections:
        section_throughput(args.layers, args.seq)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
