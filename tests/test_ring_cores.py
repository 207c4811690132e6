"""The ring's fused block cores against its fp32 reference core, and how model.attention_core picks one under a ring.

FlexAttention runs uncompiled on CPU (its forward is torch's own flex_attention; torch has no CPU FlexAttention
backward, so there the block backward recomputes the same block densely and back-propagates the block's lse-weighted
share, the code path CUDA runs through flex's differentiable lse). Every case of test_ring (causal, packed documents,
GQA below the Ulysses degree, a length no degree divides) runs in one set of gloo ranks per layout, so flex's one-off
tracing is paid once per rank. The flash-attn-4 core's glue runs here against a stand-in with flash-attn-4's calling
contract; the real kernels and compiled FlexAttention, in bf16, are the GPU tests at the end.
"""
import argparse
import dataclasses
import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch

from megalysses.models.config import GPTConfig
from megalysses.models.cores import (FlashAttentionUnavailable, build_attention_core, build_ring_block_core,
                                     ring_block_core_name)
from megalysses.models.gpt import GPT
from megalysses.parallel import ParallelLayout
from megalysses.parallel.collectives import CommGroup
from megalysses.parallel.launch import run_ranks
from megalysses.parallel.sequence import ring_attention
from megalysses.parallel.sequence.ring import (REFERENCE_CORE, RingMasks, block_attention, block_attention_grads,
                                               document_ids)
from megalysses.parallel.sequence.ring_cores import FlashBlockCore, FlexBlockCore, block_tiles
from parity import compare, make_batch, reference, sharded
from test_ring import CASES, _inputs, _packed_positions, _rel, hybrid_run, ring_run


def _flex_against_reference(rank, world, sp):
    """{case: [relative error of out, dq, dk, dv]} of the flex core against the reference core, same layout."""
    run = (lambda case, core: ring_run(world, case, core)) if sp == 1 else (  # noqa: E731
        lambda case, core: hybrid_run(world, sp, case, core))
    flex = FlexBlockCore()
    return {case: [_rel(a, b) for a, b in zip(run(case, flex), run(case, REFERENCE_CORE))] for case in CASES}


@pytest.mark.parametrize("sp,world", [(1, 2), (1, 4), (2, 4)], ids=["ring2", "ring4", "sp2-ring2"])
def test_flex_core_matches_the_reference_core(sp, world):
    for rank, by_case in enumerate(run_ranks(_flex_against_reference, world, sp, timeout=300.0)):
        for case, errors in by_case.items():
            for name, err in zip(("out", "dq", "dk", "dv"), errors):
                assert err < 1e-5, f"rank {rank} {case} {name}: relative error {err:.2e}"


def test_flex_tiles_cover_exactly_what_the_mask_allows():
    """Tile maps of every block of every rank and step (chunk 10, tiles of 3, the last one short): a tile holding an
    allowed pair is live, and a tile is full exactly when every pair in it is allowed."""
    ranks, chunk, tile = 3, 10, 3
    doc_ids = document_ids(_packed_positions(2 * ranks * chunk, seed=5))  # (2, 60)
    checked = 0
    for docs in (None, doc_ids):
        for rank in range(ranks):
            masks = RingMasks(rank, ranks, chunk, docs)
            for src in range(ranks):
                for block in masks.plan(src):
                    allowed = block.mask("cpu").expand(2, -1, -1)  # (b, sq, sk)
                    live, full = (t.expand(2, -1, -1) for t in block_tiles(block, tile, "cpu"))
                    for i in range(live.shape[1]):
                        for j in range(live.shape[2]):
                            pairs = allowed[:, i * tile:(i + 1) * tile, j * tile:(j + 1) * tile]
                            assert not (pairs.flatten(1).any(1) & ~live[:, i, j]).any(), (rank, src, block, i, j)
                            assert torch.equal(full[:, i, j], pairs.flatten(1).all(1)), (rank, src, block, i, j)
                            checked += 1
    assert checked > 400


def test_blocks_inside_one_document_need_no_document_mask():
    """Documents [0, 2) and [2, 16) over 4 chunks of 4 on 2 ranks: only blocks holding both documents keep a document
    mask; the rest are plain causal (whole, or a causal diagonal)."""
    masks = RingMasks(0, 2, 4, torch.tensor([[0] * 2 + [1] * 14]))  # rank 0 holds chunks 0 and 3
    described = lambda src: [(b.q_start, b.k_start, b.causal, b.docs is None) for b in masks.plan(src)]  # noqa: E731
    assert described(0) == [(0, 0, True, False), (12, 0, False, False), (12, 12, True, True)]
    assert described(1) == [(12, 4, False, True), (12, 8, False, True)]  # rank 1's chunks 1 and 2: document 1


def test_one_rank_flex_ring_matches_the_reference_in_bf16_inputs_on_cpu():
    """bf16 in, bf16 out: flex's forward takes the block in the inputs' dtype and the ring still merges in fp32."""
    q, k, v, grad_out, positions = _inputs("packed")
    got, want = [], []
    for core, results in ((FlexBlockCore(), got), (REFERENCE_CORE, want)):
        x = [t.bfloat16().requires_grad_() for t in (q, k, v)]
        out = ring_attention(*x, CommGroup.solo(), positions=positions, core=core)
        out.backward(grad_out.bfloat16())
        assert out.dtype == x[0].grad.dtype == x[1].grad.dtype == torch.bfloat16
        results += [out.detach().float()] + [t.grad.float() for t in x]
    assert _rel(got[0], want[0]) < 2e-2
    assert all(_rel(a, b) < 3e-2 for a, b in zip(got[1:], want[1:]))


def _fake_flash_attn_4(monkeypatch, calls: list):
    """flash_attn.cute with flash-attn-4's calling contract, computed by the reference math: flash_attn_func(q, k, v,
    softmax_scale, causal, return_lse) -> (out, lse); interface._flash_attn_bwd(q, k, v, out, dout, lse,
    softmax_scale, causal) -> (dq, dk, dv), using the given out and lse. Records (function, causal) per call."""
    def square(q, k, causal):
        mask = torch.ones(q.shape[1], k.shape[1], dtype=torch.bool)
        return (mask.tril() if causal else mask).unsqueeze(0)

    def flash_attn_func(q, k, v, softmax_scale=None, causal=False, return_lse=False):
        calls.append(("forward", causal))
        out, lse = block_attention(q, k, v, square(q, k, causal), softmax_scale)
        return (out.to(q.dtype), lse) if return_lse else out.to(q.dtype)

    def _flash_attn_bwd(q, k, v, out, dout, lse, softmax_scale=None, causal=False):
        calls.append(("backward", causal))
        delta = (dout.float() * out.float()).sum(-1).transpose(1, 2)
        grads = block_attention_grads(q, k, v, dout, lse, delta, square(q, k, causal), softmax_scale)
        return tuple(g.to(q.dtype) for g in grads)

    cute = types.ModuleType("flash_attn.cute")
    cute.flash_attn_func = flash_attn_func
    cute.interface = types.ModuleType("flash_attn.cute.interface")
    cute.interface._flash_attn_bwd = _flash_attn_bwd
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))
    monkeypatch.setitem(sys.modules, "flash_attn.cute", cute)
    monkeypatch.setitem(sys.modules, "flash_attn.cute.interface", cute.interface)


TWO_DOCUMENTS = torch.cat([torch.arange(20), torch.arange(12)]).expand(2, -1)  # tokens 0-19 and 20-31


@pytest.mark.parametrize("case,positions,flash_blocks", [
    ("causal", None, [True, False, True]),  # one rank: (0, 0) causal, (1, 0) whole, (1, 1) causal
    ("gqa-hk1", None, [True, False, True]),
    ("gqa-hk2", TWO_DOCUMENTS, [True]),  # (0, 0) inside document 0; (1, 0), (1, 1) cut by the boundary at 20
], ids=["causal", "gqa-hk1", "documents"])
def test_flash_core_calls_flash_attn_4_as_its_contract_says(monkeypatch, case, positions, flash_blocks):
    """The flash block core's glue, against flash-attn-4's calling contract (a stand-in computing it by the reference
    math): whole blocks and causal diagonals go to flash_attn_func and _flash_attn_bwd with the final out and lse,
    blocks cut by documents to its FlexAttention core; the ring then matches the reference core."""
    calls = []
    _fake_flash_attn_4(monkeypatch, calls)
    core = FlashBlockCore(documents=FlexBlockCore())
    q, k, v, grad_out, _ = _inputs(case)
    results = []
    for block_core in (core, REFERENCE_CORE):
        x = [t.clone().requires_grad_() for t in (q, k, v)]
        out = ring_attention(*x, CommGroup.solo(), positions=positions, core=block_core)
        out.backward(grad_out)
        results.append([out.detach()] + [t.grad for t in x])
    for what, a, b in zip(("out", "dq", "dk", "dv"), *results):
        assert _rel(a, b) < 1e-5, f"{case} {what}: relative error {_rel(a, b):.2e}"
    assert calls == [("forward", c) for c in flash_blocks] + [("backward", c) for c in flash_blocks]


# ----------------------------------------------------------------------------------- selection by attention_core


def test_attention_core_picks_the_ring_block_core():
    assert ring_block_core_name("sdpa", cuda=False) == "reference"
    assert ring_block_core_name("sdpa", cuda=True) == "flex"
    assert [ring_block_core_name(n, cuda=c) for n in ("flex", "reference", "flash") for c in (False, True)] == [
        "flex", "flex", "reference", "reference", "flash", "flash"]
    with pytest.raises(ValueError, match=r"'te' cannot run under layout.ring.*no log-sum-exp.*'auto', 'flash'"):
        ring_block_core_name("te", cuda=True)
    with pytest.raises(ValueError, match=r"'auto' under layout.ring.*resolve_auto_core"):
        ring_block_core_name("auto", cuda=True)
    if not torch.cuda.is_available():
        assert build_ring_block_core("sdpa") is REFERENCE_CORE
    assert isinstance(build_ring_block_core("flex"), FlexBlockCore)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where no GPU is visible")
def test_flash_ring_core_is_refused_without_flash_attn_4_on_a_gpu():
    with pytest.raises(FlashAttentionUnavailable, match=r"'flash' under layout.ring needs flash-attn-4.*'flex'"):
        build_ring_block_core("flash")


def test_ring_only_cores_are_refused_without_a_ring():
    with pytest.raises(ValueError, match=r"'flex' is a ring block core: it runs only under layout.ring > 1"):
        build_attention_core("flex", 4, 2, 16)
    cfg = GPTConfig(vocab_size=11, hidden_size=32, num_layers=1, num_heads=4, intermediate_size=48,
                    attention_core="reference")
    with pytest.raises(ValueError, match=r"'reference' is a ring block core"):
        GPT(cfg)


# ------------------------------------------------------------------------------------------------ model parity

MODEL = GPTConfig(vocab_size=101, hidden_size=64, num_layers=2, num_heads=8, num_kv_heads=2, intermediate_size=96)


def _model_parity(rank, world, layout):
    """The ring model with the flex core against one device with SDPA: loss and every gradient."""
    batch = make_batch(MODEL, batch=2, seq=30, packed=True, ignore_tail=5)
    flex = dataclasses.replace(MODEL, attention_core="flex")
    return compare(reference(MODEL, batch), sharded(flex, layout, batch))


@pytest.mark.parametrize("layout,world", [(ParallelLayout(ring=2), 2), (ParallelLayout(sp=2, ring=2), 4)],
                         ids=["ring2", "sp2-ring2"])
def test_ring_model_with_the_flex_core_matches_one_device(layout, world):
    for loss_err, grad_err, name in run_ranks(_model_parity, world, layout, timeout=300.0):
        assert loss_err < 1e-6
        assert grad_err < 1e-5, name


# ---------------------------------------------------------------------------------------------------------- GPU


def _gpu_cores():
    cores = [("flex", FlexBlockCore())]
    try:
        cores.append(("flash", build_ring_block_core("flash")))
    except FlashAttentionUnavailable:
        pass
    return cores


@pytest.mark.gpu
@pytest.mark.parametrize("packed", [False, True], ids=["causal", "packed"])
def test_fused_ring_cores_match_the_reference_in_bf16_on_gpu(packed):
    """Compiled FlexAttention and flash-attn-4 (when it imports) as the ring's block core, bf16, 2 x 1024 tokens,
    8 q / 2 kv heads of 128, against the fp32 reference core: out and every gradient."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(2, 1024, 8, 128, device="cuda", generator=g)
    k, v = (torch.randn(2, 1024, 2, 128, device="cuda", generator=g) for _ in range(2))
    grad_out = torch.randn(2, 1024, 8, 128, device="cuda", generator=g)
    positions = None
    if packed:
        positions = torch.cat([torch.arange(300), torch.arange(500), torch.arange(224)]).cuda().expand(2, -1)
    results = {}
    for name, core in [("reference", REFERENCE_CORE)] + _gpu_cores():
        x = [t.bfloat16().requires_grad_() for t in (q, k, v)]
        out = ring_attention(*x, CommGroup.solo(), positions=positions, core=core)
        out.backward(grad_out.bfloat16())
        results[name] = [out.detach().float()] + [t.grad.float() for t in x]
    for name in results.keys() - {"reference"}:
        for what, a, b, tolerance in zip(("out", "dq", "dk", "dv"), results[name], results["reference"],
                                         (2e-2, 3e-2, 3e-2, 3e-2)):  # as the ring's bf16 test in test_ring.py
            assert _rel(a, b) < tolerance, f"{name} {what}: relative error {_rel(a, b):.2e}"


def _bench_ring_module():
    path = Path(__file__).resolve().parents[1] / "scripts" / "bench_ring.py"
    spec = importlib.util.spec_from_file_location("bench_ring", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.gpu
@pytest.mark.parametrize("doc_len", [0, 320], ids=["causal", "packed"])
def test_fused_ring_cores_over_four_simulated_ranks_match_the_reference_in_bf16_on_gpu(doc_len):
    """Four ring ranks on one GPU (scripts/bench_ring.py's SimulatedRing: ring.py's own steps and plans), 2048 tokens,
    bf16: every step's blocks through flex / flash-attn-4 and the reference core; out and every gradient."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    bench = _bench_ring_module()
    args = argparse.Namespace(heads=8, kv_heads=2, head_dim=128, doc_len=doc_len)
    q, k, v, grad_out, doc_ids = bench.inputs(args, 2048, torch.device("cuda"), torch.bfloat16)
    want = bench.SimulatedRing(REFERENCE_CORE, q, k, v, 4, doc_ids, 128 ** -0.5).run(grad_out)
    for name, core in _gpu_cores():
        got = bench.SimulatedRing(core, q, k, v, 4, doc_ids, 128 ** -0.5).run(grad_out)
        for what, a, b, tolerance in zip(("out", "dq", "dk", "dv"), got, want, (2e-2, 3e-2, 3e-2, 3e-2)):
            assert _rel(a, b) < tolerance, f"{name} {what}: relative error {_rel(a, b):.2e}"
