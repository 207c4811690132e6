"""Optimizer state in host memory (train.offload_optimizer): bitwise the same parameters, norms and optimizer state as
without it, for bucketed all-reduce, ZeRO-1 and FSDP2 on 2 and 4 gloo ranks; a resume that switches it on or off
continues bitwise."""
import dataclasses
import functools
import json

import numpy as np
import pytest

from megalysses.checkpoint.tensors import TensorReader
from megalysses.parallel.launch import run_ranks
from megalysses.train import QUICKSTART, main
from test_data_parallel import LAYOUTS, _world, results_for, train_on_rank

OFFLOAD_LAYOUTS = ["dp2", "dp2-sp2", "tp2-sp2-seqpar", "zero1-dp2", "zero1-dp2-sp2", "zero1-dp2-tp2-seqpar", "fsdp-dp2",
                   "fsdp-dp2-sp2", "fsdp-dp2-tp2-seqpar"]


@functools.lru_cache(maxsize=None)
def offloaded(name: str, dtype: str = "float32", piece_numel: int = 0) -> list:
    layout = LAYOUTS[name]
    return run_ranks(train_on_rank, _world(layout), layout, dtype, True, piece_numel)


def assert_same_states(got: list[dict], ref: list[dict], label: str) -> None:
    """Every parameter's master, moments and step, bit for bit."""
    assert len(got) == len(ref), label
    for i, (g, r) in enumerate(zip(got, ref)):
        for key in r:
            assert np.array_equal(g[key], r[key]), f"{label}: parameter {i} {key} differs"


@pytest.mark.parametrize("name", OFFLOAD_LAYOUTS)
def test_offloaded_optimizer_is_bitwise_the_same(name):
    """Same clipped norms every step, same final parameters and same optimizer state, bit for bit."""
    ref, got = results_for(name), offloaded(name)
    for (ref_norms, _, _), (got_norms, _, _) in zip(ref, got):
        assert got_norms == ref_norms, name
    for key, value in ref[0][1].items():
        assert np.array_equal(got[0][1][key], value), f"{name}: parameter {key} differs with offload"
    assert_same_states(got[0][2]["states"], ref[0][2]["states"], name)
    # the masters and moments are where offload says: 12 bytes per owned element in host memory (ZeRO: 1/N each)
    for (_, _, stats), (_, _, ref_stats) in zip(got, ref):
        assert ref_stats["host_bytes"] == 0
        assert stats["host_bytes"] >= 12 * stats["moments"] // 8, (name, stats["host_bytes"], stats["moments"])


@pytest.mark.parametrize("name", ["dp2", "zero1-dp2-sp2"])
def test_offload_in_small_pieces_is_bitwise_the_same(name):
    """State streamed in pieces of 97 elements: parameters and their AdamW runs cut mid-way, one bucket in several
    pieces; still bit for bit the run without offload."""
    ref, got = results_for(name), offloaded(name, "float32", 97)
    assert [r[0] for r in got] == [r[0] for r in ref]
    for key, value in ref[0][1].items():
        assert np.array_equal(got[0][1][key], value), f"{name}: parameter {key} differs with 97-element pieces"
    assert_same_states(got[0][2]["states"], ref[0][2]["states"], name)


@pytest.mark.parametrize("name", ["zero1-dp2", "fsdp-dp2"])
def test_offload_with_bf16_parameters_is_bitwise_the_same(name):
    """bf16 compute with fp32 masters: the masters' updates and the bf16 parameters they refresh, bit for bit."""
    layout = LAYOUTS[name]
    ref = run_ranks(train_on_rank, _world(layout), layout, "bfloat16", False)
    got = offloaded(name, "bfloat16")
    assert [r[0] for r in got] == [r[0] for r in ref]
    for key, value in ref[0][1].items():
        assert np.array_equal(got[0][1][key], value), f"{name} bf16: parameter {key} differs with offload"
    assert_same_states(got[0][2]["states"], ref[0][2]["states"], name)


ARGS = ["--config", str(QUICKSTART), "train.steps=4", "train.seq_len=64", "train.warmup_steps=1",
        "train.eval_every=0", "logging.interval=1", "checkpoint.every=2", "checkpoint.keep_last=0"]


def logged_losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


@pytest.mark.parametrize("layout, first, second", [("{dp: 2, sp: 2, zero: 1}", False, True),
                                                   ("{dp: 2, sp: 2, zero: 3}", True, False),
                                                   ("{pp: 2, dp: 2, zero: 0}", True, False)])
def test_resume_switching_offload_continues_bitwise(tmp_path, layout, first, second):
    """4 steps with offload `first`, checkpoint at step 2; resuming that checkpoint with offload `second` logs the
    same losses at steps 3 and 4, bit for bit, and saves the same final state (ZeRO-1, FSDP2, a 2-stage pipeline)."""
    layout = f"layout={layout}"
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    assert main([*ARGS, layout, f"train.offload_optimizer={first}", f"logging.run_dir={reference}"]) == 0
    at_step_2 = reference / "checkpoints" / "step-2"
    assert main([*ARGS, layout, f"train.offload_optimizer={second}", f"logging.run_dir={resumed}",
                 f"checkpoint.resume={at_step_2}"]) == 0
    want, got = logged_losses(reference), logged_losses(resumed)
    assert sorted(got) == [3, 4] and all(got[s] == want[s] for s in got), (got, want)
    a, b = TensorReader(reference / "checkpoints" / "step-4"), TensorReader(resumed / "checkpoints" / "step-4")
    assert sorted(a.entries) == sorted(b.entries) and any("exp_avg" in name for name in a.entries)
    for name in a.entries:
        assert a.get(name).equal(b.get(name)), f"{name} differs after the resume that switched offload"


def test_forward_units_cover_every_parameter_in_forward_order():
    """The deferred offloaded step gates each forward unit on its parameters' buckets: every trained parameter must
    belong to a unit (else the forward could read it mid-update), the chunk's own (embedding, norm, head) first."""
    import torch

    from megalysses.models.gpt import GPT
    from megalysses.optim import forward_units
    from test_data_parallel import CFG

    for tie in (True, False):
        model = torch.nn.ModuleList([GPT(dataclasses.replace(CFG, tie_embeddings=tie))])
        blocks = list(model[0].blocks.values())
        units = forward_units(model, blocks)
        assert [m for m, _ in units] == [model[0], *blocks]
        covered = [id(p) for _, params in units for p in params]
        assert sorted(covered) == sorted(id(p) for p in model.parameters())  # each exactly once
