"""Pipeline parallelism on gloo ranks: every message arrives where the plan says, and GPT split into stages
reproduces the single-device loss and every gradient (fp32) under GPipe, 1F1B and interleaved 1F1B, with TP, SP, DP and
the ring, also with the lockstep rounds planned for NCCL.
"""
import pytest
import torch

from megalysses.parallel.tensor import param_info
from megalysses.models.config import GPTConfig
from megalysses.models.build import build_model
from megalysses.models.pipeline import run_pipeline_step
from megalysses.parallel import ParallelLayout, ParallelMesh
from megalysses.parallel import collectives as C
from megalysses.parallel.dp import all_reduce_gradients
from megalysses.parallel.launch import RankFailure, run_ranks
from megalysses.parallel.pipeline import plan_rank, plan_steps, rounds_of, run_rounds, schedule_actions
from megalysses.parallel.sequence import count_valid_tokens, pad_sequence_batch, shard_ring_sequence
from megalysses.parallel.tensor import gather_full
from parity import SEED, make_batch, reference

MICRO_BATCHES, MICRO_BATCH_SIZE, SEQ = 4, 1, 14  # 14: padded to 16 where sp x tp = 4
TIED = GPTConfig(vocab_size=61, hidden_size=32, num_layers=8, num_heads=4, num_kv_heads=2, intermediate_size=48,
                 tie_embeddings=True)
UNTIED = GPTConfig(**{**TIED.__dict__, "tie_embeddings": False})


# ------------------------------------------------------------------ messages: the plan holds on real ranks


class Tagged:
    """A Stage whose tensors carry their identity: each receive must hold exactly the message the plan names."""

    def __init__(self, stage: int, last: int, shape):
        self.stage, self.last, self.shape = stage, last, shape

    def _tag(self, kind: int, stage: int, mb: int) -> torch.Tensor:
        return torch.full(self.shape, float(kind * 10_000 + stage * 100 + mb))

    def forward(self, mb, x):
        if self.stage > 0:
            assert torch.equal(x, self._tag(1, self.stage, mb)), (self.stage, mb, x.flatten()[0].item())
        return self._tag(1, self.stage + 1, mb)

    def backward(self, mb, grad):
        if self.stage < self.last:
            assert torch.equal(grad, self._tag(2, self.stage, mb)), (self.stage, mb, grad.flatten()[0].item())
        return self._tag(2, self.stage - 1, mb)


def _tagged_runs(rank, world):
    runs = 0
    for pp in (2, 4):
        mesh = ParallelMesh(ParallelLayout(pp=pp))  # pp 2 on 4 ranks: two pipelines side by side (dp 2)
        me = mesh.rank("pp")
        ends = (mesh.stage_neighbour(-me), mesh.stage_neighbour(pp - 1 - me))  # my pipeline's first and last rank
        tied = mesh.embedding_group()
        assert tied.ranks == (ends if me in (0, pp - 1) else (rank,)), (tied.ranks, ends)
        assert C.all_reduce(torch.tensor([rank]), tied).item() == sum(tied.ranks)
        for name, vpps in (("gpipe", [1]), ("1f1b", [1]), ("interleaved-1f1b", [1, 2, 3])):
            for vpp in vpps:
                for m, lockstep in ((m, lockstep) for m in range(1, 7) for lockstep in (False, True)):
                    if vpp > 1 and m % pp:
                        continue
                    rounds = plan_rank(name, pp, vpp, m, me, coalesced=lockstep)
                    stages = [Tagged(c * pp + me, pp * vpp - 1, (2, 3)) for c in range(vpp)]
                    run_rounds(rounds, stages, mesh, torch.Size((2, 3)), torch.float32, torch.device("cpu"))
                    runs += 1
    return runs


def test_every_message_reaches_its_planned_receive_on_gloo():  # and the tied-embedding groups are right
    # every plan twice: each send posted with the next receive, and the lockstep rounds planned for NCCL
    assert run_ranks(_tagged_runs, 4) == [2 * sum(3 * 6 + 2 * (6 // pp) for pp in (2, 4))] * 4  # 88 runs


class WrongShape(Tagged):
    def forward(self, mb, x):
        return torch.zeros(3, 3)


def _wrong_boundary(rank, world):
    mesh = ParallelMesh(ParallelLayout(pp=2))
    me = mesh.rank("pp")
    steps = plan_steps(schedule_actions("1f1b", 2, 1, 2, me), me, 2, 1)  # the rounds of plain steps
    run_rounds(rounds_of(steps), [WrongShape(me, 1, (2, 3))], mesh, torch.Size((2, 3)), torch.float32, torch.device("cpu"))


def test_a_stage_output_off_the_boundary_shape_fails_fast():
    with pytest.raises(RankFailure, match=r"rank 0 of 2 raised:(.|\n)*F0 of virtual stage 0 produced \(3, 3\) "
                                          r"torch.float32 .* but the boundary is \(2, 3\) torch.float32"):
        run_ranks(_wrong_boundary, 2, timeout=30)  # rank 1 waits on its receive: the harness stops it


# ------------------------------------------------------------------ parity with the single-device model


def _micro_batches(batch, mesh: ParallelMesh):
    """The step's batch as this rank's micro-batches: rows by dp, sequence shard by ring and sp, then micro-batch
    rows."""
    dp, ring, sp = mesh.group("dp"), mesh.group("ring"), mesh.group("sp")
    ids, labels, pos = pad_sequence_batch(batch.input_ids, batch.labels, batch.position_ids, mesh.layout.sequence_unit)
    ids, pos, labels = (shard_ring_sequence(t.chunk(dp.size)[dp.rank], ring, sp) for t in (ids, pos, labels))
    return list(zip(*(t.split(MICRO_BATCH_SIZE) for t in (ids, pos, labels))))


def _pipeline_parity(rank, world, cfg, layout, coalesced=None):
    mesh = ParallelMesh(layout)
    chunks = list(build_model(cfg, mesh))
    for chunk in chunks:
        chunk.init_weights(SEED)
    batch = make_batch(cfg, MICRO_BATCHES * MICRO_BATCH_SIZE * mesh.size("dp"), SEQ, packed=True, ignore_tail=3)
    micro = _micro_batches(batch, mesh)
    total = count_valid_tokens(torch.cat([labels for _, _, labels in micro]), mesh.data_group())
    loss = run_pipeline_step(chunks, layout.schedule, micro, mesh, total, coalesced=coalesced)
    params = [p for chunk in chunks for p in chunk.parameters()]
    all_reduce_gradients(params, mesh)
    loss = C.all_reduce(loss, mesh.data_group()).item()
    grads = {n: gather_full(p.grad, param_info(p).shard, mesh.group("tp")).numpy()  # numpy: pickled by value, not by fd
             for c in chunks for n, p in c.canonical_parameters()}
    with torch.no_grad():  # the evaluation pass: forwards only, same loss
        evaluated = run_pipeline_step(chunks, layout.schedule, micro, mesh, total, backward=False, coalesced=coalesced)
    return loss, C.all_reduce(evaluated, mesh.data_group()).item(), grads


_REFERENCES = {}


def _reference(cfg, dp):
    key = (cfg.tie_embeddings, dp)
    if key not in _REFERENCES:
        batch = make_batch(cfg, MICRO_BATCHES * MICRO_BATCH_SIZE * dp, SEQ, packed=True, ignore_tail=3)
        _REFERENCES[key] = reference(cfg, batch)
    return _REFERENCES[key]


INTERLEAVED = dict(schedule="interleaved-1f1b", vpp=2)
LAYOUTS = [
    pytest.param(TIED, dict(pp=2, schedule="gpipe", stage_layers=[5, 3]), 2, id="pp2-gpipe-uneven"),
    pytest.param(TIED, dict(pp=2, schedule="1f1b"), 2, id="pp2-1f1b"),
    pytest.param(TIED, dict(pp=2, **INTERLEAVED), 2, id="pp2-interleaved"),
    pytest.param(UNTIED, dict(pp=4, schedule="gpipe"), 4, id="pp4-gpipe-untied"),
    pytest.param(TIED, dict(pp=4, schedule="1f1b"), 4, id="pp4-1f1b"),
    pytest.param(TIED, dict(pp=4, **INTERLEAVED), 4, id="pp4-interleaved"),
    pytest.param(TIED, dict(pp=2, tp=2, schedule="1f1b"), 4, id="pp2-tp2-1f1b"),
    pytest.param(UNTIED, dict(pp=2, tp=2, tp_sequence_parallel=True, **INTERLEAVED), 4, id="pp2-tp2-seqpar-interleaved"),
    pytest.param(TIED, dict(pp=2, dp=2, schedule="1f1b"), 4, id="pp2-dp2-1f1b"),
    pytest.param(TIED, dict(pp=2, sp=2, tp=2, **INTERLEAVED), 8, id="pp2-sp2-tp2-interleaved", marks=pytest.mark.slow),
    pytest.param(TIED, dict(pp=2, sp=2, tp=2, tp_sequence_parallel=True, schedule="1f1b"), 8,
                 id="pp2-sp2-tp2-seqpar-1f1b", marks=pytest.mark.slow),
    pytest.param(TIED, dict(pp=2, ring=2, schedule="1f1b"), 4, id="pp2-ring2-1f1b"),
    pytest.param(UNTIED, dict(pp=2, ring=2, tp=2, tp_sequence_parallel=True, **INTERLEAVED), 8,
                 id="pp2-ring2-tp2-seqpar-interleaved", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("cfg,layout,world", LAYOUTS)
def test_pipeline_matches_single_device(cfg, layout, world):
    _check_parity(cfg, ParallelLayout(**layout), world)


@pytest.mark.parametrize("layout,world", [(dict(pp=2), 2), (dict(pp=4), 4), (dict(pp=2, ring=2), 4)],
                         ids=["pp2", "pp4", "pp2-ring2"])
def test_lockstep_plan_for_nccl_matches_single_device_on_gloo(layout, world):
    """The lockstep rounds run_pipeline_step picks where p2p batches complete as a whole (NCCL), forced on gloo; with
    a ring, its k/v passes run inside each stage's rounds."""
    _check_parity(TIED, ParallelLayout(**layout, **INTERLEAVED), world, coalesced=True)


def _check_parity(cfg, layout, world, coalesced=None):
    ref_loss, ref_grads = _reference(cfg, layout.resolve(world).dp)
    results = run_ranks(_pipeline_parity, world, cfg, layout, coalesced)
    seen = set()
    for loss, evaluated, grads in results:
        assert abs(loss - ref_loss) / abs(ref_loss) < 1e-6, (loss, ref_loss)
        assert abs(evaluated - ref_loss) / abs(ref_loss) < 1e-6, (evaluated, ref_loss)
        for name, g in grads.items():
            err = ((torch.from_numpy(g) - ref_grads[name]).norm() / ref_grads[name].norm()).item()
            assert err < 1e-5, (name, err)
        seen |= grads.keys()
    assert seen == ref_grads.keys()  # every parameter lives on some stage


def test_one_stage_runs_in_process_and_checks_its_inputs():
    mesh = ParallelMesh.single_device()  # pp 1: one chunk with every layer, no communication
    chunks = list(build_model(TIED, mesh))
    chunks[0].init_weights(SEED)
    micro = _micro_batches(make_batch(TIED, MICRO_BATCHES * MICRO_BATCH_SIZE, SEQ, packed=True, ignore_tail=3), mesh)
    total = count_valid_tokens(torch.cat([labels for _, _, labels in micro]), mesh.data_group())
    loss = run_pipeline_step(chunks, "1f1b", micro, mesh, total).item()
    ref_loss, ref_grads = _reference(TIED, 1)
    assert abs(loss - ref_loss) / ref_loss < 1e-6
    for name, p in chunks[0].canonical_parameters():
        assert ((p.grad - ref_grads[name]).norm() / ref_grads[name].norm()).item() < 1e-5, name
    with pytest.raises(ValueError, match=r"2 model chunks on pipeline rank 0, but layout.vpp = 1"):
        run_pipeline_step(chunks * 2, "1f1b", micro, mesh, total)
    short = [tuple(t[:, :-2] for t in micro[1])]
    with pytest.raises(ValueError, match=r"micro-batch 1 has shapes \(1, 12\), .* but micro-batch 0 has \(1, 14\)"):
        run_pipeline_step(chunks, "1f1b", micro[:1] + short, mesh, total)
