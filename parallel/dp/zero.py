"""DistributedOptimizer: fp32 master weights + optimizer state for the gradient elements this rank owns (ZeRO-1),
on the device or in host memory."""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Iterable, Iterator, Mapping, Optional

import torch

from .. import collectives as C
from .buffers import Bucket, Segment
from .grads import local_values
from .offload import STATE_ROWS, HostArena, HostStaging
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

    With `offload` (AdamW only) the masters and moments of each bucket chunk live in one (3, n) block of pinned host
    memory; step() streams the blocks to the device one bucket at a time (the next one's copy in flight), runs the
    same inner optimizer there on the device's main gradients, refreshes the parameters and streams the block back.
    Every element sees the same kernel and inputs as without offload, so the result is bitwise the same.
    """

    def __init__(self, param_groups: Iterable[dict[str, Any]], grad_sync: GradSync,
                 optimizer_cls: type = torch.optim.AdamW, param_dtype: Optional[torch.dtype] = None,
                 offload: bool = False, **defaults):
        self.sync, self.offload = grad_sync, offload
        self.device = grad_sync.params[0].device
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
        self._blocks: dict[Bucket, torch.Tensor] = {}   # offload: bucket -> host (3, hi - lo) of STATE_ROWS
        owned = [grad_sync.owned_range(bucket) for bucket in grad_sync.buckets]
        if offload:  # one exactly sized, page-locked host arena holds every bucket's block
            self._arena = HostArena(len(STATE_ROWS) * sum(hi - lo for lo, hi in owned), self.device)
            self._blocks = dict(zip(grad_sync.buckets, self._arena.blocks([hi - lo for lo, hi in owned])))
        for bucket, (lo, hi) in zip(grad_sync.buckets, owned):
            self._masters[bucket] = (self._blocks[bucket][0] if offload else
                                     torch.zeros(hi - lo, dtype=torch.float32, device=self.device))
        with torch.no_grad():
            for seg in self._segments:
                values = seg.param.detach().reshape(-1)[seg.param_lo:seg.param_hi]
                self.master(seg.bucket, seg.lo, seg.hi).copy_(values)
        inner_groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": []} for g in param_groups]
        self._flats: list[tuple[Bucket, int, int, torch.nn.Parameter]] = []  # (bucket, lo, hi, inner param)
        self._grads: dict[int, torch.Tensor] = {}  # id(flat) -> its main-gradient slice
        for first, last, group in self._runs(group_of):
            flat = torch.nn.Parameter(self.master(first.bucket, first.lo, last.hi))  # aliases the master chunk
            self._grads[id(flat)] = first.buffer.data[first.lo:last.hi]
            if not offload:  # offloaded flats live in host memory: their device gradient is attached while stepping
                flat.grad = self._grads[id(flat)]
            inner_groups[group]["params"].append(flat)
            self._flats.append((first.bucket, first.lo, last.hi, flat))
        self._bucket_flats = {b.index: [(lo, hi, f) for bb, lo, hi, f in self._flats if bb is b]
                              for b in grad_sync.buckets}
        self._bucket_segments = {b.index: [s for s in self._segments if s.bucket is b] for b in grad_sync.buckets}
        self.optimizer = optimizer_cls(inner_groups, **defaults)
        self._grads_zeroed = False  # the last (offloaded, deferred) step zeroed the main gradients itself
        self._stepped: dict[int, Any] = {}  # bucket index -> the mark its deferred step recorded
        if offload:
            self._staging = HostStaging(self.device, max(b.numel() for b in self._blocks.values()))
            self._init_offloaded_state()
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

    def _init_offloaded_state(self) -> None:
        """AdamW's state of every flat, created up front as views of the host blocks (it would create it lazily, on
        the device, at the first step); `step` stays where the inner optimizer keeps it."""
        for group in self.optimizer.param_groups:
            on_device = bool(group.get("fused") or group.get("capturable"))
            if set(self.optimizer.defaults) >= {"betas", "amsgrad"} and group.get("amsgrad"):
                raise ValueError("optimizer offload holds AdamW's exp_avg and exp_avg_sq: amsgrad is not supported")
            for flat in group["params"]:
                self.optimizer.state[flat] = {"step": self._step_tensor(0.0, on_device),
                                              **self._host_moments(flat)}

    def _host_moments(self, flat: torch.nn.Parameter) -> dict[str, torch.Tensor]:
        """Views of the host block rows that hold this flat's moments."""
        bucket, lo, hi = next((b, lo, hi) for b, lo, hi, f in self._flats if f is flat)
        own_lo = self.sync.owned_range(bucket)[0]
        block = self._blocks[bucket]
        return {key: block[STATE_ROWS.index(key), lo - own_lo:hi - own_lo] for key in MOMENTS}

    def _step_tensor(self, value: float, on_device: bool) -> torch.Tensor:
        """AdamW's step count as it keeps it: on the device for the fused/capturable kernels, else a CPU scalar."""
        return torch.tensor(value, dtype=torch.float32, device=self.device if on_device else "cpu")

    @torch.no_grad()
    def step(self) -> None:
        """Update the owned masters from the (summed, clipped) main gradients, then refresh every parameter."""
        if self.offload:
            self._streamed_step()
            return
        self.optimizer.step()
        self._land([self._publish(bucket, self._masters[bucket]) for bucket in self.sync.buckets])

    def _streamed_step(self) -> None:
        """Offload: fetch bucket i + 1's state block while bucket i steps on the device, then write it back.

        Unsharded (one rank owns every element), the buckets step in forward order on a side stream that the host
        does not wait for: the next forward waits (wait_for_step) only for the buckets of the layer it is about to
        run, so streaming the later layers' state overlaps the earlier layers' forward. Each bucket's main gradients
        are zeroed right after its step, on that stream."""
        staging, deferred = self._staging, self.sync.shards == 1
        buckets = self.sync.buckets[::-1] if deferred else self.sync.buckets  # forward order: embedding first
        staging.begin()
        gathers = []
        with staging.stepping(deferred):
            following = staging.fetch(self._blocks[buckets[0]])
            for i, bucket in enumerate(buckets):
                staged = following
                following = staging.fetch(self._blocks[buckets[i + 1]]) if i + 1 < len(buckets) else None
                block = staging.wait(staged)  # (3, owned elements) on the device
                with self._stepping_on(bucket, block):
                    self.optimizer.step()
                gathers.append(self._publish(bucket, block[0]))
                staging.write_back(staged, self._blocks[bucket])
                if deferred:
                    self.sync.bucket_main_grads(bucket).zero_()
                    self._stepped[bucket.index] = staging.mark()
            staging.end()
        self._grads_zeroed = deferred
        self._land(gathers)

    def wait_for_step(self, modules: Iterable[torch.nn.Module]) -> None:
        """Before each of these modules runs forward, the compute stream waits for the deferred step of the buckets
        holding its own parameters (nothing to wait for on a CPU or before the first step)."""
        for module in modules:
            mine = sorted({self.sync.buffer_range(p)[0].index for p in module.parameters(recurse=False)
                           if self.sync.holds(p)})
            if mine:
                module.register_forward_pre_hook(functools.partial(self._await_buckets, mine))

    def _await_buckets(self, indices: list[int], *_) -> None:
        for index in indices:
            done = self._stepped.pop(index, None)
            if done is not None:
                self._staging.await_mark(done)

    @contextlib.contextmanager
    def _stepping_on(self, bucket: Bucket, block: torch.Tensor) -> Iterator[None]:
        """The inner optimizer sees only this bucket's flats, their values and moments pointing into the device block
        and their gradients attached; afterwards they point back into the host block."""
        own_lo = self.sync.owned_range(bucket)[0]
        members = self._bucket_flats[bucket.index]
        for lo, hi, flat in members:
            flat.data = block[0, lo - own_lo:hi - own_lo]
            flat.grad = self._grads[id(flat)]
            state = self.optimizer.state[flat]
            for key in MOMENTS:
                state[key] = block[STATE_ROWS.index(key), lo - own_lo:hi - own_lo]
        groups = self.optimizer.param_groups
        everyone = [g["params"] for g in groups]
        ids = {id(flat) for *_, flat in members}
        for g in groups:
            g["params"] = [p for p in g["params"] if id(p) in ids]
        try:
            yield
        finally:
            for g, params in zip(groups, everyone):
                g["params"] = params
            for lo, hi, flat in members:
                flat.grad = None
                flat.data = self.master(bucket, lo, hi)
                self.optimizer.state[flat].update(self._host_moments(flat))

    def _publish(self, bucket: Bucket, master: torch.Tensor):
        """Put a bucket's updated owned masters (fp32, on the device) into the parameters: copied in place, or under
        ZeRO-1 cast to the parameter dtype and all-gathered over dp x ring x sp (returns the pending gather)."""
        own_lo = self.sync.owned_range(bucket)[0]
        if self.sync.shards == 1:
            for seg in self._bucket_segments[bucket.index]:
                seg.param.detach().view(-1)[seg.param_lo:seg.param_hi].copy_(master[seg.lo - own_lo:seg.hi - own_lo])
            return None
        dtypes = {p.dtype for p in bucket.params}
        if len(dtypes) != 1:
            raise TypeError(f"bucket {bucket.index} mixes parameter dtypes {sorted(map(str, dtypes))}: cast the "
                            "whole model to one dtype (or pass param_dtype) before the first step")
        flat = torch.empty(bucket.end - bucket.start, dtype=dtypes.pop(), device=master.device)
        lo, hi = self.sync.owned_range(bucket)
        flat[lo - bucket.start:hi - bucket.start].copy_(master)
        return bucket, flat, C.all_gather_flat_async(flat, self.sync.data_group)

    def _land(self, gathers) -> None:
        """Wait for the ZeRO-1 all-gathers and copy each bucket's gathered values into its parameters."""
        for gather in gathers:
            if gather is None:
                continue
            bucket, flat, pending = gather
            pending.wait()
            for p in bucket.params:
                _, start, end = self.sync.buffer_range(p)
                p.detach().view(-1).copy_(flat[start - bucket.start:end - bucket.start])

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the main gradients (the inner optimizer's gradients alias them), unless a deferred offloaded step
        already zeroes them bucket by bucket on its stream."""
        self.sync.zero_grad(zero_buffers=not self._grads_zeroed)
        self._grads_zeroed = False

    def state_bytes(self, keys: Optional[Iterable[str]] = None) -> int:
        """Bytes of optimizer state on this rank (all of AdamW's exp_avg, exp_avg_sq, step, or those in `keys`)."""
        return optimizer_state_bytes(self.optimizer, keys)

    def master_bytes(self) -> int:
        """Bytes of fp32 master weights on this rank (padding included)."""
        return sum(m.numel() * m.element_size() for m in self._masters.values())

    def host_bytes(self) -> int:
        """Bytes of optimizer state this rank keeps in host memory (the offloaded masters and moments, else 0)."""
        return sum(b.numel() * b.element_size() for b in self._blocks.values())

    # ------------------------------------------------------------------------------------ checkpoint state

    @torch.no_grad()
    def param_states(self) -> Iterator[tuple[torch.nn.Parameter, dict[str, torch.Tensor]]]:
        """(param, {'master', 'exp_avg', 'exp_avg_sq': fp32 tensors shaped like the param, 'step': 0-d}) for every
        parameter, bucket by bucket; under ZeRO-1 each bucket's owned chunks are all-gathered over dp x ring x sp, so this
        is a collective: iterate it on every rank, in step. Before the first step the moments are 0 and step is 0."""
        if self.offload:
            self._staging.settle()  # the last step's write-backs have landed in the host blocks
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
        if self.offload:
            self._staging.settle()  # no copy still reads or writes the host blocks
            for block in self._blocks.values():
                block[1:].zero_()
        moments = {id(flat): (self._host_moments(flat) if self.offload else
                              {k: torch.zeros_like(flat) for k in MOMENTS}) for *_, flat in self._flats}
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
                self.optimizer.state[flat] = {"step": self._step_tensor(step, on_device), **moments[id(flat)]}

    def _step_count(self) -> torch.Tensor:
        """The inner optimizer's step count (the same for every run; max over dp x ring x sp, as a rank may own none)."""
        steps = [float(s["step"]) for s in self.optimizer.state.values() if "step" in s]
        count = torch.tensor([max(steps, default=0.0)], dtype=torch.float64, device=self.device)
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
        local = local.to(self.device)  # offloaded state is gathered (and saved) from the device like the rest
        return local if self.sync.shards == 1 else C.all_gather(local, self.sync.data_group)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer, keys: Optional[Iterable[str]] = None) -> int:
    """Bytes this rank holds in a torch optimizer's per-parameter state (DTensors: the local shard), over every
    state tensor or only those named in `keys` (e.g. AdamW's 'exp_avg', 'exp_avg_sq')."""
    keys = None if keys is None else set(keys)
    return sum(local_values(v).numel() * v.element_size() for state in optimizer.state.values()
               for k, v in state.items() if isinstance(v, torch.Tensor) and (keys is None or k in keys))
