"""checkpoint.init_from: a run starts from an HF folder's (or another run's) weights under any layout, takes the
source's geometry when it names no model, resumes itself (not the source) when rerun, and refuses a model that
disagrees with the source before any rank starts."""
import json
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from megalysses.checkpoint import TensorReader  # noqa: E402
from megalysses.config import load_run_config  # noqa: E402
from megalysses.models.hf import gpt_config_from_hf, hf_to_ours  # noqa: E402
from megalysses.checkpoint.hf_files import HFFolder  # noqa: E402
from megalysses.train import load_checked, main  # noqa: E402
from hf_random import randomize_  # noqa: E402

HF = dict(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
          intermediate_size=96, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False)
RUN = """\
layout: {layout}
train: {{device: cpu, nproc: 4, seq_len: 32, micro_batch_size: 1, global_batch_size: 4, steps: 1, lr: 0.0,
        min_lr: 0.0, warmup_steps: 1, eval_every: 0}}
data: {{source: builtin}}
checkpoint: {{init_from: {source}}}
logging: {{run_dir: {run_dir}, interval: 1}}
"""


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf") / "llama"
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**HF)).float()
    randomize_(model)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def run_file(tmp_path, name, layout, source, run_dir):
    path = tmp_path / f"{name}.yaml"
    path.write_text(RUN.format(layout=layout, source=source, run_dir=run_dir))
    return path


def weights(folder) -> dict[str, torch.Tensor]:
    reader = TensorReader(folder)
    return reader.read(sorted(k for k in reader.entries if k.startswith("model.")))


def steps_logged(run_dir) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_hf_weights_start_the_run_and_a_rerun_resumes_it(tmp_path, hf_llama):
    run_dir = tmp_path / "run"
    run = run_file(tmp_path, "run", "tp2-sp2", hf_llama, run_dir)
    cfg = load_run_config(run)
    assert cfg.model == gpt_config_from_hf(json.loads((hf_llama / "config.json").read_text()))  # no model named
    assert main(["--config", str(run)]) == 0
    folder = HFFolder(hf_llama)
    expected = {f"model.{n}": t for n, t in hf_to_ours(folder.get, cfg.model)}
    saved = weights(run_dir / "checkpoints" / "step-1")  # lr 0: the step leaves the weights as loaded
    assert saved.keys() == expected.keys()
    assert all(torch.equal(saved[k], expected[k]) for k in expected)

    rerun = subprocess.run([sys.executable, "-m", "megalysses.train", "--config", str(run), "train.steps=2"],
                           capture_output=True, text=True, timeout=300)  # the rerun resumes the run, not the source
    assert rerun.returncode == 0 and "resumed from" in rerun.stdout and "weights from" not in rerun.stdout, rerun
    assert steps_logged(run_dir) == [1, 2]


def test_a_checkpoint_starts_another_layout(tmp_path, hf_llama):
    first = tmp_path / "first"
    assert main(["--config", str(run_file(tmp_path, "first", "tp2-sp2", hf_llama, first))]) == 0
    ckpt = first / "checkpoints" / "step-1"
    second = tmp_path / "second"
    assert main(["--config", str(run_file(tmp_path, "second", "{pp: 2, sp: 2}", ckpt, second))]) == 0
    before, after = weights(ckpt), weights(second / "checkpoints" / "step-1")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert steps_logged(second) == [1]  # step 0 again: weights only, a new run


def test_a_model_that_disagrees_with_the_source_stops_before_any_rank(tmp_path, hf_llama, capsys):
    run = run_file(tmp_path, "run", "tp2-sp2", hf_llama, tmp_path / "run")
    assert load_checked("megalysses-train", str(run), ["model=tiny"]) is None
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "checkpoint.init_from" in err[0] and "another model geometry" in err[0], err
    assert "model.intermediate_size: source 96, run 172" in err[0] and "leave the run's model out" in err[0]
    assert not (tmp_path / "run").exists()


def test_model_may_name_an_hf_folder_or_a_checkpoint_config(tmp_path, hf_llama):
    expected = gpt_config_from_hf(json.loads((hf_llama / "config.json").read_text()))
    run = run_file(tmp_path, "run", "tp2-sp2", hf_llama, tmp_path / "run")
    assert load_run_config(run, [f"model={hf_llama}"]).model == expected
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.yaml").write_text(f"model: {json.dumps(dict(vars(expected), rope_scaling=None))}\n"
                                                   "layout: {tp: 2}\n")
    assert load_run_config(run, [f"model={tmp_path / 'ckpt' / 'config.yaml'}"]).model == expected
    assert load_run_config(run, [f"model={tmp_path / 'ckpt'}"]).model == expected
