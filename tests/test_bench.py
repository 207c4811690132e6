"""megalysses-bench on CPU: FLOP counting, the communication clock, and whole benchmark rows on gloo ranks."""
import dataclasses

import pytest
import torch

from megalysses.bench import kernel_kind, main, parse_args, run_bench, table_row
from megalysses.config import load_model_config, load_run_config
from megalysses.metrics import flops_per_token, forward_flops_per_token, hardware_flops_per_token
from megalysses.models.config import MemoryConfig
from megalysses.parallel import ParallelLayout, ParallelMesh
from megalysses.parallel import collectives as C
from megalysses.parallel.launch import run_ranks
from megalysses.train import QUICKSTART


def test_model_flops_of_llama3_8b_by_hand():
    cfg = load_model_config("llama-3-8b")
    L, d, f, V, S = 32, 4096, 14336, 128256, 8192
    matmul_params = L * (d * (4096 + 2 * 1024) + 4096 * d + 3 * d * f) + V * d  # embedding lookup is no matmul
    causal_attention = L * 4 * S * 32 * 128 / 2
    assert flops_per_token(cfg, S) == pytest.approx(3 * (2 * matmul_params + causal_attention), rel=1e-12)
    assert flops_per_token(cfg, S) / 1e9 == pytest.approx(51.47, abs=0.01)


@pytest.mark.parametrize("memory, extra", [
    (MemoryConfig(), ()),
    (MemoryConfig(recompute="selective"), ("attn_core",)),
    (MemoryConfig(recompute="full"), ("attn_proj", "attn_core", "mlp")),
    (MemoryConfig(recompute="around_core", mlp_tiles=2), ("attn_proj", "mlp", "mlp")),
    (MemoryConfig(recompute="full", mlp_tiles=4, loss_tiles=8), ("attn_proj", "attn_core", "mlp", "mlp", "head")),
    (MemoryConfig(mlp_tiles=2), ("mlp",)),
    (MemoryConfig(loss_tiles=8, fused_loss=True), ()),  # gradients formed in the forward: no head recompute
])
def test_hardware_flops_add_the_recomputed_forwards(memory, extra):
    cfg = load_model_config("llama-3.2-1b")
    fwd = forward_flops_per_token(cfg, 4096)
    assert hardware_flops_per_token(cfg, memory, 4096) == pytest.approx(
        flops_per_token(cfg, 4096) + sum(fwd[k] for k in extra), rel=1e-12)


def _clocked_collectives(rank, world):
    mesh = ParallelMesh(ParallelLayout(sp=world))
    sp, x = mesh.group("sp"), torch.ones(world * 64, 32)
    C.all_to_all(x, sp, scatter_dim=0, gather_dim=1)  # clock not started: not counted
    mesh.clock.start()
    C.all_to_all(x, sp, scatter_dim=0, gather_dim=1)
    after_a2a = mesh.clock.stop()
    mesh.clock.start()
    C.all_reduce(x, sp)
    C.all_reduce_async(x, sp).wait()
    after_reduce = mesh.clock.stop()
    return after_a2a, after_reduce


def test_comm_clock_times_each_kind_only_while_started():
    for after_a2a, after_reduce in run_ranks(_clocked_collectives, 2):
        assert after_a2a["all_to_all"] > 0 and after_a2a["collective"] == 0 and after_a2a["p2p"] == 0
        assert after_reduce["all_to_all"] == 0 and after_reduce["collective"] > 0


def _bench_rows(overrides, argv=()):
    cfg = load_run_config(QUICKSTART, ["train.init=device", "train.global_batch_size=4", "train.micro_batch_size=2",
                                       *overrides])
    args = parse_args(["--steps", "2", "--warmup", "1", *argv])
    return run_ranks(bench_on_rank, cfg.train.nproc, cfg, args, timeout=300)


def bench_on_rank(rank: int, world: int, cfg, args):
    return run_bench(cfg, args)


def test_bench_rows_on_gloo_ranks_count_alltoall_and_recompute():
    ranks = _bench_rows(["layout=sp2", "train.nproc=2", "memory.recompute=full"], ["--seq-lens", "64,128"])
    assert ranks[0] == ranks[1]  # every rank returns the same reduced rows
    rows = ranks[0]
    assert [r["seq"] for r in rows] == [64, 128] and [r["tok/step"] for r in rows] == [256, 512]
    for r in rows:
        assert r["layout"] == "sp2" and r["dev"] == 2 and r["tok/s"] > 0
        assert r["tok/s"] == pytest.approx(r["tok/step"] / r["s/step"] / 2)
        assert 0 < r["a2a"] < 1 and 0 < r["coll"] < 1 and r["p2p"] == 0  # Ulysses a2a; grad + loss reductions
        assert r["HW TFLOP/s"] > r["TFLOP/s"] > 0  # full recompute re-runs every block's forward
        assert r["MFU"] is None and r["peak GiB"] is None  # no peak or memory figures on CPU
        assert 4.0 < r["loss"] < 7.0  # random tokens over a 256-symbol vocabulary: about ln(256) = 5.5
    assert "recompute=full" in rows[0]["setup"] and "| sp2 | 2 | 64 |" in table_row(rows[0])


def test_bench_of_a_pipeline_counts_p2p_and_no_alltoall():
    rows = _bench_rows(["layout.tp=1", "layout.sp=1", "layout.pp=2", "train.nproc=2"], ["--seq-lens", "64"])[0]
    assert rows[0]["layout"].startswith("pp2") and rows[0]["p2p"] > 0 and rows[0]["a2a"] == 0


def test_bench_config_errors_exit_2(capsys):
    assert main(["--seq-lens", "63"]) == 2  # tp2 x sp2 shards sequences in units of 4
    assert "63" in capsys.readouterr().err
    assert main(["layout=sp3"]) == 2
    with pytest.raises(SystemExit):
        main(["--steps", "0"])


@pytest.mark.parametrize("name, kind", [("ncclDevKernel_SendRecv(ncclDevKernelArgsStorage<4096ul>)", "communication"),
                                        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64", "matmul"),
                                        ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop", "attention"),
                                        ("void at::native::vectorized_elementwise_kernel<4, ...>", "elementwise"),
                                        ("triton_red_fused__to_copy_mean_mul_pow_rsqrt_0", "norms/other")])
def test_kernel_kinds(name, kind):
    assert kernel_kind(name) == kind


def test_setup_names_precision_and_savers():
    from megalysses.bench import describe_setup

    cfg = load_run_config(QUICKSTART, ["memory.loss_tiles=4"])
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, dtype="bfloat16"))
    assert describe_setup(cfg).endswith("torch sdpa bf16 loss_tiles=4")
    cfg = load_run_config(QUICKSTART, ["memory.loss_tiles=4", "memory.fused_loss=true"])
    assert describe_setup(cfg).endswith("torch sdpa fp32 loss_tiles=4 fused_loss")
