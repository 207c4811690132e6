"""DistributedOptimizer: fp32 master weights + optimizer state for the gradient elements this rank owns (ZeRO-1)."""
from __future__ import annotations

from typing import Any, Iterable, Optional

import torch

from .. import collectives as C
from .buffers import Bucket, Segment
from .grads import local_values
from .sync import GradSync


class DistributedOptimizer:
    """A torch optimizer (AdamW by default) stepping fp32 master copies of the elements this rank owns.

    With a sharding GradSync (ZeRO-1, Rajbhandari et al.) each of the N dp x sp ranks owns chunk r of every bucket:
    the reduce-scattered gradient, the master weights and the optimizer state exist for 1/N of the model only, and
    after step() the updated chunks are cast to the parameter dtype and all-gathered into every rank's model.
    Without sharding it is the mixed-precision optimizer: fp32 masters of the whole model, copied into (e.g. bf16)
    parameters after each step.

    The inner optimizer sees one flat tensor per run of owned elements that share a parameter group, aliasing the
    master chunk and the main-gradient buffer; elementwise optimizers (Adam, AdamW, SGD) then update each element
    exactly as they would on the whole parameter. Norm/statistics optimizers (LAMB, Shampoo) would not.
    """

    def __init__(self, param_groups: Iterable[dict[str, Any]], grad_sync: GradSync,
                 optimizer_cls: type = torch.optim.AdamW, param_dtype: Optional[torch.dtype] = None, **defaults):
        self.sync = grad_sync
        param_groups = list(param_groups)
        group_of = {id(p): i for i, g in enumerate(param_groups) for p in g["params"]}
        synced = {id(p) for p in grad_sync.params}
        if set(group_of) != synced:
            raise ValueError(f"DistributedOptimizer: the parameter groups hold {len(group_of)} tensors but the "
                             f"GradSync holds {len(synced)} ({len(set(group_of) - synced)} only in the groups, "
                             f"{len(synced - set(group_of))} only in the GradSync): build both from the same "
                             "model.parameters() (requires_grad only)")
        self._segments = grad_sync.owned_segments()
        self._masters: dict[Bucket, torch.Tensor] = {}  # bucket -> fp32 owned chunk (hi - lo,)
        for bucket in grad_sync.buckets:
            lo, hi = grad_sync.owned_range(bucket)
            self._masters[bucket] = torch.zeros(hi - lo, dtype=torch.float32, device=grad_sync.params[0].device)
        with torch.no_grad():
            for seg in self._segments:
                values = seg.param.detach().reshape(-1)[seg.param_lo:seg.param_hi]
                self.master(seg.bucket, seg.lo, seg.hi).copy_(values)
        inner_groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": []} for g in param_groups]
        for first, last, group in self._runs(group_of):
            flat = torch.nn.Parameter(self.master(first.bucket, first.lo, last.hi))  # aliases the master chunk
            flat.grad = first.buffer.data[first.lo:last.hi]
            inner_groups[group]["params"].append(flat)
        self.optimizer = optimizer_cls(inner_groups, **defaults)
        if param_dtype is not None:  # masters keep the fp32 values; the model computes in param_dtype
            for p in grad_sync.params:
                p.data = p.data.to(param_dtype)

    def master(self, bucket: Bucket, lo: int, hi: int) -> torch.Tensor:
        """The fp32 master copy of buffer range [lo, hi) of an owned bucket chunk (a view)."""
        own_lo = self.sync.owned_range(bucket)[0]
        return self._masters[bucket][lo - own_lo:hi - own_lo]

    def _runs(self, group_of: dict[int, int]) -> list[tuple[Segment, Segment, int]]:
        """Maximal runs of adjacent owned segments in one bucket and one parameter group: (first, last, group)."""
        runs: list[list] = []
        for seg in self._segments:
            group = group_of[id(seg.param)]
            prev = runs[-1] if runs else None
            if prev and prev[1].bucket is seg.bucket and prev[1].hi == seg.lo and prev[2] == group:
                prev[1] = seg
            else:
                runs.append([seg, seg, group])
        return [tuple(r) for r in runs]

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The inner optimizer's groups (set group['lr'] here for schedules)."""
        return self.optimizer.param_groups

    @torch.no_grad()
    def step(self) -> None:
        """Update the owned masters from the (summed, clipped) main gradients, then refresh every parameter."""
        self.optimizer.step()
        if self.sync.shards == 1:
            for seg in self._segments:
                seg.param.detach().view(-1)[seg.param_lo:seg.param_hi].copy_(self.master(seg.bucket, seg.lo, seg.hi))
            return
        self._all_gather_params()

    def _all_gather_params(self) -> None:
        """Cast each bucket's updated chunk to the parameter dtype and all-gather it over dp x sp into the params."""
        gathers = []
        for bucket in self.sync.buckets:
            dtypes = {p.dtype for p in bucket.params}
            if len(dtypes) != 1:
                raise TypeError(f"bucket {bucket.index} mixes parameter dtypes {sorted(map(str, dtypes))}: cast the "
                                "whole model to one dtype (or pass param_dtype) before the first step")
            flat = torch.empty(bucket.end - bucket.start, dtype=dtypes.pop(), device=self._masters[bucket].device)
            lo, hi = self.sync.owned_range(bucket)
            flat[lo - bucket.start:hi - bucket.start].copy_(self._masters[bucket])
            gathers.append((bucket, flat, C.all_gather_flat_async(flat, self.sync.data_group)))
        for bucket, flat, pending in gathers:
            pending.wait()
            for p in bucket.params:
                _, start, end = self.sync.buffer_range(p)
                p.detach().view(-1).copy_(flat[start - bucket.start:end - bucket.start])

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the main gradients (the inner optimizer's gradients alias them)."""
        self.sync.zero_grad()

    def state_bytes(self, keys: Optional[Iterable[str]] = None) -> int:
        """Bytes of optimizer state on this rank (all of AdamW's exp_avg, exp_avg_sq, step, or those in `keys`)."""
        return optimizer_state_bytes(self.optimizer, keys)

    def master_bytes(self) -> int:
        """Bytes of fp32 master weights on this rank (padding included)."""
        return sum(m.numel() * m.element_size() for m in self._masters.values())


def optimizer_state_bytes(optimizer: torch.optim.Optimizer, keys: Optional[Iterable[str]] = None) -> int:
    """Bytes this rank holds in a torch optimizer's per-parameter state (DTensors: the local shard), over every
    state tensor or only those named in `keys` (e.g. AdamW's 'exp_avg', 'exp_avg_sq')."""
    keys = None if keys is None else set(keys)
    return sum(local_values(v).numel() * v.element_size() for state in optimizer.state.values()
               for k, v in state.items() if isinstance(v, torch.Tensor) and (keys is None or k in keys))
