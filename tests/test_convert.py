"""megalysses-convert: HF -> ours -> HF is bit-identical for Llama (Llama-3 RoPE scaling), Mistral and Qwen2 (q/k/v
bias, tied embeddings), built with transformers from small random configs and saved in several shards; transformers
loads the export; our model on the converted checkpoint gives transformers' logits under tp2-sp2 and pp2 (gloo,
1e-5 relative); reshard and inspect; each error names the file or tensor, and nothing half-written is left behind."""
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from safetensors import safe_open  # noqa: E402

from megalysses.checkpoint import TensorReader, TrainingState  # noqa: E402
from megalysses.config import load_run_config  # noqa: E402
from megalysses.models.hf import gpt_config_from_hf  # noqa: E402
from megalysses.models.build import build_model  # noqa: E402
from megalysses.parallel import ParallelLayout, ParallelMesh  # noqa: E402
from megalysses.parallel import collectives as C  # noqa: E402
from megalysses.parallel.launch import run_ranks  # noqa: E402
from megalysses.parallel.sequence import shard_sequence  # noqa: E402
from megalysses.parallel.tensor import ShardSpec, gather_full  # noqa: E402
from megalysses.tools.convert import main  # noqa: E402
from hf_random import randomize_

os.environ.setdefault("MEGALYSSES_PRELOAD", "megalysses.models.gpt,megalysses.checkpoint")

SMALL = dict(vocab_size=131, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=96, max_position_embeddings=256, rms_norm_eps=1e-5)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64, "rope_theta": 10000.0}
FAMILIES = {  # family: (config class, extra config)
    "llama": ("LlamaConfig", dict(tie_word_embeddings=False, rope_parameters=LLAMA3)),
    "mistral": ("MistralConfig", dict(tie_word_embeddings=False, sliding_window=None,
                                      rope_parameters={"rope_type": "default", "rope_theta": 100000.0})),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True,
                                  rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    "qwen3": ("Qwen3Config", dict(tie_word_embeddings=False, head_dim=24,
                                  rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
}
IDS = torch.randint(0, SMALL["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(3))


def save_hf_model(family: str, folder: Path, dtype: torch.dtype = torch.float32, shard_size: str = "30KB") -> None:
    """A small random model (norms and biases randomised too), saved in shards of ~30 KB."""
    config_cls, extra = FAMILIES[family]
    config = getattr(transformers, config_cls)(**SMALL, **extra)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).float()
    randomize_(model)
    model.to(dtype).save_pretrained(folder, safe_serialization=True, max_shard_size=shard_size)


def hf_logits(folder: Path) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    with torch.no_grad():
        return model(IDS).logits


def hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    out = {}
    for name, file in weight_map.items():
        with safe_open(str(folder / file), "pt") as f:
            out[name] = f.get_tensor(name)
    return out


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """family -> (HF folder, our checkpoint for tp2-sp2, HF export of it), converted through the CLI."""
    root = tmp_path_factory.mktemp("convert")
    out = {}
    for family in FAMILIES:
        hf, ours, back = root / f"{family}-hf", root / f"{family}-ours", root / f"{family}-back"
        save_hf_model(family, hf)
        assert main(["hf-to-megalysses", str(hf), str(ours), "--layout", "tp2-sp2", "--quiet"]) == 0
        assert main(["megalysses-to-hf", str(ours), str(back), "--max-shard-size", "30KB", "--quiet"]) == 0
        out[family] = (hf, ours, back)
    return out


@pytest.mark.parametrize("family", list(FAMILIES))
def test_round_trip_is_bit_identical_and_transformers_loads_it(converted, family):
    hf, ours, back = converted[family]
    original, exported = hf_tensors(hf), hf_tensors(back)
    assert exported.keys() == original.keys() and len({*json.loads(
        (back / "model.safetensors.index.json").read_text())["weight_map"].values()}) > 2  # sharded
    for name, t in original.items():
        assert t.dtype == exported[name].dtype and torch.equal(t, exported[name]), name
    config = json.loads((back / "config.json").read_text())
    assert config["architectures"] == json.loads((hf / "config.json").read_text())["architectures"]
    assert gpt_config_from_hf(config) == gpt_config_from_hf(json.loads((hf / "config.json").read_text()))
    assert torch.equal(hf_logits(back), hf_logits(hf))  # transformers' own model, reloaded from the export
    run = load_run_config(ours / "config.yaml")
    assert run.layout == ParallelLayout(tp=2, sp=2) and run.model == gpt_config_from_hf(config)


def test_unsharded_bfloat16_folder_round_trips_in_its_dtype(tmp_path):
    """One model.safetensors (no index), bf16: stored as fp32 masters, exported back to bf16 by default, bit for bit."""
    hf, ours, back = tmp_path / "hf", tmp_path / "ours", tmp_path / "back"
    save_hf_model("mistral", hf, torch.bfloat16, shard_size="10GB")
    assert (hf / "model.safetensors").is_file() and not (hf / "model.safetensors.index.json").exists()
    assert main(["hf-to-megalysses", str(hf), str(ours), "--quiet"]) == 0
    assert TensorReader(ours).dtype("model.embed.weight") == torch.float32
    assert main(["megalysses-to-hf", str(ours), str(back), "--quiet"]) == 0
    with safe_open(str(hf / "model.safetensors"), "pt") as f:
        original = {n: f.get_tensor(n) for n in f.keys()}
    exported = hf_tensors(back)
    assert exported.keys() == original.keys()
    assert all(exported[n].dtype == torch.bfloat16 and torch.equal(exported[n], t) for n, t in original.items())
    assert json.loads((back / "config.json").read_text())["dtype"] == "bfloat16"


def logits_on_rank(rank: int, world: int, layout: ParallelLayout, folders: dict, ids: torch.Tensor):
    """Full (b, s, vocab) logits of our model loaded from each converted checkpoint, on the last pipeline stage."""
    mesh = ParallelMesh(layout)
    tp, sp = mesh.group("tp"), mesh.group("sp")
    out = {}
    for family, folder in folders.items():
        cfg = load_run_config(Path(folder) / "config.yaml").model
        chunks = build_model(cfg, mesh)
        TrainingState(chunks, mesh).load(TensorReader(folder), with_optimizer=False)
        local_ids = shard_sequence(ids, sp)
        pos = shard_sequence(torch.arange(ids.shape[1]).expand_as(ids), sp)
        with torch.no_grad():
            hidden = torch.empty(*local_ids.shape, cfg.hidden_size)
            if not mesh.is_first_stage:
                [h.wait() for h in C.post_p2p([], [(hidden, mesh.prev_stage)])[1]]
            x = chunks[0](local_ids, pos, hidden=None if mesh.is_first_stage else hidden)
            if not mesh.is_last_stage:
                [h.wait() for h in C.post_p2p([(x.contiguous(), mesh.next_stage)], [])[0]]
                continue
            logits = gather_full(x, ShardSpec(dim=2, sections=(cfg.vocab_size,)), tp)  # drops the vocab padding
            out[family] = C.all_gather(logits.contiguous(), sp, dim=1).numpy()
    return out


@pytest.mark.parametrize("layout,world", [(ParallelLayout(tp=2, sp=2), 4), (ParallelLayout(pp=2), 2)],
                         ids=["tp2-sp2", "pp2"])
def test_converted_checkpoint_gives_transformers_logits(converted, layout, world):
    folders = {family: str(ours) for family, (_, ours, _) in converted.items()}
    ours = run_ranks(logits_on_rank, world, layout, folders, IDS)[-1]  # the last rank is on the last stage
    for family, (hf, _, _) in converted.items():
        reference = hf_logits(hf)
        err = ((torch.from_numpy(ours[family]) - reference).norm() / reference.norm()).item()
        print(f"{family} under {layout.describe()}: logits rel err {err:.2e}")
        assert err < 1e-5, f"{family} under {layout.describe()}: logits off by {err:.2e} relative"


def test_reshard_and_inspect(converted, tmp_path, capsys):
    _, ours, _ = converted["qwen2"]
    out = tmp_path / "pp2"
    assert main(["reshard", str(ours), str(out), "--layout", "{pp: 2}", "--world-size", "2"]) == 0
    progress = capsys.readouterr().err
    assert "[1/" in progress and "model.embed.weight" in progress
    before, after = TensorReader(ours), TensorReader(out)
    assert before.entries == after.entries
    assert all(torch.equal(before.get(k), after.get(k)) for k in before.entries)
    assert load_run_config(out / "config.yaml").layout.pp == 2
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "status      valid" in text and "step        0" in text and "pp=2" in text
    assert "model.blocks.1.attn.qkv.bias  [128]  float32" in text and "tie_embeddings: True" in text
    assert main(["inspect", str(converted["qwen2"][0])]) == 0  # an HF folder
    assert "model.layers.1.self_attn.q_proj.bias  [64]  float32" in capsys.readouterr().out


def test_errors_name_the_file_and_leave_nothing_behind(converted, tmp_path, capsys):
    hf, ours, _ = converted["llama"]

    def fails(args, *expected):
        out = tmp_path / "out"
        assert main([*args[:1], *map(str, args[1:]), str(out), "--quiet"]) == 2
        err = capsys.readouterr().err
        for text in expected:
            assert text in err, (text, err)
        assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")], "left behind"

    def copy(edit):
        folder = tmp_path / "edited"
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(hf, folder)
        edit(folder)
        return folder

    def set_config(**changes):
        def edit(folder):
            cfg = json.loads((folder / "config.json").read_text())
            (folder / "config.json").write_text(json.dumps({**cfg, **changes}))
        return edit

    fails(["hf-to-megalysses", copy(set_config(model_type="gpt_neox"))],
          "edited/config.json: model_type 'gpt_neox' (architectures ['LlamaForCausalLM']) is not supported",
          "megalysses converts the families llama, mistral, qwen2")
    shards = sorted(hf.glob("model-*.safetensors"))
    fails(["hf-to-megalysses", copy(lambda f: (f / shards[1].name).unlink())],
          f"edited/{shards[1].name}: missing shard", "re-download")
    fails(["hf-to-megalysses", copy(set_config(intermediate_size=97))],
          "tensor 'model.layers.0.mlp.gate_proj.weight' has the wrong shape: expected (97, 64), got (96, 64)",
          "the weights do not match config.json")
    fails(["hf-to-megalysses", hf, "--layout", "tp2-sp4"],
          "layout 'tp2-sp4' cannot hold this model (4 heads, 2 kv heads, 2 layers)", "use sp in")
    broken = tmp_path / "broken"
    shutil.copytree(ours, broken)
    victim = sorted(broken.glob("*.distcp"))[3]
    victim.write_bytes(victim.read_bytes()[:-1])
    fails(["megalysses-to-hf", broken], f"broken/{victim.name}: ", "(truncated or overwritten)")
    (tmp_path / "out").mkdir()
    assert main(["megalysses-to-hf", str(ours), str(tmp_path / "out")]) == 2
    assert "out: already exists" in capsys.readouterr().err
