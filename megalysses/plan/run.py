"""The planner at the start of a run: memory 'auto' resolved to the fastest choice predicted to fit this machine,
and a config predicted not to fit refused before any rank starts (with the breakdown and the nearest fit)."""
from __future__ import annotations

import dataclasses
from typing import Sequence

from megalysses.config import RunConfig

from .capacity import capacity_for_run
from .search import check_fits, resolve_auto


def prepare_run(cfg: RunConfig, world: int, seq_lens: Sequence[int] = (), check: bool = True
                ) -> tuple[RunConfig, str]:
    """(cfg with memory resolved, why it was chosen or ''); raises ConfigError when the run is predicted not to fit
    (at each of seq_lens too) and `check` is on. On CPU the capacity is this machine's RAM shared by the ranks."""
    capacity = capacity_for_run(cfg, world)
    cfg, why = resolve_auto(cfg, world, capacity, require_fit=check)
    if check:
        for seq_len in seq_lens or [cfg.train.seq_len]:
            check_fits(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seq_len=seq_len)), world,
                       capacity)
    return cfg, why
