"""DistributedOptimizer: fp32 master weights + optimizer state for the gradient elements this rank owns (ZeRO-1),
on the device or in host memory."""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence

import torch

from .. import collectives as C
from .buffers import Bucket, Segment
from .grads import local_values
from .offload import STATE_ROWS, HostArena, HostStaging
from .state import MOMENTS, check_state_shapes
from .sync import GradSync


PIECE_NUMEL = 2**25
"""Offload streams the state in pieces of at most this many elements (3 x 128 MiB of fp32 state each), so the device
staging stays small however large one parameter (a 128K-vocabulary embedding) or bucket is."""


@dataclass(frozen=True, eq=False)
class Piece:
    """Buffer range [lo, hi) of a bucket's owned chunk whose state moves and steps as one block."""

    bucket: Bucket
    lo: int
    hi: int


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

    With `offload` (AdamW only) the masters and moments of each piece (at most PIECE_NUMEL owned elements of a bucket)
    live in one (3, n) block of page-locked host memory; step() streams the blocks to the device one piece at a time
    (the next one's copy in flight), runs the same inner optimizer there on the device's main gradients, refreshes the
    parameters and streams the block back.
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
        self._pieces: list[Piece] = []  # launch order; without offload one per bucket (its whole owned chunk)
        for bucket in grad_sync.buckets:
            lo, hi = grad_sync.owned_range(bucket)
            size = PIECE_NUMEL if offload else hi - lo
            self._pieces += [Piece(bucket, a, min(a + size, hi)) for a in range(lo, hi, size)]
        self._pieces_of = {b.index: [pc for pc in self._pieces if pc.bucket is b] for b in grad_sync.buckets}
        self._masters: dict[Bucket, torch.Tensor] = {}  # on the device: bucket -> fp32 owned chunk (hi - lo,)
        self._blocks: dict[Piece, torch.Tensor] = {}    # offload: piece -> host (3, hi - lo) of STATE_ROWS
        if offload:  # one exactly sized, page-locked host arena holds every piece's block
            self._arena = HostArena([pc.hi - pc.lo for pc in self._pieces], self.device)
            self._blocks = dict(zip(self._pieces, self._arena.blocks))
        else:
            for bucket in grad_sync.buckets:
                lo, hi = grad_sync.owned_range(bucket)
                self._masters[bucket] = torch.zeros(hi - lo, dtype=torch.float32, device=self.device)
        with torch.no_grad():
            for seg in self._segments:
                values = seg.param.detach().reshape(-1)
                for lo, hi, view in self._master_parts(seg.bucket, seg.lo, seg.hi):
                    view.copy_(values[seg.param_lo + lo - seg.lo:seg.param_lo + hi - seg.lo])
        inner_groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": []} for g in param_groups]
        self._flats: list[tuple[Bucket, int, int, torch.nn.Parameter]] = []  # (bucket, lo, hi, inner param)
        self._grads: dict[int, torch.Tensor] = {}  # id(flat) -> its main-gradient slice
        for first, last, group in self._runs(group_of):
            for lo, hi, view in self._master_parts(first.bucket, first.lo, last.hi):  # a flat never spans pieces
                flat = torch.nn.Parameter(view)  # aliases the master chunk
                self._grads[id(flat)] = first.buffer.data[lo:hi]
                if not offload:  # offloaded flats live in host memory: the device gradient is attached to step
                    flat.grad = self._grads[id(flat)]
                inner_groups[group]["params"].append(flat)
                self._flats.append((first.bucket, lo, hi, flat))
        self._bucket_flats = {b.index: [(lo, hi, f) for bb, lo, hi, f in self._flats if bb is b]
                              for b in grad_sync.buckets}
        self._piece_flats = {pc: [(lo, hi, f) for lo, hi, f in self._bucket_flats[pc.bucket.index]
                                  if pc.lo <= lo < pc.hi] for pc in self._pieces}
        self._bucket_segments = {b.index: [s for s in self._segments if s.bucket is b] for b in grad_sync.buckets}
        self.optimizer = optimizer_cls(inner_groups, **defaults)
        self._grads_zeroed = False  # the last (offloaded, deferred) step zeroed the main gradients itself
        self._gathering: dict[int, torch.Tensor] = {}  # ZeRO-1: bucket index -> its gather buffer being filled
        self._stepped: dict[int, Any] = {}  # bucket index -> the mark its deferred step recorded
        self._forward_order: list[Bucket] = []  # the buckets in the order the forward needs them (wait_for_step)
        if offload:
            self._staging = HostStaging(self.device, max(block.numel() for block in self._blocks.values()))
            self._init_offloaded_state()
        if param_dtype is not None:  # masters keep the fp32 values; the model computes in param_dtype
            for p in grad_sync.params:
                p.data = p.data.to(param_dtype)

    def master(self, bucket: Bucket, lo: int, hi: int) -> torch.Tensor:
        """The fp32 master copy of buffer range [lo, hi) of an owned bucket chunk (a view; within one piece)."""
        if not self.offload:
            own_lo = self.sync.owned_range(bucket)[0]
            return self._masters[bucket][lo - own_lo:hi - own_lo]
        piece = self._piece_at(bucket, lo)
        if hi > piece.hi:
            raise ValueError(f"master range [{lo}, {hi}) of bucket {bucket.index} spans pieces: use _master_parts")
        return self._blocks[piece][0, lo - piece.lo:hi - piece.lo]

    def _piece_at(self, bucket: Bucket, lo: int) -> Piece:
        """The piece holding buffer element lo of the bucket's owned chunk."""
        pieces = self._pieces_of[bucket.index]
        return pieces[(lo - pieces[0].lo) // PIECE_NUMEL] if self.offload else pieces[0]

    def _master_parts(self, bucket: Bucket, lo: int, hi: int) -> list[tuple[int, int, torch.Tensor]]:
        """Buffer range [lo, hi) of an owned chunk cut at piece boundaries: (lo, hi, master view) each."""
        parts = []
        while lo < hi:
            end = min(hi, self._piece_at(bucket, lo).hi)
            parts.append((lo, end, self.master(bucket, lo, end)))
            lo = end
        return parts

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
        piece = self._piece_at(bucket, lo)
        return {key: self._blocks[piece][STATE_ROWS.index(key), lo - piece.lo:hi - piece.lo] for key in MOMENTS}

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
        gathers = []
        for bucket in self.sync.buckets:
            lo, hi = self.sync.owned_range(bucket)
            gathers.append(self._publish(bucket, lo, hi, self._masters[bucket], last=True))
        self._land(gathers)

    def _streamed_step(self) -> None:
        """Offload: fetch piece i + 1's state block while piece i steps on the device, then write it back.

        Unsharded (one rank owns every element), the buckets step in forward order on a side stream that the host
        does not wait for: the next forward waits (wait_for_step) only for the buckets of the layer it is about to
        run, so streaming the later layers' state overlaps the earlier layers' forward. Each bucket's main gradients
        are zeroed right after its step, on that stream."""
        staging, deferred = self._staging, self.sync.shards == 1
        buckets = (self._forward_order or self.sync.buckets[::-1]) if deferred else self.sync.buckets
        pieces = [pc for bucket in buckets for pc in self._pieces_of[bucket.index]]
        staging.begin()
        gathers = []
        with staging.stepping(deferred):
            following = staging.fetch(self._blocks[pieces[0]])
            for i, piece in enumerate(pieces):
                staged = following
                following = staging.fetch(self._blocks[pieces[i + 1]]) if i + 1 < len(pieces) else None
                block = staging.wait(staged)  # (3, piece elements) on the device
                with self._stepping_on(piece, block):
                    self.optimizer.step()
                last = piece is self._pieces_of[piece.bucket.index][-1]
                gathers.append(self._publish(piece.bucket, piece.lo, piece.hi, block[0], last))
                staging.write_back(staged, self._blocks[piece])
                if deferred and last:
                    self.sync.bucket_main_grads(piece.bucket).zero_()
                    self._stepped[piece.bucket.index] = staging.mark()
            staging.end()
        self._grads_zeroed = deferred
        self._land(gathers)

    def wait_for_step(self, units: Sequence[tuple[torch.nn.Module, Sequence[torch.nn.Parameter]]]) -> None:
        """`units` in forward order, each (module, the parameters it uses): before a module runs forward, the compute
        stream waits for the deferred step of the buckets holding those parameters (nothing to wait for on a CPU or
        before the first step); the deferred step streams the buckets in that order."""
        first_use: dict[int, int] = {}  # bucket index -> the first unit that needs it
        for position, (module, params) in enumerate(units):
            mine = sorted({self.sync.buffer_range(p)[0].index for p in params if self.sync.holds(p)})
            for index in mine:
                first_use.setdefault(index, position)
            if mine:
                module.register_forward_pre_hook(functools.partial(self._await_buckets, mine))
        self._forward_order = sorted(self.sync.buckets, key=lambda b: (first_use.get(b.index, len(units)), -b.index))

    def _await_buckets(self, indices: list[int], *_) -> None:
        for index in indices:
            done = self._stepped.pop(index, None)
            if done is not None:
                self._staging.await_mark(done)

    @contextlib.contextmanager
    def _stepping_on(self, piece: Piece, block: torch.Tensor) -> Iterator[None]:
        """The inner optimizer sees only this piece's flats, their values and moments pointing into the device block
        and their gradients attached; afterwards they point back into the host block."""
        members = self._piece_flats[piece]
        for lo, hi, flat in members:
            flat.data = block[0, lo - piece.lo:hi - piece.lo]
            flat.grad = self._grads[id(flat)]
            state = self.optimizer.state[flat]
            for key in MOMENTS:
                state[key] = block[STATE_ROWS.index(key), lo - piece.lo:hi - piece.lo]
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
                flat.data = self.master(piece.bucket, lo, hi)
                self.optimizer.state[flat].update(self._host_moments(flat))

    def _publish(self, bucket: Bucket, lo: int, hi: int, master: torch.Tensor, last: bool):
        """Put updated masters of owned buffer range [lo, hi) (fp32, on the device) into the parameters: copied in
        place, or under ZeRO-1 cast into the bucket's gather buffer, all-gathered over dp x ring x sp once the
        bucket's `last` range is in (returns the pending gather then)."""
        if self.sync.shards == 1:
            for seg in self._bucket_segments[bucket.index]:
                a, b = max(seg.lo, lo), min(seg.hi, hi)
                if a < b:
                    start = seg.param_lo + a - seg.lo
                    seg.param.detach().view(-1)[start:start + b - a].copy_(master[a - lo:b - lo])
            return None
        if bucket.index not in self._gathering:
            dtypes = {p.dtype for p in bucket.params}
            if len(dtypes) != 1:
                raise TypeError(f"bucket {bucket.index} mixes parameter dtypes {sorted(map(str, dtypes))}: cast the "
                                "whole model to one dtype (or pass param_dtype) before the first step")
            self._gathering[bucket.index] = torch.empty(bucket.end - bucket.start, dtype=dtypes.pop(),
                                                        device=master.device)
        flat = self._gathering[bucket.index]
        flat[lo - bucket.start:hi - bucket.start].copy_(master)
        if not last:
            return None
        del self._gathering[bucket.index]
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
        masters = [block[0] for block in self._blocks.values()] if self.offload else self._masters.values()
        return sum(m.numel() * m.element_size() for m in masters)

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
        segments: dict[int, list[Segment]] = {}
        for seg in self._segments:
            segments.setdefault(id(seg.param), []).append(seg)
        steps = set()
        check_state_shapes("DistributedOptimizer", states, self.sync.params)
        for i, p in enumerate(self.sync.params):
            s = states[i]
            p.copy_(s["master"])
            for seg in segments.get(id(p), ()):
                for lo, hi, flat in self._bucket_flats[seg.bucket.index]:  # the flats this segment overlaps
                    a, b = max(lo, seg.lo), min(hi, seg.hi)
                    if a < b:
                        start = seg.param_lo + a - seg.lo
                        flat.data[a - lo:b - lo].copy_(s["master"].reshape(-1)[start:start + b - a])
                        for key in MOMENTS:
                            moments[id(flat)][key][a - lo:b - lo].copy_(s[key].reshape(-1)[start:start + b - a])
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
        if key == "master" and not self.offload:
            local = self._masters[bucket]
        else:
            own_lo, own_hi = self.sync.owned_range(bucket)
            local = torch.zeros(own_hi - own_lo, dtype=torch.float32, device="cpu" if self.offload else self.device)
            for run_bucket, run_lo, run_hi, flat in self._flats:
                value = flat.data if key == "master" else self.optimizer.state.get(flat, {}).get(key)
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
