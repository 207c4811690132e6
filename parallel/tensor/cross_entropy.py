"""Vocab-parallel cross-entropy: per-token loss from vocab-sharded logits, never gathering the full vocab."""
from __future__ import annotations

import torch

from .. import collectives as C
from ..collectives import CommGroup
from ..kernel_fusion import fused


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """loss_i = log sum_v exp(z_iv) - z_i,target with max, sum and target logit all-reduced over tp.

    Keeps the logits in their own dtype for backward (no float32 softmax is stored) and recomputes the softmax there;
    each pass over the (n, V_local) logits is one fused kernel on CUDA.
    """

    @staticmethod
    def forward(ctx, logits, targets, vocab_start, vocab_valid, group):
        # logits: (n, V_local) this rank's vocab columns [vocab_start, vocab_start + V_local); targets: (n,)
        zmax = C.all_reduce(_row_max(logits, vocab_valid), group, op="max")  # (n,) float32
        local = targets - vocab_start
        mine = (local >= 0) & (local < logits.shape[-1])
        local = local.masked_fill(~mine, 0)
        target_logit = logits.gather(-1, local.unsqueeze(-1)).squeeze(-1).float().masked_fill(~mine, 0.0)
        C.all_reduce(target_logit, group)
        sum_exp = C.all_reduce(_row_sum_exp(logits, zmax, vocab_valid), group)
        ctx.save_for_backward(logits, zmax, sum_exp, local, mine)
        ctx.vocab_valid = vocab_valid
        return sum_exp.log() + zmax - target_logit

    @staticmethod
    def backward(ctx, grad_loss):
        logits, zmax, sum_exp, local, mine = ctx.saved_tensors
        grad = _softmax_minus_target(logits, zmax, sum_exp, local, mine, grad_loss, ctx.vocab_valid)
        return grad, None, None, None, None


def _valid_logits(z: torch.Tensor, valid: int) -> torch.Tensor:
    """z in float32 with the padded vocab columns (>= valid) at -inf: they are never predicted."""
    z = z.float()
    if valid < z.shape[-1]:
        z = torch.where(torch.arange(z.shape[-1], device=z.device) < valid, z, float("-inf"))
    return z


@fused
def _row_max(z: torch.Tensor, valid: int) -> torch.Tensor:
    """(n, V) -> (n,) float32 max over the valid columns."""
    return _valid_logits(z, valid).amax(dim=-1)


@fused
def _row_sum_exp(z: torch.Tensor, zmax: torch.Tensor, valid: int) -> torch.Tensor:
    """(n, V) -> (n,) float32 sum of exp(z - zmax) over the valid columns."""
    return (_valid_logits(z, valid) - zmax.unsqueeze(-1)).exp().sum(dim=-1)


@fused
def _softmax_minus_target(z, zmax, sum_exp, local, mine, grad_loss, valid: int) -> torch.Tensor:
    """d loss / d z = (softmax(z) - onehot(target)) * grad_loss, in z's dtype."""
    p = (_valid_logits(z, valid) - zmax.unsqueeze(-1)).exp() / sum_exp.unsqueeze(-1)
    target = (torch.arange(z.shape[-1], device=z.device) == local.unsqueeze(-1)) & mine.unsqueeze(-1)
    return ((p - target.float()) * grad_loss.float().unsqueeze(-1)).to(z.dtype)


def vocab_parallel_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int,
                                 group: CommGroup) -> torch.Tensor:
    """Per-token loss (..., ) from (..., V_padded / tp) logits; targets outside [0, vocab) give 0 loss and gradient."""
    rows = logits.shape[-1]
    start = group.rank * rows
    valid = max(0, min(rows, vocab_size - start))
    flat_targets = targets.reshape(-1)
    ignored = (flat_targets < 0) | (flat_targets >= vocab_size)
    loss = _VocabParallelCrossEntropy.apply(logits.reshape(-1, rows), flat_targets.masked_fill(ignored, -1),
                                            start, valid, group)
    return loss.masked_fill(ignored, 0.0).view(targets.shape)
