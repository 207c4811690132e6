"""Ring attention reproduces single-device causal attention (torch SDPA) and its q/k/v gradients (fp32, gloo ranks).

Cases: one document per row, packed documents (positions resetting, documents crossing chunk and rank boundaries,
one-token documents), GQA with h=4 over hk=2 and hk=1, and a length 2R does not divide (30 tokens, padded to a
multiple of 2R at the end; the causal mask hides the padding from every real token, which is what the data path
relies on: ring_shard itself refuses an undivided length). The sp x ring hybrid (Ulysses all-to-all inside, the ring
across) runs the same cases on 2x2 and 2x4 / 4x2 ranks; hk=2 and hk=1 are then kv heads below the Ulysses degree.
"""
import importlib.util
from pathlib import Path

import pytest
import torch

from megalysses.models.cores import Documents, sdpa_attention
from megalysses.parallel import ParallelLayout, ParallelMesh
from megalysses.parallel import collectives as C
from megalysses.parallel.collectives import CommGroup
from megalysses.parallel.launch import run_ranks
from megalysses.parallel.sequence import (gather_sequence_ids, pad_sequence_batch, ring_attention, ring_core,
                                          ring_masks, ring_shard, ring_unshard, shard_ring_sequence,
                                          ulysses_attention)
from megalysses.parallel.sequence.ring import REFERENCE_CORE, RingMasks, causal_chunk_pairs, document_ids, ring_chunks

HEADS, DIM, BATCH = 4, 8, 2

CASES = {  # name: (kv heads, sequence length, packed)
    "causal": (4, 32, False),
    "packed": (4, 32, True),
    "gqa-hk2": (2, 32, True),
    "gqa-hk1": (1, 32, False),
    "uneven": (2, 30, True),
}


def _packed_positions(seq: int, seed: int) -> torch.Tensor:
    """(BATCH, seq) positions resetting at random document starts (lengths 1 to 11)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(BATCH):
        row = []
        while len(row) < seq:
            row += list(range(int(torch.randint(1, 12, (1,), generator=g))))
        rows.append(row[:seq])
    return torch.tensor(rows)


def _inputs(case: str):
    """Whole-sequence q, k, v, output gradient and positions (None: one document per row)."""
    kv_heads, seq, packed = CASES[case]
    g = torch.Generator().manual_seed(7)
    q = torch.randn(BATCH, seq, HEADS, DIM, generator=g)
    k, v = (torch.randn(BATCH, seq, kv_heads, DIM, generator=g) for _ in range(2))
    grad_out = torch.randn(BATCH, seq, HEADS, DIM, generator=g)
    return q, k, v, grad_out, (_packed_positions(seq, 3) if packed else None)


def _reference(q, k, v, grad_out, positions):
    """Single-device SDPA with an explicit (causal, per-document) mask: output and (dq, dk, dv)."""
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    docs = Documents.from_positions(positions) if positions is not None else None
    out = sdpa_attention(q, k, v, docs=docs)
    out.backward(grad_out)
    return out.detach(), (q.grad, k.grad, v.grad)


def _pad(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zeros after the sequence (dim 1) up to a multiple."""
    pad = -x.shape[1] % multiple
    return torch.cat([x, x.new_zeros((x.shape[0], pad) + tuple(x.shape[2:]))], dim=1)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach() - b).abs().max() / b.abs().max())


def ring_run(world: int, case: str, core=REFERENCE_CORE) -> list[torch.Tensor]:
    """Ring attention on `world` ring ranks (call on each): whole-sequence out, dq, dk, dv (padding dropped)."""
    group = ParallelMesh(ParallelLayout(sp=world)).group("sp")
    q, k, v, grad_out, positions = _inputs(case)
    seq, multiple = q.shape[1], 2 * world
    if positions is None:
        positions = torch.arange(seq).expand(BATCH, seq)
    ids = torch.zeros(BATCH, seq, dtype=torch.long)
    _, _, positions = pad_sequence_batch(ids, ids, positions, multiple)  # the data path's padding
    shards = [ring_shard(_pad(t, multiple), group).requires_grad_() for t in (q, k, v)]
    out = ring_attention(*shards, group, positions=ring_shard(positions, group), core=core)
    out.backward(ring_shard(_pad(grad_out, multiple), group))
    return [ring_unshard(t, group)[:, :seq] for t in [out.detach()] + [s.grad for s in shards]]


def _ring_case(rank, world, case):
    ref_out, ref_grads = _reference(*_inputs(case))
    return [_rel(a, b) for a, b in zip(ring_run(world, case), [ref_out, *ref_grads])]


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("world", [2, 4])
def test_ring_matches_single_device(world, case):
    for rank, errors in enumerate(run_ranks(_ring_case, world, case)):
        for name, err in zip(("out", "dq", "dk", "dv"), errors):
            assert err < 1e-5, f"rank {rank} {name}: relative error {err:.2e}"


def hybrid_run(world: int, sp: int, case: str, core=REFERENCE_CORE) -> list[torch.Tensor]:
    """sp x ring (call on each rank): shards as the data path cuts them (ring zig-zag, then sp), Ulysses around the
    ring core -> whole-sequence out, dq, dk, dv."""
    mesh = ParallelMesh(ParallelLayout(sp=sp, ring=world // sp))
    ring, sp_group = mesh.group("ring"), mesh.group("sp")
    q, k, v, grad_out, positions = _inputs(case)
    seq, multiple = q.shape[1], mesh.layout.sequence_unit
    if positions is None:
        positions = torch.arange(seq).expand(BATCH, seq)
    ids = torch.zeros(BATCH, seq, dtype=torch.long)
    _, _, positions = pad_sequence_batch(ids, ids, positions, multiple)
    shard = lambda t: shard_ring_sequence(t, ring, sp_group)  # noqa: E731
    shards = [shard(_pad(t, multiple)).requires_grad_() for t in (q, k, v)]
    ring_positions = gather_sequence_ids(shard(positions), sp_group)  # this ring rank's zig-zag shard
    masks = ring_masks(ring, ring_positions.shape[1], ring_positions)
    out = ulysses_attention(ring_core(ring, core), *shards, sp_group, docs=masks)
    out.backward(shard(_pad(grad_out, multiple)))
    unshard = lambda t: ring_unshard(C.all_gather(t.contiguous(), sp_group, dim=1), ring)[:, :seq]  # noqa: E731
    return [unshard(t) for t in [out.detach()] + [s.grad for s in shards]]


def _hybrid_case(rank, world, sp, case):
    ref_out, ref_grads = _reference(*_inputs(case))
    return [_rel(a, b) for a, b in zip(hybrid_run(world, sp, case), [ref_out, *ref_grads])]


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("sp,world", [(2, 4), (2, 8), (4, 8)], ids=["sp2-ring2", "sp2-ring4", "sp4-ring2"])
def test_sp_by_ring_matches_single_device(sp, world, case):
    for rank, errors in enumerate(run_ranks(_hybrid_case, world, sp, case)):
        for name, err in zip(("out", "dq", "dk", "dv"), errors):
            assert err < 1e-5, f"rank {rank} {name}: relative error {err:.2e}"


def test_one_rank_ring_is_plain_attention():
    q, k, v, grad_out, positions = _inputs("gqa-hk2")
    ref_out, ref_grads = _reference(q, k, v, grad_out, positions)
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    out = ring_attention(q, k, v, CommGroup.solo(), positions=positions)
    out.backward(grad_out)
    assert _rel(out.detach(), ref_out) < 1e-5
    assert all(_rel(a, b) < 1e-5 for a, b in zip((q.grad, k.grad, v.grad), ref_grads))


def _fake_group(rank: int, ranks: int) -> CommGroup:
    return CommGroup(pg=None, ranks=tuple(range(ranks)), rank=rank)


def test_zig_zag_shards_hold_mirrored_chunks():
    x = torch.arange(16).view(1, 16)  # 8 chunks of 2 over 4 ranks
    assert ring_shard(x, _fake_group(0, 4)).tolist() == [[0, 1, 14, 15]]
    assert ring_shard(x, _fake_group(2, 4)).tolist() == [[4, 5, 10, 11]]


def test_ring_shard_refuses_a_length_2r_does_not_divide():
    with pytest.raises(ValueError, match=r"length 30 is not divisible by 2 \* ring ranks = 8.*multiple=8"):
        ring_shard(torch.zeros(1, 30), _fake_group(0, 4))


def _pairs(masks: RingMasks, src: int) -> int:
    return sum(block.shape[0] * block.shape[1] for block in masks.plan(src))


def test_causal_work_is_balanced_over_ranks_and_steps():
    """Every rank computes the same number of (query, key) pairs at each ring step (chunk 4, 4 ranks)."""
    ranks, chunk = 4, 4
    for step in range(ranks):
        work = {_pairs(RingMasks(r, ranks, chunk), (r - step) % ranks) for r in range(ranks)}
        assert work == ({3 * chunk * chunk} if step == 0 else {2 * chunk * chunk}), (step, work)


def test_causal_chunk_pairs_cover_exactly_the_causal_mask():
    """The mask-free plan (what a fused block core runs) allows exactly the pairs RingMasks allows, for every rank,
    step and ring size."""
    chunk = 3
    for ranks in (1, 2, 3, 4):
        for rank in range(ranks):
            for src in range(ranks):
                allowed = torch.zeros(2 * chunk, 2 * chunk, dtype=torch.bool)
                local = {c: i for i, c in enumerate(ring_chunks(rank, ranks))}, {
                    c: i for i, c in enumerate(ring_chunks(src, ranks))}
                for qc, kc, causal in causal_chunk_pairs(rank, src, ranks):
                    block = torch.ones(chunk, chunk, dtype=torch.bool)
                    qi, ki = local[0][qc] * chunk, local[1][kc] * chunk
                    allowed[qi:qi + chunk, ki:ki + chunk] = block.tril() if causal else block
                assert torch.equal(allowed, RingMasks(rank, ranks, chunk).mask(src, "cpu")[0]), (ranks, rank, src)


def test_blocks_no_document_crosses_are_skipped():
    """Documents that each fit inside one chunk: a rank attends only to its own k/v block."""
    ranks, chunk = 2, 4
    doc_ids = document_ids(torch.arange(4 * chunk).remainder(chunk).view(1, -1))  # resets at every chunk start
    for r in range(ranks):
        masks = RingMasks(r, ranks, chunk, doc_ids)
        assert _pairs(masks, r) == 2 * chunk * chunk  # each query chunk against its own chunk only
        assert masks.plan((r + 1) % ranks) == []


def test_positions_must_be_the_local_shard():
    with pytest.raises(ValueError, match=r"positions must be this rank's \(b, 4\) zig-zag shard"):
        ring_masks(CommGroup.solo(), 4, torch.zeros(1, 8, dtype=torch.long))


def test_bf16_inputs_keep_their_dtype_and_stay_close():
    """The block core and the merge run in fp32 whatever the input dtype; outputs and gradients come back in it."""
    q, k, v, grad_out, positions = _inputs("packed")
    ref_out, ref_grads = _reference(q, k, v, grad_out, positions)
    q, k, v = (t.bfloat16().requires_grad_() for t in (q, k, v))
    out = ring_attention(q, k, v, CommGroup.solo(), positions=positions)
    out.backward(grad_out.bfloat16())
    assert out.dtype == q.grad.dtype == k.grad.dtype == torch.bfloat16
    assert _rel(out.float(), ref_out) < 2e-2
    assert all(_rel(a.float(), b) < 3e-2 for a, b in zip((q.grad, k.grad, v.grad), ref_grads))


@pytest.mark.parametrize("doc_len", [0, 24], ids=["one-document", "packed"])
def test_ring_benchmark_runs_on_cpu_and_its_ring_reproduces_the_fused_core(capsys, doc_len):
    """scripts/bench_ring.py --tiny: every (S, R, core) row is measured, forward and forward + backward, and its
    simulated ring (ring.py's own steps and block cores) matches the fused call's output and gradients."""
    path = Path(__file__).resolve().parents[1] / "scripts" / "bench_ring.py"
    spec = importlib.util.spec_from_file_location("bench_ring", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--tiny", "--rings", "2,4", "--cores", "reference,flex", "--doc-len", str(doc_len),
                       "--iters", "1", "--warmup", "0"]) == 0
    rows = [line.strip("| ").split(" | ") for line in capsys.readouterr().out.splitlines() if line.startswith("| 64")
            or line.startswith("| 256")]
    assert [tuple(r[:3]) for r in rows] == [(s, r, c) for s in ("64", "256") for c in ("reference", "flex")
                                            for r in ("2", "4")]
    assert all(len(r) == 12 and float(r[-1]) < 1e-5 and float(r[-2]) < 1e-5 for r in rows), rows
    assert all(r[5] == "-" for r in rows) == bool(doc_len)  # SDPA only without documents
