"""Pipeline schedules, proved by simulation over a large grid: no deadlock, no unmatched or misordered message,
and the ideal bubble with unit compute times. Pure Python, no ranks: well under a second."""
import pytest

from megalysses.parallel import LayoutError, ParallelLayout
from megalysses.parallel.pipeline import (SCHEDULES, Action, Message, PipelineHangError, Round, ScheduleError,
                                          ideal_bubble_fraction, micro_batch_count, plan_rank, plan_steps,
                                          rounds_of, schedule_actions, simulate, simulate_rounds,
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


def test_lockstep_plans_finish_where_batches_complete_as_a_whole_on_the_grid():
    """NCCL completes a batch of sends and receives only as a whole: the lockstep plan (what plan_rank gives with
    coalesced=True) finishes every schedule on the grid, at the ideal bubble, also with uneven compute times."""
    for name, pp, vpp, m in grid():
        timeline = simulate(name, pp, vpp, m, coalesced=True)
        assert [len(events) for events in timeline.events] == [2 * vpp * m] * pp
        assert timeline.bubble_fraction == pytest.approx(ideal_bubble_fraction(name, pp, vpp, m), abs=1e-12), \
            (name, pp, vpp, m)
        simulate(name, pp, vpp, m, forwards_only=True, coalesced=True)
        simulate(name, pp, vpp, m, duration=lambda a: 1.0 if a.kind == "F" else 2.0, coalesced=True)
        simulate(name, pp, vpp, m, duration=lambda a: 1.0 + a.mb % 3 + a.chunk, coalesced=True)


@pytest.mark.parametrize("name,pp,vpp,m", [("interleaved-1f1b", 2, 2, 4), ("interleaved-1f1b", 4, 3, 8),
                                           ("interleaved-1f1b", 3, 2, 6), ("1f1b", 4, 1, 5), ("gpipe", 3, 1, 2)])
def test_lockstep_rounds_pair_every_send_with_its_receive_in_the_same_round(name, pp, vpp, m):
    plans = [plan_rank(name, pp, vpp, m, r, coalesced=True) for r in range(pp)]
    assert len({len(rounds) for rounds in plans}) == 1  # every rank runs the same rounds
    sends = sorted((i, r, dst, msg) for r, rounds in enumerate(plans) for i, rnd in enumerate(rounds)
                   for msg, dst in rnd.sends)
    recvs = sorted((i, src, r, msg) for r, rounds in enumerate(plans) for i, rnd in enumerate(rounds)
                   for msg, src in rnd.recvs)
    assert sends == recvs and len(sends) == 2 * (pp * vpp - 1) * m
    steps = [[rnd.step for rnd in rounds if rnd.step is not None] for rounds in plans]
    assert steps == [[rnd.step for rnd in plan_rank(name, pp, vpp, m, r) if rnd.step] for r in range(pp)]


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


def test_interleaved_posting_each_send_with_the_next_receive_deadlocks_where_batches_complete_as_a_whole():
    """Why NCCL gets the lockstep plan: posting each send with the next receive (rounds_of, fine on gloo) deadlocks
    interleaved 1F1B in 57 of the 78 grid cases once a send completes only with its batch."""
    interleaved = [(pp, vpp, m) for name, pp, vpp, m in grid() if vpp > 1]
    hangs = 0
    for pp, vpp, m in interleaved:
        try:
            simulate("interleaved-1f1b", pp, vpp, m, coalesced=True, lockstep=False)
        except PipelineHangError:
            hangs += 1
    assert (hangs, len(interleaved)) == (57, 78)
    with pytest.raises(PipelineHangError, match=r"deadlock: rank 0 at F3 waits for rank 1 to receive "):
        simulate("interleaved-1f1b", 2, 2, 4, coalesced=True, lockstep=False)
    assert len(plan_rank("interleaved-1f1b", 2, 2, 4, 0)) == 17  # gloo: 16 steps, then the last send
    assert len(plan_rank("interleaved-1f1b", 2, 2, 4, 0, coalesced=True)) == 19  # 18 time slots, then the last send
    assert len(plan_rank("interleaved-1f1b", 2, 2, 4, 0, backward=False, coalesced=True)) == 10  # 9 slots


def test_simulation_catches_a_deadlock_and_a_misordered_channel():
    steps = [plan_steps(schedule_actions("1f1b", 2, 1, 2, r), r, 2, 1) for r in range(2)]
    with pytest.raises(PipelineHangError, match=r"deadlock: rank 0 at B1 waits for .*'grad'.* from rank 1; "
                                                r"rank 1 at F0 waits for .*'act'.* from rank 0"):
        simulate_rounds([rounds_of(s) for s in (steps[0][::-1], steps[1])])  # rank 0 starts with a backward: waits forever
    with pytest.raises(PipelineHangError, match=r"expects Message\(kind='act', stage=1, mb=0\) as receive #0 from "
                                                r"rank 0, but send #0 on that channel is .*mb=1"):
        swapped = [Action("F", 0, 1), Action("F", 0, 0), Action("B", 0, 0), Action("B", 0, 1)]
        simulate_rounds([rounds_of(s) for s in (plan_steps(swapped, 0, 2, 1), steps[1])])
    early = [rounds_of(s) for s in steps]  # rank 1 runs F0 a round before it receives its input
    first, second = early[1][:2]
    early[1][:2] = [Round(step=first.step), Round(second.sends, first.recvs + second.recvs, second.step)]
    with pytest.raises(PipelineHangError, match=r"rank 1 round 0 \(F0\) needs Message\(kind='act', stage=1, mb=0\), "
                                                r"which no round up to this one receives"):
        simulate_rounds(early)
    with pytest.raises(PipelineHangError, match=r"deadlock: rank 0 in round 0 waits for rank 1 to receive .*'act'"):
        simulate_rounds([[Round(sends=((Message("act", 1, 0), 1),))], [Round()]], coalesced=True)  # never received
    with pytest.raises(PipelineHangError, match=r"channel 0 -> 1: 1 sends but 0 receives"):
        simulate_rounds([[Round(sends=((Message("act", 1, 0), 1),))], [Round()]])  # gloo: the send completes alone


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
