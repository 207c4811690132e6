"""Vocab-parallel cross-entropy: per-token loss from vocab-sharded logits, never gathering the full vocab."""
from __future__ import annotations

import torch

from .. import collectives as C
from ..collectives import CommGroup


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """loss_i = log sum_v exp(z_iv) - z_i,target with max, sum and target logit all-reduced over tp."""

    @staticmethod
    def forward(ctx, logits, targets, vocab_start, vocab_valid, group):
        # logits: (n, V_local) this rank's vocab columns [vocab_start, vocab_start + V_local); targets: (n,)
        z = logits.float()  # one fp32 (n, V_local) buffer, worked on in place: the largest tensor of the step
        if z.data_ptr() == logits.data_ptr():
            z = z.clone()
        if vocab_valid < z.shape[-1]:  # padded vocab columns are never predicted
            z[:, vocab_valid:] = float("-inf")
        zmax = C.all_reduce(z.max(dim=-1).values, group, op="max")
        z.sub_(zmax.unsqueeze(-1))
        local = targets - vocab_start
        mine = (local >= 0) & (local < z.shape[-1])
        local = local.masked_fill(~mine, 0)
        target_logit = z.gather(-1, local.unsqueeze(-1)).squeeze(-1).masked_fill(~mine, 0.0)
        C.all_reduce(target_logit, group)
        z.exp_()
        sum_exp = C.all_reduce(z.sum(dim=-1), group)
        loss = sum_exp.log() - target_logit
        ctx.save_for_backward(z.div_(sum_exp.unsqueeze(-1)), local, mine)  # softmax
        ctx.in_dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local, mine = ctx.saved_tensors
        grad = softmax
        rows = torch.arange(grad.shape[0], device=grad.device)
        grad[rows, local] -= mine.to(grad.dtype)
        grad.mul_(grad_loss.unsqueeze(-1))
        return grad.to(ctx.in_dtype), None, None, None, None


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
