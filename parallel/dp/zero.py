"""DistributedOptimizer: fp32 master weights + optimizer state for the gradient elements this rank owns (ZeRO-1)."""
from __future__ import annotations

from typing import Any, Iterable, Iterator, Mapping, Optional

import torch

from .. import collectives as C
from .buffers import Bucket, Segment
from .grads import local_values
from .state import MOMENTS, check_state_shapes
from .sync import GradSync


class DistributedOptimizer:
    """A torch optimizer (AdamW by default) stepping fp32 master copies of the elements this rank owns.

    With a sharding GradSync (ZeRO-1, Rajbhandari et al.) each of the N dp x ring x sp ranks owns chunk r of every bucket:
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
        self._flats: list[tuple[Bucket, int, int, torch.nn.Parameter]] = []  # (bucket, lo, hi, inner param)
        for first, last, group in self._runs(group_of):
            flat = torch.nn.Parameter(self.master(first.bucket, first.lo, last.hi))  # aliases the master chunk
            flat.grad = first.buffer.data[first.lo:last.hi]
            inner_groups[group]["params"].append(flat)
            self._flats.append((first.bucket, first.lo, last.hi, flat))
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
        """Cast each bucket's updated chunk to the parameter dtype and all-gather it over dp x ring x sp into the params."""
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

    # ------------------------------------------------------------------------------------ checkpoint state

    @torch.no_grad()
    def param_states(self) -> Iterator[tuple[torch.nn.Parameter, dict[str, torch.Tensor]]]:
        """(param, {'master', 'exp_avg', 'exp_avg_sq': fp32 tensors shaped like the param, 'step': 0-d}) for every
        parameter, bucket by bucket; under ZeRO-1 each bucket's owned chunks are all-gathered over dp x ring x sp, so this
        is a collective: iterate it on every rank, in step. Before the first step the moments are 0 and step is 0."""
        step = self._step_count()
        for bucket in self.sync.buckets:
            flats = {key: self._bucket_values(bucket, key) for key in ("master", *MOMENTS)}
            for p in bucket.params:
                _, start, end = self.sync.buffer_range(p)
                state = {k: v[start - bucket.start:end - bucket.start].view(p.shape).clone() for k, v in flats.items()}
                yield p, {**state, "step": step.clone()}

    def state_dict(self) -> dict[str, Any]:
        """{'state': {i: param_states() entry of sync.params[i]}}: whole (dp x ring x sp-gathered, TP-local) tensors per
        parameter, so another ZeRO level or dp x ring x sp size can load it. A collective under ZeRO-1."""
        index = {id(p): i for i, p in enumerate(self.sync.params)}
        return {"state": {index[id(p)]: s for p, s in self.param_states()}}

    @torch.no_grad()
    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore from whole per-parameter tensors (the `state_dict()` form; `state` may be any mapping, read once
        per index, e.g. one that loads lazily): each rank keeps the masters and moments of the elements it owns and
        every parameter takes its master values (cast to its dtype). No communication."""
        states = state_dict["state"]
        moments = {id(flat): {k: torch.zeros_like(flat) for k in MOMENTS} for *_, flat in self._flats}
        runs = {}  # bucket index -> [(lo, hi, flat)]
        for bucket, lo, hi, flat in self._flats:
            runs.setdefault(bucket.index, []).append((lo, hi, flat))
        segments: dict[int, list[Segment]] = {}
        for seg in self._segments:
            segments.setdefault(id(seg.param), []).append(seg)
        steps = set()
        check_state_shapes("DistributedOptimizer", states, self.sync.params)
        for i, p in enumerate(self.sync.params):
            s = states[i]
            p.copy_(s["master"])
            for seg in segments.get(id(p), ()):
                self.master(seg.bucket, seg.lo, seg.hi).copy_(s["master"].reshape(-1)[seg.param_lo:seg.param_hi])
                lo, _, flat = next(r for r in runs[seg.bucket.index] if r[0] <= seg.lo < r[1])
                for key in MOMENTS:
                    moments[id(flat)][key][seg.lo - lo:seg.hi - lo].copy_(s[key].reshape(-1)[seg.param_lo:seg.param_hi])
            steps.add(float(s["step"]))
        if len(steps) > 1:
            raise ValueError(f"DistributedOptimizer.load_state_dict: the parameters have different step counts "
                             f"{sorted(steps)}: AdamW steps every parameter together; the state is inconsistent")
        step = steps.pop() if steps else 0.0
        for group in self.optimizer.param_groups:
            on_device = bool(group.get("fused") or group.get("capturable"))
            for flat in group["params"]:
                self.optimizer.state[flat] = {
                    "step": torch.tensor(step, dtype=torch.float32, device=flat.device if on_device else "cpu"),
                    **moments[id(flat)]}

    def _step_count(self) -> torch.Tensor:
        """The inner optimizer's step count (the same for every run; max over dp x ring x sp, as a rank may own none)."""
        steps = [float(s["step"]) for s in self.optimizer.state.values() if "step" in s]
        device = next(iter(self._masters.values())).device
        count = torch.tensor([max(steps, default=0.0)], dtype=torch.float64, device=device)
        if self.sync.shards > 1:
            C.all_reduce(count, self.sync.data_group, op="max")
        return torch.tensor(count.item(), dtype=torch.float32)

    def _bucket_values(self, bucket: Bucket, key: str) -> torch.Tensor:
        """The whole bucket's fp32 masters or one AdamW moment, (bucket.end - bucket.start,); padding is 0."""
        lo = self.sync.owned_range(bucket)[0]
        if key == "master":
            local = self._masters[bucket]
        else:
            local = torch.zeros_like(self._masters[bucket])
            for run_bucket, run_lo, run_hi, flat in self._flats:
                value = self.optimizer.state.get(flat, {}).get(key)
                if run_bucket is bucket and value is not None:
                    local[run_lo - lo:run_hi - lo].copy_(value)
        return local if self.sync.shards == 1 else C.all_gather(local, self.sync.data_group)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer, keys: Optional[Iterable[str]] = None) -> int:
    """Bytes this rank holds in a torch optimizer's per-parameter state (DTensors: the local shard), over every
    state tensor or only those named in `keys` (e.g. AdamW's 'exp_avg', 'exp_avg_sq')."""
    keys = None if keys is None else set(keys)
    return sum(local_values(v).numel() * v.element_size() for state in optimizer.state.values()
               for k, v in state.items() if isinstance(v, torch.Tensor) and (keys is None or k in keys))
