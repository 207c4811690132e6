"""The rank launcher: results come back, a raising rank fails fast with its traceback, a hang fails in bounded time."""
import time

import pytest
import torch.distributed as dist

from megalysses.parallel.launch import RankFailure, run_ranks


def _rank_and_world(rank, world):
    return rank, world, dist.get_rank(), dist.get_world_size()


def _raise_on_rank_one(rank, world):
    if rank == 1:
        raise ValueError("boom on purpose")
    dist.barrier()  # rank 0 waits here for a rank that never comes


def _hang_on_rank_zero(rank, world):
    if rank == 0:
        time.sleep(600)
    return rank


def test_results_in_rank_order():
    assert run_ranks(_rank_and_world, 3) == [(r, 3, r, 3) for r in range(3)]


def test_raising_rank_fails_with_its_traceback():
    start = time.monotonic()
    with pytest.raises(RankFailure, match=r"(?s)rank 1 of 2 raised.*ValueError: boom on purpose"):
        run_ranks(_raise_on_rank_one, 2, timeout=60)
    assert time.monotonic() - start < 30


def test_hanging_rank_fails_with_stacks_after_timeout():
    start = time.monotonic()
    with pytest.raises(RankFailure, match=r"(?s)ranks \[0\] did not finish within 4 s.*_hang_on_rank_zero"):
        run_ranks(_hang_on_rank_zero, 2, timeout=4)
    assert time.monotonic() - start < 20
