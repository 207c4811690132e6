"""Attention-core selection: sdpa / flash / te / auto, the errors where a core cannot run, and the varlen plumbing."""
import logging

import pytest
import torch
import torch.nn.functional as F

from megalysses.models import cores as A
from megalysses.models.config import GPTConfig
from megalysses.models.cores import Documents, FlashAttention, build_attention_core, sdpa_attention


def _reference_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal):
    """A stand-in for flash_attn_varlen_func: causal GQA attention per document of the flattened tokens."""
    out = torch.empty_like(q)
    for a, b in zip(cu_seqlens_q[:-1].tolist(), cu_seqlens_q[1:].tolist()):
        qq, kk, vv = (t[a:b].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        o = F.scaled_dot_product_attention(qq, kk, vv, is_causal=causal, scale=softmax_scale, enable_gqa=True)
        out[a:b] = o[0].transpose(0, 1)
    return out, None  # flash-attn-4 style (out, lse)


def _reference_dense(q, k, v, softmax_scale, causal):
    return sdpa_attention(q, k, v, scale=softmax_scale)


def test_flash_core_plumbing_matches_sdpa_with_packed_documents():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 12, 4, 8), torch.randn(2, 12, 2, 8), torch.randn(2, 12, 2, 8)
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5, 6, 7, 8, 0, 1, 2]])
    docs = Documents.from_positions(pos)
    core = FlashAttention(("fake", _reference_dense, _reference_varlen))
    assert torch.allclose(core(q, k, v, docs=docs), sdpa_attention(q, k, v, docs=Documents.from_positions(pos)),
                          atol=1e-6)
    assert torch.allclose(core(q, k, v), sdpa_attention(q, k, v), atol=1e-6)


def test_flash_without_cuda_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(A.FlashAttentionUnavailable, match="needs a CUDA GPU.*use 'sdpa'"):
        build_attention_core("flash", 4, 2, 8)


def test_flash_not_installed_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(A, "find_flash_attn", lambda: None)
    with pytest.raises(A.FlashAttentionUnavailable, match="needs flash-attn: `pip install flash-attn-4`"):
        build_attention_core("flash", 4, 2, 8)


def test_flash_attn_4_needs_hopper(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    monkeypatch.setattr(A, "find_flash_attn", lambda: ("flash-attn-4", None, None))
    with pytest.raises(A.FlashAttentionUnavailable, match=r"compute capability 9.0 or newer.*\(8, 0\)"):
        build_attention_core("flash", 4, 2, 8)


@pytest.mark.parametrize("cuda,found,capability,expected,reason", [
    (False, None, None, "sdpa", "no CUDA device"),
    (True, None, (9, 0), "sdpa", "flash-attn is not installed"),
    (True, ("flash-attn-4", None, None), (9, 0), "flash", "flash-attn-4 on a Hopper-class GPU"),
    (True, ("flash-attn-2", None, None), (9, 0), "sdpa", "SDPA's cuDNN kernels are faster"),
])
def test_auto_picks_the_fastest_available_and_says_why(monkeypatch, caplog, cuda, found, capability, expected, reason):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    monkeypatch.setattr(A, "find_flash_attn", lambda: found)
    name, why = A.choose_auto_core()
    assert name == expected and reason in why
    with caplog.at_level(logging.INFO, logger="megalysses"):  # the one place 'auto' is decided
        assert A.resolve_auto_core(GPTConfig(attention_core="auto")).attention_core == expected
    assert f"attention core: {expected} ({why})" in caplog.text


def test_te_core_without_cuda_is_a_clear_error(monkeypatch):
    from megalysses.models.te import TransformerEngineUnavailable

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(TransformerEngineUnavailable, match="needs a CUDA GPU.*use backend 'torch'"):
        build_attention_core("te", 4, 2, 8)


def test_unknown_core_lists_the_choices():
    with pytest.raises(ValueError, match="attention_core = 'xformers': choose one of sdpa, flash, te"):
        build_attention_core("xformers", 4, 2, 8)
    with pytest.raises(ValueError, match=r"resolve 'auto' with resolve_auto_core\(cfg\) first"):
        build_attention_core("auto", 4, 2, 8)
