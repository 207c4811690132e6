"""Fused elementwise chains: eager on CPU (the reference), compiled on CUDA to the same values; cross-entropy
against torch's own, forward and backward, with padded vocab columns and ignored targets."""
import pytest
import torch
import torch.nn.functional as F

from megalysses.models.gpt import swiglu
from megalysses.models.rope import apply_rope
from megalysses.models.spec import rms_norm
from megalysses.parallel.collectives import CommGroup
from megalysses.parallel.fused import fused
from megalysses.parallel.tensor import vocab_parallel_cross_entropy


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_matches_torch_with_padding_and_ignored_targets(dtype, device):
    torch.manual_seed(0)
    n, vocab, padded = 37, 101, 104  # three padded columns that must never be predicted
    logits = (torch.randn(n, padded) * 3).to(device, dtype).requires_grad_()
    targets = torch.randint(0, vocab, (n,), device=device)
    targets[[3, 9]] = -100  # ignored
    loss = vocab_parallel_cross_entropy(logits, targets, vocab, CommGroup.solo())
    grad_out = torch.rand(n, device=device)
    (loss * grad_out).sum().backward()
    ref_logits = logits.detach().float()[:, :vocab].requires_grad_()
    ref = F.cross_entropy(ref_logits, targets, ignore_index=-100, reduction="none")
    (ref * grad_out).sum().backward()
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(loss, ref, **tol)
    assert logits.grad.dtype == dtype and (logits.grad[:, vocab:] == 0).all()
    torch.testing.assert_close(logits.grad[:, :vocab].float(), ref_logits.grad, **tol)


def test_fused_runs_the_function_itself_on_cpu():
    calls = []

    @fused
    def double(x):
        calls.append(1)
        return 2 * x

    assert torch.equal(double(torch.ones(3)), torch.full((3,), 2.0)) and calls == [1]
    assert double.eager is double.__wrapped__


def _chains(device, dtype):
    torch.manual_seed(0)
    x = torch.randn(2, 64, 4, 32, device=device, dtype=dtype, requires_grad=True)
    angles = torch.randn(2, 64, 1, 32, device=device)
    h = torch.randn(2, 64, 96, device=device, dtype=dtype, requires_grad=True)
    w = torch.randn(48, device=device, dtype=dtype, requires_grad=True)
    return x, angles.cos(), angles.sin(), h, w


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_chains_match_eager_on_cuda(dtype):
    outs = {}
    for mode in ("compiled", "eager"):
        x, cos, sin, h, w = _chains("cuda", dtype)
        pick = (lambda f: f) if mode == "compiled" else (lambda f: f.eager)
        ys = [pick(apply_rope)(x, cos, sin), pick(swiglu)(h), pick(rms_norm)(h[..., :48], w, 1e-5)]
        sum((y.float() ** 2).sum() for y in ys).backward()
        outs[mode] = ys + [x.grad, h.grad, w.grad]
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for a, b in zip(outs["compiled"], outs["eager"]):
        torch.testing.assert_close(a.float(), b.float(), **tol)
