"""Pipeline schedules, proved by simulation over a large grid: no deadlock, no unmatched or misordered message,
and the ideal bubble with unit compute times. Pure Python, no ranks: well under a second."""
import pytest

from megalysses.parallel import LayoutError, ParallelLayout
from megalysses.parallel.pipeline import (SCHEDULES, Action, PipelineHangError, ScheduleError, ideal_bubble_fraction,
                                          micro_batch_count, plan_rank, plan_steps, schedule_actions, simulate, simulate_steps,
                                          stage_layer_ids)


def grid():
    """Every valid (schedule, pp, vpp, micro-batches) with pp 1..8, vpp 1..4, micro-batches 1..16."""
    for name in SCHEDULES:
        for pp in range(1, 9):
            for vpp in (range(1, 5) if name == "interleaved-1f1b" else [1]):
                for m in range(1, 17):
                    if name == "interleaved-1f1b" and vpp > 1 and (pp == 1 or m % pp):
                        continue
                    yield name, pp, vpp, m


def test_every_schedule_on_the_grid_finishes_matched_and_at_the_ideal_bubble():
    cases = list(grid())
    assert len(cases) == 2 * 8 * 16 + 8 * 16 + sum(3 * (16 // pp) for pp in range(2, 9))  # 462
    for name, pp, vpp, m in cases:
        timeline = simulate(name, pp, vpp, m)  # raises PipelineHangError on deadlock or a channel mismatch
        assert [len(events) for events in timeline.events] == [2 * vpp * m] * pp
        assert timeline.bubble_fraction == pytest.approx(ideal_bubble_fraction(name, pp, vpp, m), abs=1e-12), \
            (name, pp, vpp, m)
        simulate(name, pp, vpp, m, forwards_only=True)  # the evaluation pass
        simulate(name, pp, vpp, m, duration=lambda a: 1.0 if a.kind == "F" else 2.0)  # backward twice as long
        if vpp == 1:  # also where a send completes only with its batch (NCCL)
            simulate(name, pp, vpp, m, coalesced=True)


@pytest.mark.parametrize("name,pp,vpp,m", [(n, pp, vpp, m) for n, pp, vpp, m in grid() if pp <= 4 and m <= 8])
def test_every_micro_batch_goes_forward_then_backward_through_every_chunk(name, pp, vpp, m):
    for rank in range(pp):
        actions = schedule_actions(name, pp, vpp, m, rank)
        assert sorted(actions, key=lambda a: (a.kind, a.chunk, a.mb)) == sorted(
            [Action(k, c, mb) for k in "FB" for c in range(vpp) for mb in range(m)], key=lambda a: (a.kind, a.chunk, a.mb))
        for a in actions:
            if a.kind == "B":
                assert actions.index(Action("F", a.chunk, a.mb)) < actions.index(a)


def test_timelines_print_one_row_per_rank():
    assert simulate("gpipe", 2, 1, 3).format() == (
        "gpipe: pp=2 vpp=1 micro_batches=3  bubble 0.333 (ideal 0.333)\n"
        "rank 0 | F0 F1 F2 .  .  B0 B1 B2\n"
        "rank 1 | .  F0 F1 F2 B0 B1 B2 .")
    assert simulate("1f1b", 2, 1, 3).format().splitlines()[1:] == [
        "rank 0 | F0 F1 .  B0 F2 B1 .  B2",
        "rank 1 | .  F0 B0 F1 B1 F2 B2 ."]
    print(simulate("interleaved-1f1b", 2, 2, 4).format())


def test_interleaved_is_refused_where_batches_complete_as_a_whole():
    assert len(plan_rank("interleaved-1f1b", 2, 2, 4, 0)) == 16  # gloo: sends complete on their own
    assert len(plan_rank("interleaved-1f1b", 2, 2, 4, 0, backward=False, coalesced=True)) == 8
    with pytest.raises(PipelineHangError, match=r"interleaved-1f1b with pp=2 vpp=2 micro_batches=4 would deadlock "
                                                r"where a batch .* \(NCCL\): deadlock: rank 0 at F3 waits for rank 1 to "
                                                r"receive .*Use schedule '1f1b' or 'gpipe'"):
        plan_rank("interleaved-1f1b", 2, 2, 4, 0, coalesced=True)


def test_simulation_catches_a_deadlock_and_a_misordered_channel():
    steps = [plan_steps(schedule_actions("1f1b", 2, 1, 2, r), r, 2, 1) for r in range(2)]
    with pytest.raises(PipelineHangError, match=r"deadlock: rank 0 at B1 waits for .*'grad'.* from rank 1; "
                                                r"rank 1 at F0 waits for .*'act'.* from rank 0"):
        simulate_steps([steps[0][::-1], steps[1]])  # rank 0 starts with a backward: waits forever
    with pytest.raises(PipelineHangError, match=r"expects Message\(kind='act', stage=1, mb=0\) as receive #0 from "
                                                r"rank 0, but send #0 on that channel is .*mb=1"):
        swapped = [Action("F", 0, 1), Action("F", 0, 0), Action("B", 0, 0), Action("B", 0, 1)]
        simulate_steps([plan_steps(swapped, 0, 2, 1), steps[1]])


@pytest.mark.parametrize("call,match", [
    (lambda: schedule_actions("interleaved-1f1b", 4, 2, 6, 0),
     r"micro_batches = 6 is not a multiple of pp = 4"),
    (lambda: schedule_actions("interleaved-1f1b", 1, 2, 4, 0), r"vpp = 2 needs pp >= 2"),
    (lambda: schedule_actions("1f1b", 2, 2, 4, 0), r"schedule '1f1b' runs one chunk per rank but vpp = 2"),
    (lambda: schedule_actions("zero-bubble", 2, 1, 4, 0), r"schedule 'zero-bubble' is unknown"),
    (lambda: schedule_actions("gpipe", 2, 1, 0, 0), r"micro_batches = 0 must be an integer >= 1"),
    (lambda: schedule_actions("gpipe", 2, 1, 4, 2), r"pipeline rank 2 is outside 0..1"),
    (lambda: micro_batch_count(10, 2, 2), r"global batch 10 is not divisible by micro_batch_size \* dp = 2 \* 2 = 4"),
    (lambda: micro_batch_count(16, 2, 2, configured=2), r"layout.micro_batches = 2 but .* gives 4 micro-batches"),
])
def test_clear_errors(call, match):
    with pytest.raises(ScheduleError, match=match):
        call()


def test_layers_per_virtual_stage():
    assert stage_layer_ids(ParallelLayout(pp=2, vpp=2, schedule="interleaved-1f1b"), 8) == [
        [0, 1], [2, 3], [4, 5], [6, 7]]
    assert stage_layer_ids(ParallelLayout(pp=2, stage_layers=[3, 1]), 4) == [[0, 1, 2], [3]]
    assert micro_batch_count(16, 2, 2) == 4
    with pytest.raises(LayoutError, match=r"6 layers do not split evenly into pp \* vpp = 2 \* 2 = 4 stages"):
        stage_layer_ids(ParallelLayout(pp=2, vpp=2, schedule="interleaved-1f1b"), 6)
    with pytest.raises(LayoutError, match=r"stage_layers = \[4, 0\] sums to 4 .* every stage needs at least one"):
        stage_layer_ids(ParallelLayout(pp=2, stage_layers=[4, 0]), 4)
