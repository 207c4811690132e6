"""Bad inputs end in one line: every case runs a CLI's main() in-process on a malformed config, override, HF folder,
checkpoint, dataset or tokenizer and asserts the exit code, a single stderr line naming the value, the rule and the
fix, no traceback, and that nothing under the test's folder was written or deleted. No rank is ever started.

The before-ranks checks the train CLI is to call (check_data_against_model, check_overwrite) run here through
`precheck`, the few lines of that call."""
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from megalysses.checkpoint import Checkpointer
from megalysses.checkpoint.files import describe_files, payload_files, write_manifest
from megalysses.config import CheckpointConfig, LoggingConfig, RunConfig, TrainConfig
from megalysses.models.config import GPTConfig
from megalysses.tools.convert import main as convert
from megalysses.tools.preprocess import main as preprocess
from megalysses.train import QUICKSTART, load_checked
from megalysses.bench import main as bench
from megalysses.train import main as train

MODEL = GPTConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=2, intermediate_size=48)


class CreatesFile:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def precheck(argv):
    """What the train CLI runs before starting ranks, with its error handling: exit 2 and one line."""
    return 0 if load_checked("megalysses-train", str(QUICKSTART), argv) is not None else 2


# ------------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A saved checkpoint, its HF export, a byte-level dataset and a tiny tokenizer.json, built once."""
    from megalysses.models.gpt import GPT
    from megalysses.optim import build_data_parallel
    from megalysses.parallel import ParallelMesh
    from megalysses.tools.preprocess import preprocess as run_preprocess

    root = tmp_path_factory.mktemp("assets")
    cfg = RunConfig(model=MODEL, train=TrainConfig(global_batch_size=4, micro_batch_size=4, steps=2),
                    checkpoint=CheckpointConfig(dir=str(root / "ckpts")), logging=LoggingConfig(str(root / "run")))
    mesh = ParallelMesh.single_device()
    model = GPT(MODEL, mesh)
    model.init_weights(1)
    ckpt = Checkpointer(cfg, mesh, [model], build_data_parallel(model, mesh, cfg.train)).save(2)
    assert convert(["megalysses-to-hf", str(ckpt), str(root / "hf"), "--quiet"]) == 0
    (root / "docs.txt").write_text("a small document\nanother one\n" * 20)
    run_preprocess([str(root / "docs.txt")], str(root / "bytes"), text_docs="line",
                   progress=type("Quiet", (), {"update": lambda *a: None, "out": lambda *a: None,
                                               "line": lambda *a: ""})())
    return {"ckpt": ckpt, "hf": root / "hf", "bytes": root / "bytes", "root": root}


def copy_ckpt(assets, tmp):
    dest = tmp / "ckpts" / "step-2"
    shutil.copytree(assets["ckpt"], dest)
    return dest


def copy_hf(assets, tmp):
    dest = tmp / "hf"
    shutil.copytree(assets["hf"], dest)
    return dest


def copy_dataset(assets, tmp):
    for suffix in (".bin", ".idx", ".json"):
        shutil.copy(f"{assets['bytes']}{suffix}", tmp / f"bytes{suffix}")
    return tmp / "bytes"


def rehash(folder):
    write_manifest(folder, describe_files(folder, payload_files(folder)), 2)


def retensor(folder, name, tensor):
    """Rewrite one safetensors entry of an HF folder (in whichever shard holds it) as `tensor`."""
    from safetensors.torch import load_file, save_file

    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = folder / index["weight_map"].setdefault(name, sorted(index["weight_map"].values())[0])
    tensors = load_file(shard)
    tensors[name] = tensor
    save_file(tensors, shard)
    index_path.write_text(json.dumps(index))


def hf_first_shard(folder):
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    return folder / sorted(set(index["weight_map"].values()))[0]


# ----------------------------------------------------------------------------------------------------- cases
# Each case: (setup(assets, tmp) -> (main, argv), exit code, substrings the one line must hold: value, rule, fix).

def _crafted(remanifest):
    def setup(a, t):
        ckpt = copy_ckpt(a, t)
        size = (ckpt / ".metadata").stat().st_size
        payload = pickle.dumps(CreatesFile(t / "pwned"))
        (ckpt / ".metadata").write_bytes(payload + b" " * (size - len(payload)))
        if remanifest:
            rehash(ckpt)
        return ckpt
    return setup


def _truncated_data(a, t):
    ckpt = copy_ckpt(a, t)
    data = sorted(ckpt.glob("*.distcp"))[0]
    data.write_bytes(data.read_bytes()[:100])
    return ckpt


def _no_manifest(a, t):
    ckpt = copy_ckpt(a, t)
    (ckpt / "manifest.json").unlink()
    return ckpt


def _future_manifest(a, t):
    ckpt = copy_ckpt(a, t)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    (ckpt / "manifest.json").write_text(json.dumps({**manifest, "version": 99}))
    return ckpt


def _int_weights_checkpoint(a, t):
    from megalysses.checkpoint import TensorReader, save_streaming

    ckpt = copy_ckpt(a, t)
    reader = TensorReader(a["ckpt"])
    specs = [(k, reader.shape(k), torch.int32 if k == "model.embed.weight" else reader.dtype(k))
             for k in sorted(reader.entries)]
    for f in ckpt.glob("*.distcp"):
        f.unlink()
    (ckpt / ".metadata").unlink()
    save_streaming(ckpt, specs, lambda k: reader.get(k).to(next(s[2] for s in specs if s[0] == k)))
    rehash(ckpt)
    return ckpt


def _hf(change):
    def setup(a, t):
        folder = copy_hf(a, t)
        change(folder, t)
        return folder
    return setup


def _set_config(**changes):
    def change(folder, t):
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, **changes}))
    return change


def _to_single_file(folder, t, damage):
    from safetensors.torch import load_file, save_file

    index = json.loads((folder / "model.safetensors.index.json").read_text())
    tensors = {}
    for shard in sorted(set(index["weight_map"].values())):
        tensors.update(load_file(folder / shard))
        (folder / shard).unlink()
    (folder / "model.safetensors.index.json").unlink()
    save_file(tensors, folder / "model.safetensors")
    raw = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(damage(raw))


def _jsonl(t, text):
    (t / "in.jsonl").write_text(text)
    return t / "in.jsonl"


CONVERT = [
    ("inspect-missing", lambda a, t: (convert, ["inspect", str(t / "nope")]), 2,
     ["nope", "neither a checkpoint", "step-N"]),
    ("inspect-crafted-metadata", lambda a, t: (convert, ["inspect", str(_crafted(True)(a, t))]), 2,
     [".metadata: refers to", "open", "do not use it"]),
    ("inspect-tampered-metadata", lambda a, t: (convert, ["inspect", str(_crafted(False)(a, t))]), 1,
     [".metadata: SHA-256", "differs from the manifest", "corrupted or modified"]),
    ("to-hf-crafted-metadata", lambda a, t: (convert, ["megalysses-to-hf", str(_crafted(True)(a, t)),
                                                       str(t / "out"), "--quiet"]), 2, [".metadata: refers to", "do not use it"]),
    ("reshard-crafted-metadata", lambda a, t: (convert, ["reshard", str(_crafted(True)(a, t)), str(t / "out"),
                                                         "--layout", "single", "--quiet"]), 2,
     [".metadata: refers to", "do not use it"]),
    ("reshard-tampered-metadata", lambda a, t: (convert, ["reshard", str(_crafted(False)(a, t)), str(t / "out"),
                                                          "--layout", "single", "--quiet"]), 2,
     ["invalid checkpoint", ".metadata: SHA-256", "corrupted or modified"]),
    ("to-hf-truncated-data", lambda a, t: (convert, ["megalysses-to-hf", str(_truncated_data(a, t)),
                                                     str(t / "out")]), 2, [".distcp: 100 bytes", "truncated"]),
    ("to-hf-no-manifest", lambda a, t: (convert, ["megalysses-to-hf", str(_no_manifest(a, t)), str(t / "out")]), 2,
     ["manifest.json: no such file", "partial", "resume from an earlier one"]),
    ("to-hf-future-manifest", lambda a, t: (convert, ["megalysses-to-hf", str(_future_manifest(a, t)),
                                                      str(t / "out")]), 2, ["format version 99", "upgrade megalysses"]),
    ("to-hf-int-weights", lambda a, t: (convert, ["megalysses-to-hf", str(_int_weights_checkpoint(a, t)),
                                                  str(t / "out")]), 2,
     ["'model.embed.weight' is int32", "not a floating-point weight", "damaged or not ours"]),
    ("to-hf-existing-output", lambda a, t: (convert, ["megalysses-to-hf", str(copy_ckpt(a, t)), str(t)]), 2,
     ["already exists", "choose a new output path"]),
    ("to-hf-bad-shard-size", lambda a, t: (convert, ["megalysses-to-hf", str(copy_ckpt(a, t)), str(t / "out"),
                                                     "--max-shard-size", "lots"]), 2,
     ["--max-shard-size 'lots'", "expected a size like 5GB"]),
    ("reshard-layout-too-wide", lambda a, t: (convert, ["reshard", str(copy_ckpt(a, t)), str(t / "out"), "--layout",
                                                        "{tp: 4}"]), 2, ["{tp: 4}", "cannot hold this model", "2 heads"]),
    ("reshard-layout-not-yaml", lambda a, t: (convert, ["reshard", str(copy_ckpt(a, t)), str(t / "out"), "--layout",
                                                        "{tp: [2"]), 2, ["{tp: [2", "not a YAML mapping"]),
    ("hf-missing-folder", lambda a, t: (convert, ["hf-to-megalysses", str(t / "nope"), str(t / "out")]), 2,
     ["nope: no such folder"]),
    ("hf-no-config", lambda a, t: (convert, ["hf-to-megalysses", str(_hf(lambda f, t: (f / "config.json").unlink())(
        a, t)), str(t / "out")]), 2, ["config.json: missing", "save_pretrained"]),
    ("hf-config-not-json", lambda a, t: (convert, ["hf-to-megalysses", str(_hf(
        lambda f, t: (f / "config.json").write_text("{nope"))(a, t)), str(t / "out")]), 2,
     ["config.json: not valid JSON"]),
    ("hf-unsupported-family", lambda a, t: (convert, ["hf-to-megalysses", str(_hf(_set_config(model_type="bert"))(
        a, t)), str(t / "out")]), 2, ["model_type 'bert'", "is not supported", "llama, mistral, qwen2, qwen3"]),
    ("hf-truncated-single-file", lambda a, t: (convert, ["hf-to-megalysses", str(_hf(
        lambda f, t: _to_single_file(f, t, lambda raw: raw[: len(raw) // 2]))(a, t)), str(t / "out")]), 2,
     ["model.safetensors: not a readable safetensors file", "truncated or damaged", "re-download it"]),
    ("hf-garbage-shard", lambda a, t: (convert, ["hf-to-megalysses", str(_hf(
        lambda f, t: hf_first_shard(f).write_bytes(b"garbage" * 50))(a, t)), str(t / "out")]), 2,
     ["-of-", "not a readable safetensors file", "re-download it"]),
    ("hf-empty-single-file", lambda a, t: (convert, ["hf-to-megalysses", str(_hf(
        lambda f, t: _to_single_file(f, t, lambda raw: b""))(a, t)), str(t / "out")]), 2,
     ["model.safetensors: not a readable safetensors file"]),
    ("hf-missing-shard", lambda a, t: (convert, ["hf-to-megalysses", str(_hf(
        lambda f, t: hf_first_shard(f).unlink())(a, t)), str(t / "out")]), 2,
     ["missing shard", "re-download it or copy it next to the index"]),
    ("hf-int32-weight", lambda a, t: (convert, ["hf-to-megalysses", str(_hf(lambda f, t: retensor(
        f, "model.norm.weight", torch.ones(32, dtype=torch.int32)))(a, t)), str(t / "out")]), 2,
     ["tensor 'model.norm.weight' is int32", "not a floating-point weight", "never cast", "re-download it"]),
    ("hf-bool-weight", lambda a, t: (convert, ["hf-to-megalysses", str(_hf(lambda f, t: retensor(
        f, "model.embed_tokens.weight", torch.ones(64, 32, dtype=torch.bool)))(a, t)), str(t / "out")]), 2,
     ["'model.embed_tokens.weight' is bool", "not a floating-point weight"]),
    ("hf-extra-tensor", lambda a, t: (convert, ["hf-to-megalysses", str(_hf(lambda f, t: retensor(
        f, "model.surprise.weight", torch.ones(3)))(a, t)), str(t / "out")]), 2,
     ["model.surprise.weight", "no place in this llama model", "do not match config.json"]),
    ("hf-wrong-shape", lambda a, t: (convert, ["hf-to-megalysses", str(_hf(lambda f, t: retensor(
        f, "model.norm.weight", torch.ones(31)))(a, t)), str(t / "out")]), 2,
     ["model.norm.weight", "do not match config.json", "re-download the model"]),
]

PREPROCESS = [
    ("binary-text-input", lambda a, t: (t / "blob.txt").write_bytes(bytes(range(256)) * 8) and
     (preprocess, [str(t / "blob.txt"), "-o", str(t / "out")]), 2,
     ["blob.txt: not text", "NUL byte", "remove the file from the inputs"]),
    ("empty-text-input", lambda a, t: (t / "e.txt").write_text("") == 0 and
     (preprocess, [str(t / "e.txt"), "-o", str(t / "out")]), 2, ["e.txt", "0 tokens", "nothing to train on"]),
    ("empty-jsonl-texts", lambda a, t: _jsonl(t, '{"text": ""}\n{"text": ""}\n') and
     (preprocess, [str(t / "in.jsonl"), "-o", str(t / "out")]), 2, ["2 documents and 0 tokens", "--text-key"]),
    ("missing-input", lambda a, t: (preprocess, [str(t / "nope.txt"), "-o", str(t / "out")]), 2,
     ["nope.txt: no such file or folder"]),
    ("unknown-format", lambda a, t: (t / "x.csv").write_text("a,b") and
     (preprocess, [str(t / "x.csv"), "-o", str(t / "out")]), 2, ["x.csv: unknown format", "name it .txt"]),
    ("jsonl-not-json", lambda a, t: _jsonl(t, '{"text": "a"}\nnot json\n') and
     (preprocess, [str(t / "in.jsonl"), "-o", str(t / "out")]), 2, ["in.jsonl:2: not valid JSON", "one JSON object"]),
    ("jsonl-missing-key", lambda a, t: _jsonl(t, '{"body": "a"}\n') and
     (preprocess, [str(t / "in.jsonl"), "-o", str(t / "out")]), 2, ["in.jsonl:1: no key 'text'", "found ['body']",
                                                                     "pass --text-key"]),
    ("missing-tokenizer", lambda a, t: (t / "d.txt").write_text("hi") and
     (preprocess, [str(t / "d.txt"), "-o", str(t / "out"), "--tokenizer", str(t / "tok.json")]), 2,
     ["tokenizer = '", "tok.json'", "no such file", "use 'byte'"]),
    ("existing-output", lambda a, t: copy_dataset(a, t) and (t / "d.txt").write_text("hi") and
     (preprocess, [str(t / "d.txt"), "-o", str(t / "bytes")]), 2, ["bytes.json exists", "pass overwrite=True"]),
    ("byte-with-eos-token", lambda a, t: (t / "d.txt").write_text("hi") and
     (preprocess, [str(t / "d.txt"), "-o", str(t / "out"), "--eos-token", "</s>"]), 2,
     ["eos_token = '</s>'", "always id 256", "drop it"]),
    ("garbage-tokenizer", lambda a, t: (t / "tok.json").write_text("{nope") and (t / "d.txt").write_text("hi") and
     (preprocess, [str(t / "d.txt"), "-o", str(t / "out"), "--tokenizer", str(t / "tok.json")]), 2,
     ["tok.json'", "not a Hugging Face tokenizer.json", "or 'byte'"]),
    ("truncated-gz", lambda a, t: (t / "d.txt.gz").write_bytes(b"\x1f\x8b\x08\x00garbage") and
     (preprocess, [str(t / "d.txt.gz"), "-o", str(t / "out")]), 2, ["d.txt.gz: unreadable", "re-download the file"]),
    ("zero-workers", lambda a, t: (t / "d.txt").write_text("hi") and
     (preprocess, [str(t / "d.txt"), "-o", str(t / "out"), "--workers", "0"]), 2, ["workers = 0", "must be >= 1"]),
]

TRAIN = [
    ("unknown-key", lambda a, t: (train, ["train.stepz=3"]), 2, ["train.stepz", "unknown key", "did you mean 'steps'"]),
    ("wrong-type", lambda a, t: (train, ["train.steps=many"]), 2, ["train.steps", "expected int", "'many'"]),
    ("missing-config", lambda a, t: (train, ["--config", str(t / "nope.yaml")]), 2, ["nope.yaml: no such file"]),
    ("layout-does-not-divide", lambda a, t: (train, ["layout.tp=3", "train.nproc=3"]), 2, ["tp = 3", "does not divide the 4 attention heads",
                                                                                   "use tp in [1, 2]"]),
    ("fp8-without-te", lambda a, t: (train, ["train.fp8=delayed"]), 2, ["train.fp8 = 'delayed'",
                                                                       "needs model.backend=te"]),
    ("overwrite-not-bool", lambda a, t: (train, ["checkpoint.overwrite=perhaps"]), 2, ["checkpoint.overwrite",
                                                                                      "'perhaps'"]),
    ("val-fraction-out-of-range", lambda a, t: (train, ["data.val_fraction=1.5"]), 2, ["data.val_fraction = 1.5",
                                                                                      "must be in [0, 1)"]),
    ("empty-run-file", lambda a, t: (t / "empty.yaml").write_text("") == 0 and
     (train, ["--config", str(t / "empty.yaml")]), 2, ["empty.yaml: the run file is empty", "quickstart.yaml"]),
    ("run-dir-is-a-file", lambda a, t: (t / "a-file").write_text("x") and (train, [f"logging.run_dir={t / 'a-file'}"]),
     2, ["logging.run_dir", "a-file", "is a file, not a folder", "choose another logging.run_dir"]),
    ("fp8-without-cuda", lambda a, t: (train, ["model.backend=te", "train.fp8=delayed"]), 2,
     ["train.fp8 = 'delayed' needs a CUDA GPU", "train.fp8=none"]),
    ("cuda-device-without-cuda", lambda a, t: (train, ["train.device=cuda"]), 2,
     ["train.device = 'cuda' needs a CUDA GPU and none is visible", "train.device=cpu"]),
    ("bench-bad-core", lambda a, t: (bench, ["model.attention_core=flsh"]), 2,
     ["model.attention_core", "'flsh'", "expected one of 'sdpa', 'flash', 'te', 'auto'"]),
    ("never-over-checkpoints", lambda a, t: copy_ckpt(a, t) and
     (precheck, [f"checkpoint.dir={t / 'ckpts'}", "checkpoint.resume=never"]), 2,
     ["checkpoint.resume = 'never'", "holds 1 checkpoint(s)", "newest step-2", "checkpoint.overwrite=true",
      "another logging.run_dir"]),
    ("dataset-vocab-past-model", lambda a, t: (precheck, [f"data.source={copy_dataset(a, t)}"]), 2,
     ["with 257 ids", "more than model.vocab_size = 256", "set model.vocab_size=257"]),
    ("dataset-other-tokenizer", lambda a, t: (t / "tok.json").write_text("{}") and
     (precheck, [f"data.source={copy_dataset(a, t)}", "model.vocab_size=320", f"data.tokenizer={t / 'tok.json'}"]), 2,
     ["data.tokenizer = '", "was tokenised with 'byte'", "set data.tokenizer=byte"]),
    ("lone-bin", lambda a, t: shutil.copy(f"{a['bytes']}.bin", t / "bytes.bin") and
     (precheck, [f"data.source={t / 'bytes.bin'}"]), 2, ["bytes.json missing", "only", "copy all three files"]),
    ("empty-text-source", lambda a, t: (t / "e.txt").write_text("") == 0 and
     (precheck, [f"data.source={t / 'e.txt'}"]), 2, ["data.source = '", "empty (0 bytes of text)",
                                                      "data.source=builtin"]),
    ("binary-text-source", lambda a, t: (t / "b.txt").write_bytes(b"\x00\x01" * 100) and
     (precheck, [f"data.source={t / 'b.txt'}"]), 2, ["b.txt is not text", "must be UTF-8 text",
                                                      "megalysses-preprocess"]),
    ("text-source-past-small-vocab", lambda a, t: (precheck, ["model.vocab_size=128"]), 2,
     ["model.vocab_size = 128", "ids 0..255", "set model.vocab_size=256"]),
]

CASES = [pytest.param(*case[1:], id=case[0]) for case in CONVERT + PREPROCESS + TRAIN]


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.is_dir(), None if p.is_dir() else p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*")}


@pytest.mark.parametrize("setup, code, says", CASES)
def test_bad_input_ends_in_one_line_and_touches_nothing(assets, tmp_path, monkeypatch, capsys, setup, code, says):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # a CLI that wrongly wrote relative to the working directory shows up in the snapshot
    main, argv = setup(assets, work)
    capsys.readouterr()
    before = snapshot(work)
    assert main(argv) == code
    out = capsys.readouterr()
    assert "Traceback" not in out.out + out.err
    lines = [line for line in out.err.splitlines() if line.strip()]
    assert len(lines) == 1, out.err
    assert all(s in lines[0] for s in says), (lines[0], [s for s in says if s not in lines[0]])
    assert snapshot(work) == before
    assert not (work / "pwned").exists()
