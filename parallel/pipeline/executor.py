"""Run a rank's planned steps on its stages: receive, compute, send; the same loop for every schedule.

Why our own executor rather than torch.distributed.pipelining: its stages exchange whole module outputs and infer
shapes with an extra forward, while ours send Ulysses/TP-sharded hidden states of a shape known ahead, keep every
stage's data path (ids, positions, labels) local, and match channels in an order the simulation proves.
"""
from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Optional, Protocol, Sequence

import torch

from .. import collectives as C
from ..mesh import ParallelMesh
from .plan import Message, Round, Step


class Stage(Protocol):
    """One model chunk: forward(mb, x) -> output (the loss on the last virtual stage); backward(mb, grad) -> input
    grad (x is None on the first virtual stage, grad None on the last)."""

    def forward(self, mb: int, x: Optional[torch.Tensor]) -> torch.Tensor: ...

    def backward(self, mb: int, grad: Optional[torch.Tensor]) -> Optional[torch.Tensor]: ...


class AutogradStage:
    """A Stage from fn(mb, x) -> output: keeps each micro-batch's (input, output) from forward until its backward.
    With `no_sync` (a data-parallel context that only accumulates gradients), every backward but the last of the
    `micro_batches` runs inside it: the gradient reduction starts during the stage's last backward."""

    def __init__(self, fn: Callable[[int, Optional[torch.Tensor]], torch.Tensor], micro_batches: int = 0,
                 no_sync: Optional[Callable[[], ContextManager]] = None):
        self.fn, self.micro_batches, self.no_sync = fn, micro_batches, no_sync
        self.saved: dict[int, tuple[Optional[torch.Tensor], torch.Tensor]] = {}
        self.backwards = 0

    def forward(self, mb: int, x: Optional[torch.Tensor]) -> torch.Tensor:
        if x is not None and torch.is_grad_enabled():
            x = x.detach().requires_grad_()  # a leaf: its .grad is what we send back
        out = self.fn(mb, x)
        if torch.is_grad_enabled():
            self.saved[mb] = (x, out)
        return out.detach()

    def backward(self, mb: int, grad: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        if mb not in self.saved:
            raise RuntimeError(f"backward of micro-batch {mb} before its forward (or twice): the schedule is wrong")
        x, out = self.saved.pop(mb)
        self.backwards += 1
        last = self.no_sync is None or self.backwards >= self.micro_batches
        with contextlib.nullcontext() if last else self.no_sync():
            torch.autograd.backward(out, grad)  # the last stage's out is the scalar loss: grad None
        if x is None:
            return None
        return x.grad if x.grad is not None else torch.zeros_like(x)  # output independent of x: zero grad


def run_rounds(rounds: Sequence[Round], stages: Sequence[Stage], mesh: ParallelMesh, boundary: torch.Size,
               dtype: torch.dtype, device: torch.device) -> dict[int, torch.Tensor]:
    """Execute this rank's rounds; returns the last virtual stage's outputs (losses) by micro-batch, if it has it.

    Each round posts one batch: the outputs of earlier steps it sends and the inputs it receives, then waits for
    the receives only; sends complete in the background and are waited for at the end (a backend that completes
    batches as a whole, NCCL, also waits for the sends: plan_rank(..., coalesced=True) gives the lockstep plan
    proved under that rule). Every activation and gradient crossing a stage boundary has shape `boundary` and
    `dtype`, so receive buffers are allocated before the data arrives.
    """
    me = mesh.rank("pp")
    peer = lambda q: mesh.stage_neighbour(q - me)  # noqa: E731 - pipeline rank -> global rank, same dp/sp/tp
    produced: dict[Message, torch.Tensor] = {}  # outputs waiting for their round to be sent
    received: dict[Message, torch.Tensor] = {}  # inputs waiting for their step
    in_flight: list[tuple[torch.Tensor, object]] = []  # (tensor, handle): alive until its send completes
    outputs: dict[int, torch.Tensor] = {}
    for rnd in rounds:
        outgoing = [(produced.pop(message), peer(dst)) for message, dst in rnd.sends]
        incoming = {message: torch.empty(boundary, dtype=dtype, device=device) for message, _ in rnd.recvs}
        sends, recvs = C.post_p2p(outgoing, [(incoming[message], peer(src)) for message, src in rnd.recvs],
                                  mesh.clock)
        in_flight += [(t, h) for (t, _), h in zip(outgoing, sends)]
        for handle in recvs:
            handle.wait()
        received.update(incoming)
        step = rnd.step
        if step is None:
            continue
        out = _run(step, stages, None if step.recv is None else received.pop(step.recv))
        if step.send is not None:
            produced[step.send] = _checked(out, boundary, dtype, step)
        elif step.action.kind == "F":
            outputs[step.action.mb] = out
    for _, handle in in_flight:
        handle.wait()
    if produced or received:
        raise RuntimeError(f"the plan left {sorted(map(str, produced))} unsent and {sorted(map(str, received))} "
                           "unused: plan_rank proves its plans, so these rounds came from elsewhere")
    return outputs


def _run(step: Step, stages: Sequence[Stage], x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    stage = stages[step.action.chunk]
    if step.action.kind == "F":
        return stage.forward(step.action.mb, x)
    return stage.backward(step.action.mb, x)


def _checked(x: torch.Tensor, boundary: torch.Size, dtype: torch.dtype, step: Step) -> torch.Tensor:
    """A tensor about to cross a stage boundary must have the shape and dtype the receiver allocated."""
    if x.shape != boundary or x.dtype != dtype:
        raise RuntimeError(
            f"{step.action.label()} of virtual stage {step.stage} produced {tuple(x.shape)} {x.dtype} for {step.send}, "
            f"but the boundary is {tuple(boundary)} {dtype} (micro_batch, seq / sp [/ tp], hidden): every "
            "micro-batch must have the same shape, and the stage must return its hidden state in the model dtype")
    return x.contiguous()
