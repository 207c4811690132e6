"""How much memory one rank may plan for: the device's (less what the CUDA context, NCCL and the allocator's
fragmentation take) and its share of the host's, on this machine or on a named device."""
from __future__ import annotations

import os
from typing import Optional

from megalysses.config import RunConfig

from .memory import GIB
from .search import Capacity
from .speed import device_rates

DEVICE_RESERVE = (0.94, 1 * GIB)
"""Usable device memory = 0.94 x total - 1 GiB: the CUDA context, cuBLAS workspaces and NCCL buffers live outside
the caching allocator, and fragmentation costs a few percent at the peak."""
HOST_SHARE = 0.8
"""Share of host RAM the ranks of one machine may plan for (the OS, data loaders and page cache keep the rest)."""


def host_ram() -> Optional[int]:
    """Physical memory of this machine in bytes (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def usable_device(total: int) -> int:
    scale, reserve = DEVICE_RESERVE
    return int(total * scale - reserve)


def capacity_for_device(device: str = "h200", gpu_memory_gib: Optional[float] = None,
                        host_memory_gib: Optional[float] = None, ranks_per_host: Optional[int] = None) -> Capacity:
    """A named device's capacity per rank (rates.yaml), with the memory sizes overridable."""
    rates = device_rates(device)
    gpus = int(rates["gpus_per_node"]) if ranks_per_host is None else ranks_per_host
    gpu = float(rates["memory_gib"]) if gpu_memory_gib is None else gpu_memory_gib
    host = float(rates["host_memory_gib"]) * gpus if host_memory_gib is None else host_memory_gib
    return Capacity(usable_device(int(gpu * GIB)), int(host * GIB * HOST_SHARE / gpus), device, gpus)


def capacity_for_run(cfg: RunConfig, world: int) -> Capacity:
    """This machine's capacity per rank for cfg: the visible GPU's memory under train.device=cuda (its rates from its
    name), else the host RAM shared by the local ranks (on CPU the 'device' is the host)."""
    ram = host_ram()
    if cfg.train.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            return capacity_for_device("h200", ranks_per_host=min(world, 8))
        props = torch.cuda.get_device_properties(0)
        device = "h100" if "H100" in props.name else "h200"
        local = min(world, torch.cuda.device_count())
        host = None if ram is None else int(ram * HOST_SHARE / local)
        return Capacity(usable_device(props.total_memory), host, device, local)
    local = min(world, cfg.train.nproc) if os.environ.get("LOCAL_WORLD_SIZE") is None else \
        int(os.environ["LOCAL_WORLD_SIZE"])
    per_rank = None if ram is None else int(ram * HOST_SHARE / max(1, local))
    return Capacity(per_rank, None, "h200", local,
                    label=f"cpu (host RAM shared by {local} rank{'s' if local > 1 else ''}; speed at H200 rates)",
                    host_is_device=True)
