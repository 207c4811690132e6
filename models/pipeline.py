"""One training (or evaluation) step of GPT chunks through a pipeline schedule; pp = 1 is the one-stage case.

The schedule, its communication and the executor are model-agnostic (megalysses.parallel.pipeline); what is GPT
here: the tied embedding's copies, the boundary shape, and calling a chunk on a micro-batch. build_model
(models/build.py) makes the chunks.
"""
from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Optional, Sequence

import torch

from megalysses.parallel import collectives as C
from megalysses.parallel.mesh import ParallelMesh
from megalysses.parallel.pipeline import AutogradStage, all_reduce_tied_gradients, plan_rank, run_rounds

from .gpt import GPT

MicroBatch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (ids, positions, labels), each (micro, s / sp)


def tied_parameters(chunks: Sequence[GPT]) -> list[torch.nn.Parameter]:
    """The copies of the tied embedding that live on a first or last stage without the other end (pp > 1)."""
    return [c.embed.weight for c in chunks if c.cfg.tie_embeddings and c.pre_process != c.post_process]


def boundary_shape(chunk: GPT, ids_shape: torch.Size) -> torch.Size:
    """Hidden state between stages: (micro, s / sp, hidden), the sequence also split over tp under sequence
    parallelism. ids_shape: this rank's (micro, s / sp) token ids."""
    b, s = ids_shape
    tp = chunk.mesh.size("tp") if chunk.mesh.layout.tp_sequence_parallel else 1
    return torch.Size((b, s // tp, chunk.cfg.hidden_size))


def chunk_forward(chunk: GPT, micro_batches: Sequence[MicroBatch], total_valid: torch.Tensor,
                  autocast: ContextManager):
    """fn(mb, hidden) -> the hidden state, or on the last stage this micro-batch's share of the step's mean loss."""
    def fn(mb: int, hidden: Optional[torch.Tensor]) -> torch.Tensor:
        ids, pos, labels = micro_batches[mb]
        with autocast:
            if not chunk.post_process:
                return chunk(ids, pos, hidden=hidden)
            return chunk(ids, pos, labels, hidden=hidden, total_valid=total_valid)  # token-weighted share
    return fn


def run_pipeline_step(chunks: Sequence[GPT], schedule: str, micro_batches: Sequence[MicroBatch], mesh: ParallelMesh,
                      total_valid: torch.Tensor, autocast: Optional[ContextManager] = None,
                      backward: bool = True, sync_tied: bool = True, coalesced: Optional[bool] = None,
                      no_sync: Optional[Callable[[], ContextManager]] = None) -> torch.Tensor:
    """Forward and backward of every micro-batch through the pipeline under `schedule`; returns this dp x ring x sp
    rank's loss share (the same on every stage), with gradients accumulated and tied embeddings synchronised.

    total_valid: the valid-token count of the whole step (every micro-batch, over dp x ring x sp), so the summed shares
    are the exact global mean. Afterwards sync gradients over dp x ring x sp as without a pipeline. backward=False: the
    evaluation pass, forwards only (call it under torch.no_grad()). sync_tied=False leaves the tied-embedding
    gradient sum to the caller (a gradient buffer that has already taken the gradients over). coalesced: plan
    for a backend whose p2p batches complete only as a whole (NCCL: lockstep rounds, every schedule runs); by
    default whether this backend does; True on gloo runs the lockstep plan there too. no_sync: a data-parallel
    implementation's context in which every backward but each chunk's last runs (only accumulating), so the
    gradient reduction starts during the last one and overlaps it.
    """
    pp, vpp, rank = mesh.size("pp"), mesh.layout.vpp, mesh.rank("pp")
    if len(chunks) != vpp:
        raise ValueError(f"{len(chunks)} model chunks on pipeline rank {rank}, but layout.vpp = {vpp}: build them "
                         "with build_model(cfg, mesh)")
    shape = _uniform_shape(micro_batches)  # (micro, s / sp)
    ids = micro_batches[0][0]
    if coalesced is None:
        coalesced = pp > 1 and C.p2p_batches_coalesce(ids.device)
    rounds = plan_rank(schedule, pp, vpp, len(micro_batches), rank, backward, coalesced)  # proved by simulation
    autocast = autocast if autocast is not None else contextlib.nullcontext()
    stages = [AutogradStage(chunk_forward(c, micro_batches, total_valid, autocast), len(micro_batches), no_sync)
              for c in chunks]
    dtype = next(chunks[0].parameters()).dtype
    losses = run_rounds(rounds, stages, mesh, boundary_shape(chunks[0], shape), dtype, ids.device)
    loss_sum = torch.zeros((), dtype=torch.float32, device=ids.device)
    for mb in sorted(losses):  # only the last stage has them
        loss_sum += losses[mb]
    C.all_reduce(loss_sum, mesh.group("pp"))  # zeros elsewhere: every stage reports the last stage's loss
    if backward and sync_tied:
        all_reduce_tied_gradients(tied_parameters(chunks), mesh)
    return loss_sum


def _uniform_shape(micro_batches: Sequence[MicroBatch]) -> torch.Size:
    """Receive buffers are allocated ahead, so every micro-batch must have the same (micro, s / sp) shape."""
    if not micro_batches:
        raise ValueError("run_pipeline_step got no micro-batches: need at least one")
    shape = micro_batches[0][0].shape
    for i, (ids, pos, labels) in enumerate(micro_batches):
        if ids.shape != shape or pos.shape != shape or labels.shape != shape:
            raise ValueError(f"micro-batch {i} has shapes {tuple(ids.shape)}, {tuple(pos.shape)}, "
                             f"{tuple(labels.shape)} but micro-batch 0 has {tuple(shape)}: pad every micro-batch to "
                             "the same length (pad_sequence_batch) and use one micro_batch_size")
    return shape
