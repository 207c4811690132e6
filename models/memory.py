"""Activation-memory savers: recompute (activation checkpointing), host offload of the recomputed regions' inputs,
and sequence tiling of token-wise work (the MLP, the LM head + loss) so that only one tile's activations exist at once.

All of it is torch.utils.checkpoint (non-reentrant) plus a saved-tensor hook pair, so the model code only says *what*
to recompute. Every region re-runs its collectives in the same order on every rank, so recompute is safe under tensor
and Ulysses parallelism.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from megalysses.parallel.collectives import CommGroup
from megalysses.parallel.sequence import IGNORE_INDEX
from megalysses.parallel.tensor import vocab_parallel_cross_entropy
from megalysses.parallel.tensor.fused_cross_entropy import fused_linear_cross_entropy
from megalysses.parallel.tensor.mappings import enter_parallel_region

# ------------------------------------------------------------------------------------------- host offload


_streams: dict[torch.device, torch.cuda.Stream] = {}


def _offload_stream(device: torch.device) -> torch.cuda.Stream:
    """One side stream per GPU for device-to-host copies, so they overlap the forward's compute."""
    if device not in _streams:
        _streams[device] = torch.cuda.Stream(device)
    return _streams[device]


def _pack_to_host(t: torch.Tensor):
    """Saved-tensor pack hook: copy a GPU tensor into pinned host memory on a side stream (a CPU tensor is copied
    too, so the path runs the same in CPU tests)."""
    if not t.is_cuda:
        return t.device, t.detach().clone(), None
    if t.numel() == 0:  # no bytes to copy; CUDA gives an empty pinned request no page-locked buffer (not is_pinned)
        return t.device, torch.empty(t.shape, dtype=t.dtype), None
    stream = _offload_stream(t.device)
    stream.wait_stream(torch.cuda.current_stream(t.device))  # t is fully written before it is read
    host = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=True)
    with torch.cuda.stream(stream):
        host.copy_(t, non_blocking=True)
    t.record_stream(stream)  # the allocator may reuse t's memory only after the copy
    return t.device, host, stream.record_event()


def _unpack_from_host(packed) -> torch.Tensor:
    """Saved-tensor unpack hook: bring the tensor back to its device once its offload copy has finished."""
    device, host, copied = packed
    if copied is not None:
        torch.cuda.current_stream(device).wait_event(copied)
    return host.to(device, non_blocking=True)


def offload_to_host():
    """Context: tensors saved for backward inside it live in (pinned) host memory until backward unpacks them."""
    return torch.autograd.graph.saved_tensors_hooks(_pack_to_host, _unpack_from_host)


# ---------------------------------------------------------------------------------------------- recompute


def recompute(fn: Callable, *args, offload: bool = False, **kwargs):
    """Activation checkpointing: run fn keeping only its inputs (in host memory if `offload`); re-run it in backward.

    Non-reentrant torch.utils.checkpoint: its inputs are saved through the saved-tensor hooks active at the call
    (that is how `offload` reaches them), while everything saved inside fn is dropped and recomputed.
    """
    if not offload:
        return checkpoint(fn, *args, use_reentrant=False, **kwargs)
    with offload_to_host():
        return checkpoint(fn, *args, use_reentrant=False, **kwargs)


def recomputed(fn: Callable, offload: bool = False) -> Callable:
    """fn wrapped by `recompute` (e.g. an attention core handed to ulysses_attention)."""
    return functools.partial(recompute, fn, offload=offload)


# -------------------------------------------------------------------------------------------- tiling


def map_sequence_tiles(fn: Callable, tiles: int, *seqs: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """fn on matching sequence tiles of every tensor in seqs (fn must be token-wise), each tile recomputed in
    backward, outputs concatenated along dim: only one tile's intermediate activations exist at a time."""
    if tiles == 1:
        return fn(*seqs)
    n = min(tiles, seqs[0].shape[dim])  # every rank has the same local length, so the same tiles (and collectives)
    parts = zip(*(t.chunk(n, dim=dim) for t in seqs))
    return torch.cat([recompute(fn, *p) for p in parts], dim=dim)


def _head_loss(x: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, vocab_size: int,
               tp: CommGroup) -> torch.Tensor:
    """Per-token loss of one tile: (b, t, d) -> logits (b, t, padded vocab / tp) -> (b, t)."""
    return vocab_parallel_cross_entropy(F.linear(x, weight), labels, vocab_size, tp)


def tiled_lm_loss(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, vocab_size: int, tp: CommGroup,
                  sequence_parallel: bool, tiles: int) -> torch.Tensor:
    """LM head + vocab-parallel cross-entropy over sequence tiles: (b, s, d) [(b, s / tp, d) under sequence
    parallelism] -> per-token loss (b, s); no more than one tile's (b, s / tiles, padded vocab / tp) logits exist.

    The head input enters the TP region once, for the whole sequence (gathered along it under sequence parallelism,
    whose backward reduce-scatters; else copied, whose backward all-reduces), so each tile's logits are a plain local
    matmul: the same math as vocab_parallel_logits with one collective instead of one per tile.
    """
    x = enter_parallel_region(x, tp, sequence_parallel)  # (b, s, d) on every tp rank
    loss_of_tile = functools.partial(_head_loss, weight=weight, vocab_size=vocab_size, tp=tp)
    return map_sequence_tiles(loss_of_tile, tiles, x, labels)


def fused_lm_loss(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, vocab_size: int, tp: CommGroup,
                  sequence_parallel: bool, total_valid: torch.Tensor, chunks: int = 0) -> torch.Tensor:
    """This rank's share of the token-weighted mean loss (as `token_weighted_loss`: its valid tokens' losses summed,
    over the step's valid-token count) from the head input (b, s, d) [(b, s / tp, d) under sequence parallelism]: the
    LM head and vocab-parallel cross-entropy fused chunk by chunk, gradients formed in the same pass (no recompute,
    never the whole logits). The head input enters the TP region once, as in `tiled_lm_loss`."""
    x = enter_parallel_region(x, tp, sequence_parallel)  # (b, s, d) on every tp rank
    valid = (labels != IGNORE_INDEX).float()  # (b, s)
    loss_sum = fused_linear_cross_entropy(x, weight, labels, valid, vocab_size, tp, chunks)
    return loss_sum / total_valid.clamp(min=1).to(loss_sum.dtype)
