"""Benchmark the Ulysses attention layer (two all-to-alls + local core), forward + backward, against the same core
on one GPU with h/P heads and no communication.

GPU (the "Must show" run):
    torchrun --nproc-per-node 4 scripts/bench_ulysses.py --seqs 32768,131072,524288
Several attention cores side by side (flash = flash-attn-4, te = Transformer Engine DotProductAttention; a core that
cannot be built or run here prints one row saying why, and the run goes on):
    torchrun --nproc-per-node 4 scripts/bench_ulysses.py --seqs 32768,131072 --cores sdpa,flash,te
CPU smoke test (gloo, float32, default SDPA backend, tiny sizes):
    torchrun --nproc-per-node 2 scripts/bench_ulysses.py --cpu [--cores sdpa,flash,te]

Per sequence length S (global), each rank holds q (1, S/P, 32, 128) and k, v (1, S/P, 8, 128) (Llama-3-8B heads).
Columns:
  core         the local attention core: sdpa (torch SDPA, --backend forced on GPU, cuDNN by default), or a core of
               models.cores.build_attention_core(name, 32/P, 8/P, 128): flash, te
  ulysses ms   median time of ulysses_attention(...) forward + backward (CUDA events, after warm-up)
  a2a ms       the all-to-alls alone, forward + backward: seq_to_heads(q, k, v) and heads_to_seq(out) on tensors of
               the same shapes (pack/unpack copies included), medians
  nccl ms      the bare dist.all_to_all_single calls of the same byte counts (no pack/unpack), forward + backward
  a2a %        a2a ms / ulysses ms
  TFLOP/s      attention FLOPs per GPU / ulysses time; causal fwd = 4*S*S*H*D/2, bwd = 2.5x fwd, H = 32/P
  core ms      the same core with 32/P q heads and 8/P kv heads on the full sequence on one GPU, no communication
  eff          core ms / ulysses ms
  a2a and nccl do not depend on the core: measured once per S (with the first core that runs) and repeated.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

from megalysses.models.cores import build_attention_core, sdpa_attention
from megalysses.parallel.layout import ParallelLayout
from megalysses.parallel.mesh import ParallelMesh
from megalysses.parallel.sequence.ulysses import heads_to_seq, seq_to_heads, ulysses_attention

HQ, HK, D = 32, 8, 128  # Llama-3-8B attention heads


def log(*a):
    if dist.get_rank() == 0:
        print(*a, flush=True)


class Timer:
    """Median of per-iteration times: CUDA events on GPU, perf_counter on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def measure(self, fn, warmup: int, iters: int, sync_ranks: bool = True) -> tuple[float, list[float]]:
        times = []
        for i in range(warmup + iters):
            if sync_ranks:  # line the ranks up so that one rank's late start is not timed as communication
                self._sync()
                dist.barrier()
                self._sync()
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                t = start.elapsed_time(end)
            else:
                t0 = time.perf_counter()
                fn()
                t = (time.perf_counter() - t0) * 1e3
            if i >= warmup:
                times.append(t)
        return statistics.median(times), times

    def _sync(self):
        if self.cuda:
            torch.cuda.synchronize()


def max_over_ranks(x: float, device) -> float:
    t = torch.tensor([x], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def sdpa_context(args, device):
    """Force SDPA's cuDNN backend on GPU; the default selection on CPU or when asked."""
    if device.type != "cuda" or args.backend == "default":
        return contextlib.nullcontext
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backend = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
               "efficient": SDPBackend.EFFICIENT_ATTENTION}[args.backend]
    return lambda: sdpa_kernel([backend])


def rand(shape, dtype, device, grad=False, gen=None):
    return torch.randn(shape, dtype=dtype, device=device, generator=gen).requires_grad_(grad)


def attn_flops_per_gpu(s: int, p: int) -> float:
    h = HQ // p
    fwd = 4 * s * s * h * D / 2
    return fwd * 3.5  # bwd = 2.5 x fwd


def check_correctness(group, s, dtype, device, ctx, core=sdpa_attention) -> float:
    """Ulysses output and input grads vs full attention over the gathered sequence (every head), on each rank."""
    p, r = group.size, group.rank
    gen = torch.Generator(device=device).manual_seed(1234)  # identical on every rank: full tensors, then our slice
    qf, kf, vf = (torch.randn((1, s, h, D), dtype=dtype, device=device, generator=gen) for h in (HQ, HK, HK))
    gf = torch.randn((1, s, HQ, D), dtype=dtype, device=device, generator=gen)
    n = s // p
    sl = slice(r * n, (r + 1) * n)
    q, k, v = (t[:, sl].detach().clone().requires_grad_(True) for t in (qf, kf, vf))
    with ctx():
        out = ulysses_attention(core, q, k, v, group)
        out.backward(gf[:, sl])
    ref_in = [t.detach().double().requires_grad_(True) for t in (qf, kf, vf)]
    ref = sdpa_attention(*ref_in)  # float64 reference (math backend)
    ref.backward(gf.double())
    errs = []
    for got, want in [(out, ref[:, sl]), (q.grad, ref_in[0].grad[:, sl]), (k.grad, ref_in[1].grad[:, sl]),
                      (v.grad, ref_in[2].grad[:, sl])]:
        got, want = got.detach().double(), want.detach()
        if not torch.isfinite(got).all():
            return float("nan")
        errs.append(float((got - want).norm() / want.norm()))
    return max(errs)


def forward_backward_step(fn, inputs, grad, ctx):
    """A timed step: fn(*inputs) forward and backward with `grad`, inputs' old gradients dropped first."""
    def step():
        for t in inputs:
            t.grad = None
        with ctx():
            out = fn(*inputs)
        with ctx():
            out.backward(grad)
    return step


def bench_size(s, group, args, device, dtype, ctx, timer, gen, core=sdpa_attention, comm=None):
    """One core at one S. `comm`: the a2a / nccl results of an earlier core at this S (core-independent), or None
    to measure them."""
    p = group.size
    n = s // p
    h_loc, hk_loc = HQ // p, HK // p
    res = {"S": s, "P": p}

    # --- the Ulysses layer, forward + backward
    q, k, v = rand((1, n, HQ, D), dtype, device, True, gen), rand((1, n, HK, D), dtype, device, True, gen), \
        rand((1, n, HK, D), dtype, device, True, gen)
    g = rand((1, n, HQ, D), dtype, device, False, gen)

    ulysses_step = forward_backward_step(lambda q, k, v: ulysses_attention(core, q, k, v, group), (q, k, v), g, ctx)
    res["ulysses"], res["ulysses_all"] = timer.measure(ulysses_step, args.warmup, args.iters)
    if device.type == "cuda":
        res["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30

    if comm is not None:
        res.update(comm)
    else:
        res.update(bench_comm(s, group, args, device, dtype, timer, gen, q, k, v, g))

    # --- the core alone with h/P heads on the full sequence, one GPU, no communication (all ranks at once)
    qc, kc, vc = rand((1, s, h_loc, D), dtype, device, True, gen), rand((1, s, hk_loc, D), dtype, device, True, gen), \
        rand((1, s, hk_loc, D), dtype, device, True, gen)
    gc = rand((1, s, h_loc, D), dtype, device, False, gen)

    res["core"], _ = timer.measure(forward_backward_step(core, (qc, kc, vc), gc, ctx), args.warmup, args.iters)
    for key in ("ulysses", "core"):
        res[key] = max_over_ranks(res[key], device)  # the slowest rank's median
    flops = attn_flops_per_gpu(s, p)
    res["tflops"] = flops / (res["ulysses"] * 1e-3) / 1e12
    res["core_tflops"] = flops / (res["core"] * 1e-3) / 1e12
    res["eff"] = res["core"] / res["ulysses"]
    res["a2a_share"] = res["a2a"] / res["ulysses"]
    return res


def bench_comm(s, group, args, device, dtype, timer, gen, q, k, v, g) -> dict:
    """The all-to-alls of the layer alone and bare NCCL of the same bytes (independent of the core)."""
    p = group.size
    n = s // p
    h_loc, hk_loc = HQ // p, HK // p
    res = {}
    # --- the all-to-alls alone (pack/unpack included): seq_to_heads(q, k, v) fwd+bwd and heads_to_seq(out) fwd+bwd
    gq = rand((1, s, h_loc, D), dtype, device, False, gen)
    gk = rand((1, s, hk_loc, D), dtype, device, False, gen)
    gv = rand((1, s, hk_loc, D), dtype, device, False, gen)
    o_heads = rand((1, s, h_loc, D), dtype, device, True, gen)

    def a2a_step():
        for t in (q, k, v, o_heads):
            t.grad = None
        qh, kh, vh = seq_to_heads(group, q, k, v)
        torch.autograd.backward([qh, kh, vh], [gq, gk, gv])
        (o_seq,) = heads_to_seq(group, o_heads)
        o_seq.backward(g)

    res["a2a"], _ = timer.measure(a2a_step, args.warmup, args.iters)

    # --- bare NCCL all_to_all_single of the same byte counts: qkv fwd, out fwd, dout bwd, dqkv bwd
    elems_qkv = n * (HQ + 2 * HK) * D
    elems_o = n * HQ * D
    bufs = [torch.randn(e, dtype=dtype, device=device, generator=gen) for e in (elems_qkv, elems_o)]
    outs = [torch.empty_like(b) for b in bufs]

    def nccl_step():
        for _ in range(2):  # forward and backward move the same bytes
            for b, o in zip(bufs, outs):
                dist.all_to_all_single(o, b, group=group.pg)

    res["nccl"], _ = timer.measure(nccl_step, args.warmup, args.iters)
    res["a2a_bytes"] = 2 * (elems_qkv + elems_o) * bufs[0].element_size()
    del bufs, outs, gq, gk, gv, o_heads
    for key in ("a2a", "nccl"):
        res[key] = max_over_ranks(res[key], device)  # the slowest rank's median
    res["a2a_busbw"] = res["a2a_bytes"] * (p - 1) / p / (res["nccl"] * 1e-3) / 1e9
    return res


def first_line(e: BaseException, n: int = 200) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:n]


def backend_works(ctx, device, dtype, core=sdpa_attention, h=8, hk=2,
                  errors=(RuntimeError,)) -> tuple[bool, str]:
    """Does the core (under ctx) run GQA causal attention fwd+bwd at all (tiny shapes)?"""
    try:
        q = torch.randn(1, 256, h, D, dtype=dtype, device=device, requires_grad=True)
        k = torch.randn(1, 256, hk, D, dtype=dtype, device=device, requires_grad=True)
        v = torch.randn(1, 256, hk, D, dtype=dtype, device=device, requires_grad=True)
        with ctx():
            out = core(q, k, v)
            out.sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return True, ""
    except errors as e:
        return False, first_line(e)


def agree(ok: bool, device) -> bool:
    """True when it holds on every rank."""
    return max_over_ranks(0.0 if ok else 1.0, device) == 0.0


def build_core(name, p, device, dtype, check_seq, group, args):
    """(core fn, ctx, note, check error) for one --cores entry; core fn None and note = the reason when it cannot be
    built or run here (decided on every rank alike)."""
    if name == "sdpa":
        ctx = sdpa_context(args, device)
        note = "default SDPA selection" if ctx is contextlib.nullcontext else f"SDPA forced to {args.backend}"
        if ctx is not contextlib.nullcontext:
            ok, why = backend_works(ctx, device, dtype)
            if not agree(ok, device):
                log(f"NOTE: SDPA backend {args.backend} is unavailable ({why}); falling back to the default SDPA "
                    f"selection")
                ctx = contextlib.nullcontext
                note = f"default SDPA selection ({args.backend} unavailable)"
        core = sdpa_attention
    else:
        ctx, core, why = contextlib.nullcontext, None, ""
        try:
            core = build_attention_core(name, HQ // p, HK // p, D)
        except Exception as e:  # noqa: BLE001 - any reason it cannot be built is reported, not raised
            why = "cannot be built: " + first_line(e)
        if not agree(core is not None, device):
            return None, ctx, why or "cannot be built on another rank", None
        note = {"flash": f"build_attention_core('flash', {HQ // p}, {HK // p}, {D}) = "
                         f"{getattr(core, 'name', type(core).__name__)}",
                "te": f"build_attention_core('te', {HQ // p}, {HK // p}, {D}) = te.DotProductAttention"}.get(
            name, f"build_attention_core({name!r}, {HQ // p}, {HK // p}, {D})")
        if not check_seq:  # no correctness run to try it on: a tiny fwd+bwd
            ok, why = backend_works(ctx, device, dtype, core, HQ // p, HK // p, errors=(Exception,))
            if not agree(ok, device):
                return None, ctx, "does not run: " + (why or "fails on another rank"), None
    err = None
    if check_seq:
        try:
            err = check_correctness(group, check_seq, dtype, device, ctx, core)
            ok, why = True, ""
        except Exception as e:  # noqa: BLE001 - same on every rank: the core fails after the same all-to-all
            if name == "sdpa" and ctx is contextlib.nullcontext:
                raise
            ok, why, err = False, first_line(e), float("nan")
        if not agree(ok, device):
            return None, ctx, "does not run: " + (why or "fails on another rank"), None
        err = max_over_ranks(err if err == err else float("inf"), device)
    return core, ctx, note, err


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqs", default=None, help="comma-separated global sequence lengths "
                    "(default 32768,131072,524288 on GPU, 256,512 with --cpu)")
    ap.add_argument("--cpu", action="store_true", help="gloo, float32, default SDPA backend (smoke test)")
    ap.add_argument("--backend", default="cudnn", choices=["cudnn", "flash", "efficient", "default"],
                    help="SDPA backend to force on GPU (falls back to default with a note if it does not run)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=None, help="timed iterations (default: 20 up to 32K, fewer above)")
    ap.add_argument("--check-seq", type=int, default=None,
                    help="global S of the correctness check vs float64 full attention (0 to skip; "
                         "default 2048 on GPU, 64 on CPU)")
    ap.add_argument("--cores", default="sdpa",
                    help="comma-separated attention cores to compare inside the layer: sdpa (SDPA, --backend forced), "
                         "flash (flash-attn-4), te (Transformer Engine); default sdpa")
    args = ap.parse_args()
    args.cores = [c.strip() for c in args.cores.split(",") if c.strip()]
    bad = [c for c in args.cores if c not in ("sdpa", "flash", "te")]
    if bad or not args.cores:
        ap.error(f"--cores {args.cores!r}: choose from sdpa, flash, te")
    args.seqs = [int(x) for x in (args.seqs or ("256,512" if args.cpu else "32768,131072,524288")).split(",")]
    if args.check_seq is None:
        args.check_seq = 64 if args.cpu else 2048
    return args


def init_distributed(cpu: bool) -> tuple[torch.device, torch.dtype]:
    """gloo + float32 with --cpu, else NCCL + bf16 on this rank's GPU."""
    if cpu:
        dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=5))
        torch.set_num_threads(1)
        return torch.device("cpu"), torch.float32
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank), timeout=datetime.timedelta(minutes=10))
    return torch.device("cuda", local_rank), torch.bfloat16


def describe_device(world: int, device: torch.device) -> str:
    """Log the device, library versions and NCCL environment; returns the device name for the table title."""
    if device.type != "cuda":
        log(f"device: {world} x CPU ranks (gloo), torch {torch.__version__}, float32")
        return "CPU (gloo)"
    name = torch.cuda.get_device_name(device)
    log(f"device: {world} x {name}, torch {torch.__version__}, cuda {torch.version.cuda}, "
        f"cudnn {torch.backends.cudnn.version()}, nccl {'.'.join(map(str, torch.cuda.nccl.version()))}")
    log("NCCL env: " + " ".join(f"{k}={v}" for k, v in sorted(os.environ.items())
                                 if k.startswith(("NCCL_", "NVSHMEM_", "TORCH_SYMM"))))
    return name


def build_cores(args, p: int, device, dtype, group) -> dict:
    """name -> (core fn or None, ctx, note or reason, check error), each core checked against float64."""
    built = {}
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    for name in args.cores:
        t0 = time.perf_counter()
        core, ctx, note, err = build_core(name, p, device, dtype, args.check_seq, group, args)
        built[name] = (core, ctx, note, err)
        if core is None:
            log(f"core {name}: unavailable, {note}")
            continue
        msg = f"core {name}: {note}; dtype {dtype}"
        if err is not None:
            msg += (f"; correctness at S={args.check_seq}: max relative error of out, dq, dk, dv vs float64 full "
                    f"attention = {err:.2e} ({'ok' if err < tol else 'FAILED'}, tolerance {tol:g})")
        log(msg + f" ({time.perf_counter() - t0:.0f} s)")
    return built


def fits(s: int, p: int, device) -> bool:
    """Rough peak per rank (Ulysses inputs/grads/outputs/a2a buffers + core inputs/grads + stats, x1.5) vs free."""
    if device.type != "cuda":
        return True
    n = s // p
    est = 1.5 * 2 * (12 * n * (HQ + 2 * HK) * D + 6 * s * (HQ + 2 * HK) // p * D)
    free, _ = torch.cuda.mem_get_info()
    if max_over_ranks(est - free, device) > 0:
        log(f"skip S={s}: estimated {est / 2**30:.1f} GiB per rank exceeds the free {free / 2**30:.1f} GiB")
        return False
    return True


def bench_core(s, group, a, device, dtype, timer, gen, name, built, comm, args) -> dict:
    """One (S, core) row; a failing core gives a row with the reason (the SDPA row retries the default backend)."""
    core, ctx, note, err = built[name]
    p = group.size
    try:
        r = bench_size(s, group, a, device, dtype, ctx, timer, gen, core, comm)
    except torch.cuda.OutOfMemoryError as e:  # only safe if every rank hits it in the same place
        log(f"skip S={s} core {name}: out of memory ({str(e).splitlines()[0][:160]})")
        torch.cuda.empty_cache()
        return {"S": s, "P": p, "name": name, "reason": "out of memory"}
    except Exception as e:  # noqa: BLE001 - the core refused this shape (same on every rank)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        if name != "sdpa":
            log(f"skip S={s} core {name}: {first_line(e)}")
            return {"S": s, "P": p, "name": name, "reason": f"failed: {first_line(e, 120)}"}
        if ctx is contextlib.nullcontext:
            raise
        log(f"NOTE: S={s}: SDPA {args.backend} failed ({first_line(e)}); this row uses the default SDPA selection")
        r = bench_size(s, group, a, device, dtype, contextlib.nullcontext, timer, gen, core, comm)
        r["note"] = "default SDPA"
    r["name"], r["err"] = name, err
    log(f"S={s} core {name}: ulysses {r['ulysses']:.2f} ms (rank 0, {a.iters} iters: min "
        f"{min(r['ulysses_all']):.2f}, max {max(r['ulysses_all']):.2f}), a2a {r['a2a']:.2f} ms, nccl "
        f"{r['nccl']:.2f} ms (a2a {r['a2a_bytes'] / 2**20:.0f} MiB/rank fwd+bwd, busbw {r['a2a_busbw']:.0f} "
        f"GB/s), core {r['core']:.2f} ms ({r['core_tflops']:.0f} TFLOP/s), peak mem {r.get('peak_gib', 0):.1f} GiB")
    return r


def print_table(rows, built, cores, p, world, name_dev, dtype, check_seq) -> None:
    log("")
    log(f"Ulysses attention fwd+bwd, {world} x {name_dev}, q {HQ} heads / kv {HK} heads x {D}, "
        f"{str(dtype).replace('torch.', '')}, median over iterations (slowest rank); "
        f"chk err = max rel. error vs float64 at S={check_seq}")
    log(f"{'core':>5} {'S':>8} {'P':>2} {'ulysses ms':>11} {'a2a ms':>8} {'nccl ms':>8} {'a2a %':>6} "
        f"{'TFLOP/s/GPU':>12} {'core ms':>9} {'core TF/s':>10} {'eff':>6} {'chk err':>8}")
    for name in cores:  # a core that cannot run: one row with the reason
        if built[name][0] is None:
            log(f"{name:>5} {'-':>8} {p:>2}  unavailable: {built[name][2]}")
    for r in sorted(rows, key=lambda r: (r["S"], cores.index(r["name"]))):
        if "reason" in r:
            log(f"{r['name']:>5} {r['S']:>8} {r['P']:>2}  {r['reason']}")
            continue
        err = f"{r['err']:.1e}" if r["err"] is not None else "-"
        log(f"{r['name']:>5} {r['S']:>8} {r['P']:>2} {r['ulysses']:>11.2f} {r['a2a']:>8.2f} {r['nccl']:>8.2f} "
            f"{100 * r['a2a_share']:>5.1f}% {r['tflops']:>12.1f} {r['core']:>9.2f} {r['core_tflops']:>10.1f} "
            f"{r['eff']:>6.3f} {err:>8}" + (f"  ({r['note']})" if "note" in r else ""))


def main():
    args = parse_args()
    device, dtype = init_distributed(args.cpu)
    world = dist.get_world_size()
    mesh = ParallelMesh(ParallelLayout(sp=world), device_type=device.type)
    group = mesh.group("sp")
    p = group.size
    name_dev = describe_device(world, device)
    log(f"mesh: {mesh!r}; sp group ranks {group.ranks}")
    built = build_cores(args, p, device, dtype, group)
    if device.type == "cuda":  # the first row's peak mem should not include the correctness checks
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    gen = torch.Generator(device=device).manual_seed(1000 + dist.get_rank())
    timer = Timer(device)
    rows = []
    for s in args.seqs:
        if s % p or HQ % p:
            log(f"skip S={s}: not divisible by P={p}")
            continue
        if not fits(s, p, device):
            continue
        a = argparse.Namespace(**{**vars(args), "iters": args.iters or (20 if s <= 32768 else 10 if s <= 131072 else 5)})
        comm = None  # the all-to-all timings do not depend on the core: measured with the first one
        for name in args.cores:
            if built[name][0] is None:
                continue
            r = bench_core(s, group, a, device, dtype, timer, gen, name, built, comm, args)
            rows.append(r)
            if "reason" not in r:
                comm = {k: r[k] for k in ("a2a", "nccl", "a2a_bytes", "a2a_busbw")}
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
    print_table(rows, built, args.cores, p, world, name_dev, dtype, args.check_seq)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
