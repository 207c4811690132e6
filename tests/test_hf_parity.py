"""HF adapters: our GPT loaded from a transformers model gives the same logits and loss; conversions round-trip."""
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from megalysses.models.config import GPTConfig, RopeScaling  # noqa: E402
from megalysses.models.gpt import GPT  # noqa: E402
from megalysses.models.hf import (  # noqa: E402
    gpt_config_from_hf, gpt_state_to_hf, hf_config_from_gpt, hf_names, hf_to_ours, load_hf_state_dict_into,
    our_names, ours_to_hf, permute_for_rope, unpermute)
from megalysses.models.rope import apply_rope, rope_cos_sin, rope_inv_freq  # noqa: E402
from hf_random import randomize_

SMALL = dict(vocab_size=131, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=96, max_position_embeddings=256, rms_norm_eps=1e-5)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}
FAMILIES = {
    # family: (config class, model class, extra config): llama untied + llama3 scaling, mistral untied, qwen2 tied
    "llama": ("LlamaConfig", "LlamaForCausalLM",
              dict(tie_word_embeddings=False, rope_parameters={**LLAMA3, "rope_theta": 10000.0})),
    "mistral": ("MistralConfig", "MistralForCausalLM",
                dict(tie_word_embeddings=False, sliding_window=None,
                     rope_parameters={"rope_type": "default", "rope_theta": 100000.0})),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM",
              dict(tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM",  # per-head q/k RMSNorm; head_dim not hidden / heads
              dict(tie_word_embeddings=False, head_dim=24, rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
}
_MODELS = {}


def hf_model(family: str):
    """A small random float32 HF model; norms and biases are randomised too so that they are tested."""
    if family not in _MODELS:
        config_cls, model_cls, extra = FAMILIES[family]
        config = getattr(transformers, config_cls)(**SMALL, **extra, attn_implementation="eager")
        torch.manual_seed(0)
        model = getattr(transformers, model_cls)(config).float().eval()
        randomize_(model)
        _MODELS[family] = model
    return _MODELS[family]


def ours_from(hf) -> GPT:
    model = GPT(gpt_config_from_hf(hf.config.to_dict())).eval()
    load_hf_state_dict_into(model, hf.state_dict())
    return model


def rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_and_loss_match_transformers(family):
    hf = hf_model(family)
    ours = ours_from(hf)
    cfg = ours.cfg
    assert cfg.qkv_bias == (family == "qwen2") and cfg.tie_embeddings == (family == "qwen2")
    assert (cfg.rope_scaling is not None) == (family == "llama") and cfg.num_kv_heads == 2
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (2, 24), generator=gen)
    labels = torch.randint(0, cfg.vocab_size, (2, 24), generator=gen)
    labels[0, 5:9] = -100
    ours_labels = torch.full_like(labels, -100)
    ours_labels[:, :-1] = labels[:, 1:]  # HF shifts labels inside; our loss is per position, unshifted
    errors = {}
    with torch.no_grad():
        for offset in (0, 150):  # positions past the llama3 original context exercise the scaled frequencies
            pos = torch.arange(offset, offset + 24).expand(2, 24)
            out = hf(ids, position_ids=pos, labels=labels)
            logits = ours(ids, position_ids=pos)
            assert logits.shape == out.logits.shape == (2, 24, cfg.vocab_size)
            per_token = ours(ids, position_ids=pos, labels=ours_labels)
            valid = ours_labels != -100
            loss = per_token[valid].sum() / valid.sum()
            errors[offset] = (rel(logits, out.logits), abs(loss.item() - out.loss.item()) / out.loss.item())
    print(f"\n{family}: worst logits rel err {max(e[0] for e in errors.values()):.2e}, "
          f"worst loss rel err {max(e[1] for e in errors.values()):.2e}")
    for logit_err, loss_err in errors.values():
        assert logit_err < 1e-5 and loss_err < 1e-6, errors


@pytest.mark.parametrize("family", list(FAMILIES))
def test_state_dict_round_trip_is_exact(family):
    hf = hf_model(family)
    state = hf.state_dict()
    cfg = gpt_config_from_hf(hf.config.to_dict())
    expected = set(state) - ({"lm_head.weight"} if cfg.tie_embeddings else set())
    assert set(hf_names(cfg)) == expected
    ours = dict(hf_to_ours(state.__getitem__, cfg))
    assert list(ours) == our_names(cfg)
    back = dict(ours_to_hf(ours.__getitem__, cfg))
    assert set(back) == expected
    for name, t in back.items():
        assert torch.equal(t, state[name]), name
    model = ours_from(hf)  # through a GPT and back again
    assert {n for n, _ in model.named_parameters()} == set(our_names(cfg))
    for name, t in gpt_state_to_hf(model).items():
        assert torch.equal(t, state[name]), name


CONFIGS = [
    (GPTConfig(), "llama"),
    (GPTConfig(vocab_size=131, num_kv_heads=2, head_dim=32, rope_theta=500000.0, max_seq_len=4096,
               rope_scaling=RopeScaling(8.0, 1.0, 4.0, 1024), init_std=0.01), "llama"),
    (GPTConfig(num_kv_heads=1, tie_embeddings=True, rms_norm_eps=1e-6), "mistral"),
    (GPTConfig(qkv_bias=True, tie_embeddings=True, head_dim=8, rope_theta=1e6), "qwen2"),
    (GPTConfig(qk_norm=True, num_kv_heads=2, head_dim=32, rms_norm_eps=1e-6, rope_theta=1e6), "qwen3"),
]


@pytest.mark.parametrize("cfg,family", CONFIGS)
def test_config_round_trip(cfg, family):
    d = hf_config_from_gpt(cfg, family)
    assert d["model_type"] == family and d["architectures"] == [FAMILIES[family][1]]
    assert gpt_config_from_hf(d) == cfg
    hf_cfg = transformers.AutoConfig.for_model(**d)  # transformers accepts it and keeps every value
    assert type(hf_cfg).__name__ == FAMILIES[family][0]
    assert gpt_config_from_hf(hf_cfg.to_dict()) == cfg
    assert gpt_config_from_hf(d, attention_core="sdpa") == cfg


def test_old_and_new_rope_forms_agree():
    new = {**SMALL, "model_type": "llama", "rope_parameters": {**LLAMA3, "rope_theta": 5e5}}
    old = {**SMALL, "model_type": "llama", "rope_theta": 5e5, "rope_scaling": dict(LLAMA3)}
    older = {**SMALL, "model_type": "llama", "rope_theta": 5e5,
             "rope_scaling": {"type": "llama3", **{k: v for k, v in LLAMA3.items() if k != "rope_type"}}}
    cfg = gpt_config_from_hf(new)
    assert cfg.rope_theta == 5e5 and cfg.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 64)
    assert gpt_config_from_hf(old) == cfg == gpt_config_from_hf(older)
    plain = gpt_config_from_hf({**SMALL, "model_type": "mistral", "rope_theta": 1e6})
    assert plain.rope_theta == 1e6 and plain.rope_scaling is None


def test_config_errors():
    with pytest.raises(ValueError, match=r"'gpt_neox'.*llama.*mistral.*qwen2"):
        gpt_config_from_hf({**SMALL, "model_type": "gpt_neox"})
    with pytest.raises(ValueError, match="'yarn'"):
        gpt_config_from_hf({**SMALL, "model_type": "llama", "rope_parameters": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ValueError, match="'linear'"):
        gpt_config_from_hf({**SMALL, "model_type": "llama", "rope_scaling": {"type": "linear", "factor": 2.0}})
    with pytest.raises(ValueError, match="sliding_window 4096"):
        gpt_config_from_hf({**SMALL, "model_type": "mistral", "sliding_window": 4096})
    with pytest.raises(ValueError, match="o_proj"):
        gpt_config_from_hf({**SMALL, "model_type": "llama", "attention_bias": True})
    with pytest.raises(ValueError, match="qkv_bias"):
        hf_config_from_gpt(GPTConfig(), "qwen2")
    with pytest.raises(ValueError, match="'gpt2'"):
        hf_config_from_gpt(GPTConfig(), "gpt2")


def test_state_dict_errors():
    hf = hf_model("mistral")
    cfg = gpt_config_from_hf(hf.config.to_dict())
    state = dict(hf.state_dict())
    del state["model.layers.1.self_attn.k_proj.weight"]
    with pytest.raises(KeyError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight"):
        list(hf_to_ours(state.__getitem__, cfg))
    state = dict(hf.state_dict())
    state["model.layers.0.mlp.up_proj.weight"] = torch.zeros(95, 64)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.up_proj\.weight.*\(96, 64\).*\(95, 64\)"):
        load_hf_state_dict_into(GPT(cfg), state)
    ours = dict(hf_to_ours(hf.state_dict().__getitem__, cfg))
    ours["blocks.0.attn.qkv.weight"] = ours["blocks.0.attn.qkv.weight"][:-1]
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.qkv\.weight.*\(128, 64\).*\(127, 64\)"):
        list(ours_to_hf(ours.__getitem__, cfg))
    state = dict(hf.state_dict(), **{"model.layers.0.self_attn.o_proj.bias": torch.zeros(64)})
    with pytest.raises(ValueError, match="o_proj.bias"):
        load_hf_state_dict_into(GPT(cfg), state)


def test_meta_rope_permutation():
    """permute_for_rope turns Meta's interleaved q/k rows into our half-split rows: round trip exact, and attention
    scores under Meta's complex RoPE equal ours under the permuted weights."""
    torch.manual_seed(0)
    heads, hd, d, s = 2, 8, 16, 6
    wq, wk, bq = torch.randn(heads * hd, d), torch.randn(heads * hd, d), torch.randn(heads * hd)
    assert torch.equal(unpermute(permute_for_rope(wq, heads), heads), wq)
    assert torch.equal(permute_for_rope(unpermute(bq, heads), heads), bq)
    assert not torch.equal(permute_for_rope(wq, heads), wq)
    x = torch.randn(1, s, d)
    inv_freq = rope_inv_freq(hd, 10000.0)

    def meta_rope(t):  # (b, s, h, hd), pairs (2i, 2i+1) rotated as complex numbers
        angles = torch.arange(s).float()[:, None] * inv_freq  # (s, hd / 2)
        z = torch.view_as_complex(t.reshape(*t.shape[:-1], hd // 2, 2)) * torch.polar(torch.ones_like(angles),
                                                                                      angles)[None, :, None]
        return torch.view_as_real(z).flatten(-2)

    def scores(q, k):
        return torch.einsum("bshd,bthd->bhst", q, k)

    q, k = (x @ wq.T).view(1, s, heads, hd), (x @ wk.T).view(1, s, heads, hd)
    meta = scores(meta_rope(q), meta_rope(k))
    cos, sin = rope_cos_sin(torch.arange(s)[None], inv_freq, torch.float32)
    ours_q = apply_rope((x @ permute_for_rope(wq, heads).T).view(1, s, heads, hd), cos, sin)
    ours_k = apply_rope((x @ permute_for_rope(wk, heads).T).view(1, s, heads, hd), cos, sin)
    assert math.isclose(rel(scores(ours_q, ours_k), meta), 0.0, abs_tol=1e-6)
