"""Fused elementwise chains: eager on CPU (the reference), compiled on CUDA to the same values; cross-entropy
against torch's own, forward and backward, with padded vocab columns and ignored targets."""
import pytest
import torch
import torch.nn.functional as F

from megalysses.models.gpt import swiglu
from megalysses.models.rope import apply_rope
from megalysses.models.spec import rms_norm
from megalysses.parallel.collectives import CommGroup
from megalysses.parallel import kernel_fusion as fused_module
from megalysses.parallel.kernel_fusion import PASS_THROUGH, fused
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


class _CudaLike:
    """Stands for a CUDA tensor as a chain's first argument (the chain compiles only for those)."""
    is_cuda = True


@pytest.mark.parametrize("signal", PASS_THROUGH)
def test_recomputation_stop_and_oom_cross_a_compiled_chain(monkeypatch, signal):
    """The checkpoint's early stop (and OOM) raised inside a compiled chain reach the caller; the chain stays
    compiled (a compile failure would run it eagerly again, past the stop: backward then fails)."""
    raised = []

    def compiled(*args, **kwargs):
        raised.append(signal)
        raise signal()

    monkeypatch.setattr(fused_module, "ENABLED", True)
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: compiled)
    eager_calls = []
    chain = fused(lambda x: eager_calls.append(x))
    for _ in range(2):
        with pytest.raises(signal):
            chain(_CudaLike())
    assert len(raised) == 2 and eager_calls == []


def test_a_chain_that_fails_to_compile_runs_eagerly(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("unsupported")

    monkeypatch.setattr(fused_module, "ENABLED", True)
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: broken)
    chain = fused(lambda x: "eager")
    assert chain(_CudaLike()) == "eager" and chain(_CudaLike()) == "eager"


def _chains(device, dtype):
    """(x, cos, sin, h, w): RoPE input and angles, SwiGLU / RMSNorm input and norm weight."""
    torch.manual_seed(0)
    x = torch.randn(2, 64, 4, 32, device=device, dtype=dtype, requires_grad=True)
    angles = torch.randn(2, 64, 1, 32, device=device)
    h = torch.randn(2, 64, 96, device=device, dtype=dtype, requires_grad=True)
    w = torch.randn(48, device=device, dtype=dtype, requires_grad=True)
    return x, angles.cos(), angles.sin(), h, w


def test_chains_run_eagerly_on_cpu_in_both_modes():
    x, cos, sin, h, w = _chains("cpu", torch.float32)
    a = _run_chains(*_leaves((x, cos, sin, h, w), torch.float32), compiled=True)
    b = _run_chains(*_leaves((x, cos, sin, h, w), torch.float32), compiled=False)
    assert all(torch.equal(p, q) for p, q in zip(a, b))  # on CPU the "compiled" call is the function itself


def _run_chains(x, cos, sin, h, w, compiled: bool) -> list[torch.Tensor]:
    """Outputs of the three chains and the gradients of a sum of squares of them."""
    pick = (lambda f: f) if compiled else (lambda f: f.eager)
    ys = [pick(apply_rope)(x, cos, sin), pick(swiglu)(h), pick(rms_norm)(h[..., :48], w, 1e-5)]
    sum((y.float() ** 2).sum() for y in ys).backward()
    return [y.detach().float() for y in ys] + [t.grad.float() for t in (x, h, w)]


def _leaves(tensors, dtype):
    return [t.detach().to(dtype).requires_grad_(t.requires_grad) for t in tensors]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_chains_are_as_accurate_as_eager_on_cuda(dtype):
    """Against a float64 reference, the fused kernels err no more than the eager chain in the same dtype (they keep
    intermediates in float32, so in bf16 they are usually closer)."""
    inputs = _chains("cuda", torch.float32)
    reference = _run_chains(*_leaves(inputs, torch.float64), compiled=False)
    compiled = _run_chains(*_leaves(inputs, dtype), compiled=True)
    eager = _run_chains(*_leaves(inputs, dtype), compiled=False)
    for ref, c, e in zip(reference, compiled, eager):
        scale = ref.abs().max().item()
        err_c, err_e = ((c - ref).abs().max().item() / scale, (e - ref).abs().max().item() / scale)
        assert err_c <= 2 * err_e + (1e-6 if dtype == torch.float32 else 1e-3), (err_c, err_e)
