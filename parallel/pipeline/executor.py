"""Run a rank's planned steps on its stages: receive, compute, send; the same loop for every schedule.

Why our own executor rather than torch.distributed.pipelining: its stages exchange whole module outputs and infer
shapes with an extra forward, while ours send Ulysses/TP-sharded hidden states of a shape known ahead, keep every
stage's data path (ids, positions, labels) local, and match channels in an order the simulation proves.
"""
from __future__ import annotations

from typing import Callable, Optional, Protocol, Sequence

import torch

from .. import collectives as C
from ..mesh import ParallelMesh
from .plan import Step


class Stage(Protocol):
    """One model chunk: forward(mb, x) -> output (the loss on the last virtual stage); backward(mb, grad) -> input
    grad (x is None on the first virtual stage, grad None on the last)."""

    def forward(self, mb: int, x: Optional[torch.Tensor]) -> torch.Tensor: ...

    def backward(self, mb: int, grad: Optional[torch.Tensor]) -> Optional[torch.Tensor]: ...


class AutogradStage:
    """A Stage from fn(mb, x) -> output: keeps each micro-batch's (input, output) from forward until its backward."""

    def __init__(self, fn: Callable[[int, Optional[torch.Tensor]], torch.Tensor]):
        self.fn = fn
        self.saved: dict[int, tuple[Optional[torch.Tensor], torch.Tensor]] = {}

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
        torch.autograd.backward(out, grad)  # the last stage's out is the scalar loss: grad None
        if x is None:
            return None
        return x.grad if x.grad is not None else torch.zeros_like(x)  # output independent of x: zero grad


def run_steps(steps: Sequence[Step], stages: Sequence[Stage], mesh: ParallelMesh, boundary: torch.Size,
              dtype: torch.dtype, device: torch.device) -> dict[int, torch.Tensor]:
    """Execute this rank's steps; returns the last virtual stage's outputs (losses) by micro-batch, if it has it.

    Each step posts one batch: the previous step's send and this step's receive, then waits for the receive
    only; sends complete in the background and are waited for at the end (a backend that completes batches as a
    whole, NCCL, also waits for the send: plan_rank(..., coalesced=True) proves the plan under that rule). Every activation and gradient crossing
    a stage boundary has shape `boundary` and `dtype`, so receive buffers are allocated before the data arrives.
    """
    me = mesh.rank("pp")
    peer = lambda q: mesh.stage_neighbour(q - me)  # noqa: E731 - pipeline rank -> global rank, same dp/sp/tp
    outgoing: list[tuple[torch.Tensor, int]] = []
    in_flight: list[tuple[torch.Tensor, object]] = []  # (tensor, handle): alive until its send completes
    outputs: dict[int, torch.Tensor] = {}
    for step in steps:
        buffer = None if step.recv is None else torch.empty(boundary, dtype=dtype, device=device)
        sends, recvs = C.post_p2p(outgoing, [] if buffer is None else [(buffer, peer(step.src))])
        in_flight += [(t, h) for (t, _), h in zip(outgoing, sends)]
        for handle in recvs:
            handle.wait()
        stage = stages[step.action.chunk]
        if step.action.kind == "F":
            out = stage.forward(step.action.mb, buffer)
            if step.send is None:
                outputs[step.action.mb] = out
        else:
            out = stage.backward(step.action.mb, buffer)
        outgoing = [] if step.send is None else [(_checked(out, boundary, dtype, step), peer(step.dst))]
    sends, _ = C.post_p2p(outgoing, [])
    for _, handle in in_flight + list(zip([t for t, _ in outgoing], sends)):
        handle.wait()
    return outputs


def _checked(x: torch.Tensor, boundary: torch.Size, dtype: torch.dtype, step: Step) -> torch.Tensor:
    """A tensor about to cross a stage boundary must have the shape and dtype the receiver allocated."""
    if x.shape != boundary or x.dtype != dtype:
        raise RuntimeError(
            f"{step.action.label()} of virtual stage {step.stage} produced {tuple(x.shape)} {x.dtype} for {step.send}, "
            f"but the boundary is {tuple(boundary)} {dtype} (micro_batch, seq / sp [/ tp], hidden): every "
            "micro-batch must have the same shape, and the stage must return its hidden state in the model dtype")
    return x.contiguous()
