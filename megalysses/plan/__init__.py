"""megalysses.plan: what a run will use and how fast it will go, before it starts; and the fastest settings that fit.

    plan = plan_memory(cfg, world, device_capacity)        # one rank's bytes by term, device and host
    time = step_time(cfg, layout, plan.state, "h200")       # seconds by part, tokens/s, MFU
    cfg, why = resolve_auto(cfg, world, capacity)           # memory.* = 'auto' -> the fastest choice that fits
"""
from .capacity import capacity_for_run, capacity_for_device
from .memory import GIB, MemoryPlan, plan_memory
from .search import (Candidate, Capacity, best_savers, check_fits, evaluate, longest_sequence, nearest_fit,
                     resolve_auto, search)
from .speed import StepTime, device_rates, step_time
from .state import StateBytes, state_bytes

__all__ = ["GIB", "Candidate", "Capacity", "MemoryPlan", "StateBytes", "StepTime", "best_savers", "capacity_for_device",
           "capacity_for_run", "check_fits", "device_rates", "evaluate", "longest_sequence", "nearest_fit",
           "plan_memory", "resolve_auto", "search", "state_bytes", "step_time"]
