"""Fine-tuning end to end, as a user runs it, offline: a random HF Llama (untied) and Qwen2 (tied) with a trained
tokenizer and chat template -> chat JSONL preprocessed with its loss mask -> train from checkpoint.init_from on
tp2-sp2 (killed and rerun: it resumes) and pp2-sp2 -> megalysses-to-hf -> transformers loads the export with its
tokenizer, generate() stops on the source's end-of-turn id, and its loss (labels -100 on prompt tokens) on a held-out
conversation equals ours within 1e-5."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from megalysses.checkpoint import TensorReader, TrainingState  # noqa: E402
from megalysses.config import load_run_config  # noqa: E402
from megalysses.models.gpt import GPT  # noqa: E402
from megalysses.parallel.sequence import IGNORE_INDEX  # noqa: E402
from megalysses.tools.convert import main as convert  # noqa: E402
from megalysses.tools.preprocess import main as preprocess  # noqa: E402
from hf_random import randomize_  # noqa: E402
from test_chat_data import CONVERSATIONS, reference_mask, save_tokenizer, write_jsonl  # noqa: E402

HELD_OUT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello, how are you?"},
            {"role": "assistant", "content": "Fine, thanks! Six."}]
FAMILIES = {"llama": ("LlamaConfig", dict(tie_word_embeddings=False)),
            "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True))}
RUN = """\
layout: {layout}
train: {{device: cpu, nproc: 4, seq_len: 96, micro_batch_size: 1, global_batch_size: 4, steps: {steps}, lr: 1.0e-3,
        min_lr: 1.0e-4, warmup_steps: 1, eval_every: 0}}
data: {{source: {data}, val_fraction: 0.0}}
checkpoint: {{init_from: {source}, every: 2}}
logging: {{run_dir: {run_dir}, interval: 1}}
"""


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return save_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("chat")
    trainable = [c for c in CONVERSATIONS if any(m["role"] == "assistant" for m in c)]
    src = write_jsonl(root / "chats.jsonl", [{"messages": c} for c in trainable * 40])
    assert preprocess([str(src), "-o", str(root / "sft"), "--tokenizer", str(tokenizer_dir), "--workers", "1",
                       "--progress-every", "1e9"]) == 0
    return root / "sft"


def hf_source(root: Path, family: str, tokenizer_dir: Path) -> tuple[Path, int]:
    """A random HF model whose bos / eos / pad ids are the tokenizer's (end-of-turn as eos, unlike any family
    default), saved with that tokenizer; returns (folder, eos id)."""
    tok = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<s>", "</s>", "<|end|>")}
    config_cls, extra = FAMILIES[family]
    config = getattr(transformers, config_cls)(
        vocab_size=416, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=96, max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=ids["<s>"],
        eos_token_id=ids["<|end|>"], pad_token_id=ids["</s>"], **extra)
    torch.manual_seed(1)
    model = transformers.AutoModelForCausalLM.from_config(config).float()
    randomize_(model)
    folder = root / f"{family}-hf"
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(str(folder))
    return folder, ids["<|end|>"]


def train(run_file: Path, *overrides: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "megalysses.train", "--config", str(run_file), *overrides],
                            env=env, start_new_session=True, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)


def finished(proc: subprocess.Popen) -> str:
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out
    return out


def kill_after_a_checkpoint(proc: subprocess.Popen, run_dir: Path) -> None:
    """SIGKILL the whole run (launcher and ranks) once a checkpoint exists and a later step was logged."""
    deadline = time.monotonic() + 240
    metrics, latest = run_dir / "metrics.jsonl", run_dir / "checkpoints" / "latest"
    while not (latest.exists() and metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def ours_loss(ckpt: Path, tokens: list[int], mask: list[int]) -> float:
    """Our model on the checkpoint, one device: the mean loss over the trained targets of one conversation."""
    cfg = load_run_config(ckpt / "config.yaml").model
    model = GPT(cfg).eval()
    TrainingState([model], model.mesh).load(TensorReader(ckpt), with_optimizer=False)
    ids = torch.tensor([tokens])
    labels = torch.tensor([tokens[1:] + [IGNORE_INDEX]])
    labels[0, :-1][torch.tensor(mask[1:]) == 0] = IGNORE_INDEX  # target t + 1 trained only where the mask says
    with torch.no_grad():
        per_token = model(ids, labels=labels)
    valid = labels != IGNORE_INDEX
    return (per_token[valid].sum() / valid.sum()).item()


def check_export(ckpt: Path, export: Path, source: Path, eos: int) -> None:
    tok = transformers.AutoTokenizer.from_pretrained(str(export), local_files_only=True)
    source_tok = transformers.AutoTokenizer.from_pretrained(str(source), local_files_only=True)
    tokens, mask = reference_mask(tok, HELD_OUT)
    assert tokens == reference_mask(source_tok, HELD_OUT)[0]  # the same tokenizer and chat template
    model = transformers.AutoModelForCausalLM.from_pretrained(str(export), attn_implementation="eager").eval()
    assert model.generation_config.eos_token_id == eos and model.config.eos_token_id == eos
    labels = torch.tensor([[t if m else IGNORE_INDEX for t, m in zip(tokens, mask)]])  # HF shifts them itself
    with torch.no_grad():
        hf_loss = model(torch.tensor([tokens]), labels=labels).loss.item()
    ours = ours_loss(ckpt, tokens, mask)
    assert abs(hf_loss - ours) <= 1e-5 * ours, (hf_loss, ours)

    # generate() with the export's own generation config stops at its eos: steer a copy of the model to emit it
    # second (a large constant channel in every embedding, read by the head's eos row only)
    steered = transformers.AutoModelForCausalLM.from_pretrained(str(export), attn_implementation="eager").eval()
    with torch.no_grad():
        steered.model.norm.weight.zero_()[0] = 1.0
        steered.model.embed_tokens.weight[:, 0] = 100.0
        head = steered.get_output_embeddings().weight
        if head.data_ptr() != steered.model.embed_tokens.weight.data_ptr():
            head.zero_()
        head[eos, 0] = 300.0
    prompt = tok.apply_chat_template(HELD_OUT[:2], add_generation_prompt=True, return_tensors="pt",
                                     return_dict=True)
    out = steered.generate(**prompt, max_new_tokens=8, do_sample=False)
    new = out[0, prompt["input_ids"].shape[1]:].tolist()
    assert new == [eos], new  # stopped on the source's eos, not a family default


def test_llama_init_from_tp2_sp2_killed_and_rerun_then_exported(tmp_path, tokenizer_dir, chat_data):
    source, eos = hf_source(tmp_path, "llama", tokenizer_dir)
    run_dir = tmp_path / "run"
    run = tmp_path / "run.yaml"
    run.write_text(RUN.format(layout="tp2-sp2", steps=6, data=chat_data, source=source, run_dir=run_dir))
    kill_after_a_checkpoint(train(run), run_dir)
    out = finished(train(run))  # the same command: resumes the run's own checkpoint, not init_from
    assert "resumed from" in out and "weights from" not in out, out
    ckpt = run_dir / "checkpoints" / "step-6"
    assert convert(["megalysses-to-hf", str(ckpt), str(tmp_path / "export"), "--quiet"]) == 0
    check_export(ckpt, tmp_path / "export", source, eos)


def test_qwen2_init_from_pp2_sp2_then_exported(tmp_path, tokenizer_dir, chat_data):
    source, eos = hf_source(tmp_path, "qwen2", tokenizer_dir)
    run_dir = tmp_path / "run"
    run = tmp_path / "run.yaml"
    run.write_text(RUN.format(layout="{pp: 2, sp: 2}", steps=2, data=chat_data, source=source, run_dir=run_dir))
    out = finished(train(run))
    assert "weights from" in out, out
    ckpt = run_dir / "checkpoints" / "step-2"
    assert json.loads((ckpt / "meta.json").read_text())["source"]["family"] == "qwen2"
    assert convert(["megalysses-to-hf", str(ckpt), str(tmp_path / "export"), "--quiet"]) == 0
    check_export(ckpt, tmp_path / "export", source, eos)
