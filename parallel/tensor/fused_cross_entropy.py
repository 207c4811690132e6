"""Fused linear + vocab-parallel cross-entropy: the LM head, the loss and both gradients in one chunked pass.

Liger's fused linear cross-entropy over vocab shards: token chunks of (c, d) hidden states meet this rank's (V_local, d)
head shard; each chunk's (c, V_local) logits, their max and sum-exp (all-reduced over tp, as
`vocab_parallel_cross_entropy` does), the chunk's loss and, in the same pass, its gradients with respect to the hidden
states and the head weight are computed and the logits dropped. Only one chunk's logits ever exist and backward only
scales the stored gradients by the incoming scalar: nothing is recomputed.

The gradients can be formed in the forward pass because the output is a weighted sum of per-token losses whose
weights are known there: sum_i w_i loss_i (the token-weighted mean's share: w_i = valid_i / valid tokens of the step).
"""
from __future__ import annotations

import torch

from .. import collectives as C
from ..collectives import CommGroup
from .cross_entropy import _row_max, _row_sum_exp, _softmax_minus_target

LOGITS_PER_CHUNK = 2 ** 28
"""Default chunk size in logits elements (c x V_local): 512 MiB of bf16 logits, about 2,000 tokens of a 128K vocab."""


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """sum_i w_i (log sum_v exp(z_iv) - z_i,target) with z = x W^T, chunk by chunk; d/dx and d/dW kept for backward."""

    @staticmethod
    def forward(ctx, x, weight, targets, row_weights, vocab_start, vocab_valid, group, chunk_rows):
        # x: (n, d) the whole head input on every tp rank; weight: (V_local, d) columns [vocab_start, + V_local);
        # targets: (n,) with -1 where ignored; row_weights: (n,) float32, 0 where ignored
        want_x, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_x = torch.empty_like(x) if want_x else None  # partial over the vocab shards: the tp copy's backward sums
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        loss = torch.zeros((), dtype=torch.float32, device=x.device)
        for lo in range(0, x.shape[0], chunk_rows):
            xc, tc, wc = x[lo:lo + chunk_rows], targets[lo:lo + chunk_rows], row_weights[lo:lo + chunk_rows]
            z = xc @ weight.t()  # (c, V_local)
            zmax, sum_exp, target_logit, local, mine = _chunk_statistics(z, tc, vocab_start, vocab_valid, group)
            loss += ((sum_exp.log() + zmax - target_logit) * wc).sum()
            if want_x or want_w:
                g = _softmax_minus_target(z, zmax, sum_exp, local, mine, wc, vocab_valid)  # (c, V_local), z's dtype
                if want_x:
                    torch.mm(g, weight, out=grad_x[lo:lo + chunk_rows])  # a row block: contiguous
                if want_w:
                    _accumulate(grad_w, g.t(), xc)
        ctx.save_for_backward(grad_x, None if grad_w is None else grad_w.to(weight.dtype))
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_w = ctx.saved_tensors
        scale = lambda g: None if g is None else g * grad_loss.to(g.dtype)  # noqa: E731
        return scale(grad_x), scale(grad_w), None, None, None, None, None, None


def _accumulate(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b, the product formed in a's dtype and added in acc's (float32) one."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    else:
        acc += (a @ b).float()


def _chunk_statistics(z: torch.Tensor, targets: torch.Tensor, vocab_start: int, vocab_valid: int, group: CommGroup):
    """Row max, sum of exp and target logit of a chunk's vocab-sharded logits, each over the whole vocab (two
    all-reduces over tp: the max, then the sum-exp and target logit together); also the local target columns."""
    zmax = C.all_reduce(_row_max(z, vocab_valid), group, op="max")  # (c,) float32
    local = targets - vocab_start
    mine = (local >= 0) & (local < z.shape[-1])
    local = local.masked_fill(~mine, 0)
    target_logit = z.gather(-1, local.unsqueeze(-1)).squeeze(-1).float().masked_fill(~mine, 0.0)
    sums = C.all_reduce(torch.stack([_row_sum_exp(z, zmax, vocab_valid), target_logit]), group)  # (2, c)
    return zmax, sums[0], sums[1], local, mine


def chunk_rows_for(rows: int, local_vocab: int, chunks: int = 0) -> int:
    """Tokens per chunk: rows split into `chunks` (0: as few as keep a chunk's logits under LOGITS_PER_CHUNK)."""
    if chunks <= 0:
        chunks = -(-rows * local_vocab // LOGITS_PER_CHUNK)
    return max(1, -(-rows // max(1, chunks)))


def fused_linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                               row_weights: torch.Tensor, vocab_size: int, group: CommGroup,
                               chunks: int = 0) -> torch.Tensor:
    """sum_i row_weights_i * loss_i for (..., d) head inputs (whole on every tp rank) and a (V_padded / tp, d) head
    shard, never holding more than one chunk's (tokens / chunks, V_padded / tp) logits; targets outside [0, vocab)
    give 0 loss and gradient (as in `vocab_parallel_cross_entropy`). Under autocast the head runs in its dtype."""
    d, rows = x.shape[-1], weight.shape[0]
    start = group.rank * rows
    valid = max(0, min(rows, vocab_size - start))
    flat_targets = targets.reshape(-1)
    ignored = (flat_targets < 0) | (flat_targets >= vocab_size)
    device_type = x.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
    x2, w = x.reshape(-1, d).to(dtype), weight.to(dtype)
    with torch.autocast(device_type, enabled=False):
        return _FusedLinearCrossEntropy.apply(
            x2, w, flat_targets.masked_fill(ignored, -1), row_weights.reshape(-1).float().masked_fill(ignored, 0.0),
            start, valid, group, chunk_rows_for(x2.shape[0], rows, chunks))
