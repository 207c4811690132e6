"""A complete export: HF (Llama, Qwen2, with a tokenizer, a chat template and bos / eos / pad ids that differ from the
family defaults) -> ours -> HF carries the tokenizer files, the ids and generation_config.json, so transformers loads
the export's tokenizer, renders the same chat, and generate() stops on the source's eos; a checkpoint without them
takes the tokenizer from --tokenizer (a folder or a dataset prefix); settings HF cannot express are refused by name."""
import json
import shutil
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from megalysses.checkpoint.files import read_json, read_manifest  # noqa: E402
from megalysses.config import load_run_config  # noqa: E402
from megalysses.models.config import GPTConfig  # noqa: E402
from megalysses.models.hf import hf_config_from_gpt  # noqa: E402
from megalysses.tools.convert import finish_checkpoint, main  # noqa: E402
from megalysses.tools.preprocess import preprocess  # noqa: E402

SPECIALS = ["<unk>", "<r1>", "<r2>", "<r3>", "<r4>", "<pad>", "<|im_start|>", "<s>", "<r8>", "<|im_end|>"]
PAD, BOS, EOS, ALT_EOS = 5, 7, 9, 6  # Llama's defaults are bos 1, eos 2; Qwen2's are None
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CHAT = [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "the test"},
        {"role": "user", "content": "this is a world"}]
SMALL = dict(vocab_size=320, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=96, max_position_embeddings=256, rms_norm_eps=1e-5,
             bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
FAMILIES = {"llama": ("LlamaConfig", dict(tie_word_embeddings=False)),
            "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True))}


def save_tokenizer(folder: Path) -> None:
    """A byte-level BPE trained on a few words, with the specials at the ids above and a chat template."""
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS, show_progress=False,
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["hello world, this is the test of a tokenizer for the chat"] * 20, trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|im_end|>",
                                                pad_token="<pad>")
    fast.chat_template = TEMPLATE
    fast.save_pretrained(folder)


@torch.no_grad()
def save_hf_model(family: str, folder: Path) -> None:
    """A tiny random model whose greedy next token is always EOS (residual dimension 0 is large for every token,
    and only EOS's output row reads it strongly), saved with a generation config and the tokenizer."""
    config_cls, extra = FAMILIES[family]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, config_cls)(**SMALL, **extra)).float()
    model.model.embed_tokens.weight[:, 0] = 4.0
    model.lm_head.weight[EOS, 0] = 12.0  # tied for qwen2: the embedding row too
    model.generation_config = transformers.GenerationConfig(bos_token_id=BOS, eos_token_id=[EOS, ALT_EOS],
                                                            pad_token_id=PAD, max_new_tokens=7)
    model.save_pretrained(folder, safe_serialization=True)
    save_tokenizer(folder)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """family -> (HF source, our checkpoint, HF export)."""
    root = tmp_path_factory.mktemp("export")
    out = {}
    for family in FAMILIES:
        hf, ours, back = root / f"{family}-hf", root / f"{family}-ours", root / f"{family}-back"
        save_hf_model(family, hf)
        assert main(["hf-to-megalysses", str(hf), str(ours), "--quiet"]) == 0
        assert main(["megalysses-to-hf", str(ours), str(back), "--quiet"]) == 0
        out[family] = (hf, ours, back)
    return out


def load_json(path: Path) -> dict:
    return json.loads(path.read_text())


def greedy(folder: Path, **kwargs) -> list[int]:
    """The new tokens of a greedy generate() from the folder's model on a short prompt."""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    prompt = torch.tensor([[BOS, 20, 30, 40]])
    out = model.generate(prompt, do_sample=False, max_new_tokens=5, **kwargs)
    return out[0, prompt.shape[1]:].tolist()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_checkpoint_records_ids_generation_config_and_tokenizer_files(exported, family):
    hf, ours, _ = exported[family]
    source = read_json(ours / "meta.json", "")["source"]
    assert source["token_ids"] == {"bos_token_id": BOS, "eos_token_id": EOS, "pad_token_id": PAD}
    assert source["generation_config"] == load_json(hf / "generation_config.json")
    assert source["tokenizer_files"] == ["chat_template.jinja", "tokenizer.json", "tokenizer_config.json"]
    listed = read_manifest(ours)["files"]
    for name in source["tokenizer_files"]:
        assert (ours / "hf_extra" / name).read_bytes() == (hf / name).read_bytes()  # copied, not re-serialised
        assert f"hf_extra/{name}" in listed  # hash-checked like the weights


@pytest.mark.parametrize("family", list(FAMILIES))
def test_export_loads_with_its_tokenizer_and_stops_on_the_source_eos(exported, family):
    hf, _, back = exported[family]
    source_tok, export_tok = (transformers.AutoTokenizer.from_pretrained(f) for f in (hf, back))
    assert export_tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True) == \
        source_tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert export_tok.chat_template == TEMPLATE
    assert (export_tok.bos_token_id, export_tok.eos_token_id, export_tok.pad_token_id) == (BOS, EOS, PAD)
    config, source_config = load_json(back / "config.json"), load_json(hf / "config.json")
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        assert config[key] == source_config[key], key
    generation = load_json(back / "generation_config.json")
    assert generation == load_json(hf / "generation_config.json") and generation["eos_token_id"] == [EOS, ALT_EOS]
    assert greedy(back, eos_token_id=generation["eos_token_id"]) == [EOS] == greedy(hf)
    assert greedy(back) == [EOS]  # generate()'s defaults, read from the export's generation_config.json


def test_reshard_keeps_what_the_export_needs(exported, tmp_path):
    hf, ours, _ = exported["qwen2"]
    assert main(["reshard", str(ours), str(tmp_path / "pp2"), "--layout", "{pp: 2}", "--quiet"]) == 0
    assert main(["megalysses-to-hf", str(tmp_path / "pp2"), str(tmp_path / "back"), "--quiet"]) == 0
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (tmp_path / "back" / name).read_bytes() == (hf / name).read_bytes(), name
    assert load_json(tmp_path / "back" / "generation_config.json") == load_json(hf / "generation_config.json")


def strip_extras(ours: Path, out: Path) -> Path:
    """A copy of a converted checkpoint as the trainer writes one: no source, no hf_extra/ (manifest rewritten)."""
    shutil.copytree(ours, out)
    shutil.rmtree(out / "hf_extra")
    meta = read_json(out / "meta.json", "")
    finish_checkpoint(out, load_run_config(out / "config.yaml"), {**meta, "source": None})
    return out


def test_training_checkpoint_takes_the_tokenizer_from_the_flag(exported, tmp_path, capsys):
    hf, ours, _ = exported["llama"]
    trained = strip_extras(ours, tmp_path / "trained")
    capsys.readouterr()
    assert main(["megalysses-to-hf", str(trained), str(tmp_path / "bare"), "--quiet"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "no tokenizer files written" in warnings[0] and "--tokenizer" in warnings[0]
    assert not (tmp_path / "bare" / "tokenizer.json").exists()

    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in ("hello world", "this is the chat")))
    preprocess([str(docs)], str(tmp_path / "data" / "chat"), tokenizer=str(hf), eos_token="<|im_end|>", workers=1)
    assert main(["megalysses-to-hf", str(trained), str(tmp_path / "via-data"), "--quiet",
                 "--tokenizer", str(tmp_path / "data" / "chat")]) == 0  # the dataset records the source folder
    assert load_json(tmp_path / "via-data" / "generation_config.json") == load_json(hf / "generation_config.json")
    assert load_json(tmp_path / "via-data" / "config.json")["eos_token_id"] == EOS

    tok_only = tmp_path / "tok"
    save_tokenizer(tok_only)
    assert main(["megalysses-to-hf", str(trained), str(tmp_path / "via-folder"), "--quiet",
                 "--tokenizer", str(tok_only)]) == 0
    assert "warning" not in capsys.readouterr().err
    config = load_json(tmp_path / "via-folder" / "config.json")
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (BOS, EOS, PAD)
    assert load_json(tmp_path / "via-folder" / "generation_config.json")["eos_token_id"] == EOS
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "via-folder")
    assert tok.apply_chat_template(CHAT, tokenize=False) == \
        transformers.AutoTokenizer.from_pretrained(hf).apply_chat_template(CHAT, tokenize=False)
    assert greedy(tmp_path / "via-folder") == [EOS]


def fails(args: list, out: Path, capsys, *expected: str) -> str:
    """main(args + [out, --quiet]) exits 2 with one line naming `expected`, and leaves nothing behind."""
    capsys.readouterr()
    assert main([*map(str, args[:2]), str(out), *map(str, args[2:]), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("megalysses-convert: error: "), err
    for text in expected:
        assert text in err, (text, err)
    assert not out.exists() and not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]
    return err


def test_settings_hf_cannot_express_are_refused_by_name(exported, tmp_path, capsys):
    _, ours, _ = exported["llama"]
    scaled = tmp_path / "scaled"
    shutil.copytree(ours, scaled)
    run = load_run_config(scaled / "config.yaml")
    run = type(run)(**{**run.__dict__, "model": GPTConfig(**{**run.model.__dict__, "softmax_scale": 0.2})})
    finish_checkpoint(scaled, run, read_json(scaled / "meta.json", ""))
    fails(["megalysses-to-hf", scaled], tmp_path / "out", capsys, "model.softmax_scale = 0.2",
          "1/sqrt(head_dim) = 0.25", "model.softmax_scale null")
    model = GPTConfig(softmax_scale=0.25, head_dim=16)  # the default scale, written out: nothing is lost
    assert hf_config_from_gpt(model, "llama")["head_dim"] == 16


def test_a_field_hf_configs_do_not_know_is_refused_unless_at_its_default():
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class Windowed(GPTConfig):
        sliding_window: int = 0

    with pytest.raises(ValueError, match=r"model.sliding_window = 64 has no llama config.json equivalent.*= 0"):
        hf_config_from_gpt(Windowed(sliding_window=64), "llama")
    assert hf_config_from_gpt(Windowed(attention_core="flash", backend="te"), "llama")["model_type"] == "llama"


def test_bad_tokenizer_flags_are_one_line_each(exported, tmp_path, capsys):
    hf, ours, _ = exported["qwen2"]
    weights_only = tmp_path / "weights-only"
    weights_only.mkdir()
    shutil.copy(hf / "config.json", weights_only)
    out = tmp_path / "out"
    fails(["megalysses-to-hf", ours, "--tokenizer", weights_only], out, capsys, "weights-only holds no tokenizer",
          "save_pretrained")
    fails(["megalysses-to-hf", ours, "--tokenizer", tmp_path / "nowhere"], out, capsys, "nowhere: no such folder")
    (tmp_path / "text.txt").write_text("bytes")
    preprocess([str(tmp_path / "text.txt")], str(tmp_path / "bytes"), workers=1)
    fails(["megalysses-to-hf", ours, "--tokenizer", tmp_path / "bytes"], out, capsys, "byte-level tokenizer")
    big = tmp_path / "big"
    shutil.copytree(hf, big)
    data = load_json(big / "tokenizer.json")
    data["added_tokens"].append({**data["added_tokens"][-1], "id": 400, "content": "<extra>"})
    (big / "tokenizer.json").write_text(json.dumps(data))
    fails(["megalysses-to-hf", ours, "--tokenizer", big], out, capsys, "token ids up to 400",
          "vocab_size is 320")
