"""Config loading: every bundled YAML loads, overrides apply, the resolved config round-trips, bad input is named."""
import re
from pathlib import Path

import pytest
import yaml

from megalysses.config import (CONFIG_DIR, ConfigError, RunConfig, TrainConfig, bundled, from_dict,
                               load_layout, load_model_config, load_run_config, save_resolved, to_dict)
from megalysses.models.config import RECOMPUTE, GPTConfig, RopeScaling
from megalysses.parallel.layout import ParallelLayout

QUICKSTART = CONFIG_DIR / "runs" / "quickstart.yaml"
SCRIPTS_CONFIGS = Path(__file__).resolve().parents[1] / "scripts" / "configs"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------------------- bundled files

@pytest.mark.parametrize("name", bundled("models"))
def test_bundled_model_loads(name):
    cfg = load_model_config(CONFIG_DIR / "models" / f"{name}.yaml")
    assert isinstance(cfg, GPTConfig)
    assert from_dict(GPTConfig, to_dict(cfg), "roundtrip", "model") == cfg


@pytest.mark.parametrize("name", bundled("layouts"))
def test_bundled_layout_loads(name):
    layout = load_layout(CONFIG_DIR / "layouts" / f"{name}.yaml")
    assert isinstance(layout, ParallelLayout)
    assert from_dict(ParallelLayout, to_dict(layout), "roundtrip", "layout") == layout
    first = (CONFIG_DIR / "layouts" / f"{name}.yaml").read_text().splitlines()[0]
    assert first.startswith("#") and "world size" in first.lower()


@pytest.mark.parametrize("name", bundled("runs"))
def test_bundled_run_loads(name, tmp_path):
    cfg = load_run_config(CONFIG_DIR / "runs" / f"{name}.yaml")
    assert isinstance(cfg, RunConfig)
    assert load_run_config(save_resolved(cfg, tmp_path)) == cfg


def test_bundled_sets():
    assert {"tiny", "llama-3.2-1b", "llama-3-8b", "qwen2.5-7b", "llama-3-70b"} <= set(bundled("models"))
    assert {"single", "dp8", "sp4", "sp8", "tp2-sp2", "tp2-sp4", "tp2-pp2-sp2", "pp4", "tp2-pp2-dp2", "tp2", "sp2",
            "dp2", "tp2-sp2-tp-sequence-parallel"} <= set(bundled("layouts"))
    assert (SCRIPTS_CONFIGS / "layouts" / "tp2-sp2.yaml").is_file()  # scripts/configs is the human-facing path


def test_model_geometries():
    llama1b = load_model_config("llama-3.2-1b")
    assert llama1b.head_dim == 64 and llama1b.tie_embeddings
    assert llama1b.rope_scaling == RopeScaling(32.0, 1.0, 4.0, 8192)
    assert load_model_config("llama-3-8b").num_params() == 8_030_261_248
    qwen = load_model_config("qwen2.5-7b")
    assert qwen.qkv_bias and qwen.head_dim == 128 and qwen.rms_norm_eps == 1e-6
    assert load_model_config("llama-3-70b").num_kv_heads == 8


def test_quickstart_contents():
    cfg = load_run_config(QUICKSTART)
    assert cfg.model == load_model_config("tiny")
    assert cfg.layout == ParallelLayout(tp=2, sp=2)
    t = cfg.train
    assert (t.device, t.seq_len, t.micro_batch_size, t.global_batch_size, t.lr, t.warmup_steps, t.dtype, t.nproc) == \
        ("cpu", 128, 4, 8, 3e-3, 5, "float32", 4)
    assert cfg.logging.run_dir == "runs/quickstart" and cfg.logging.wandb is False
    assert cfg.check(world_size=4).dp == 1


# ------------------------------------------------------------------------------------------------ overrides

def test_override_values():
    cfg = load_run_config(QUICKSTART, ["train.lr=1e-4", "layout.sp=4", "model.rope_scaling=null"])
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float)
    assert cfg.layout == ParallelLayout(tp=2, sp=4)
    assert cfg.model.rope_scaling is None


def test_override_swaps_files():
    cfg = load_run_config(QUICKSTART, ["layout=sp4", "model=llama-3.2-1b"])
    assert cfg.layout == load_layout("sp4")
    assert cfg.model == load_model_config("llama-3.2-1b")
    cfg = load_run_config(QUICKSTART, ["model=llama-3.2-1b", "model.rope_scaling=null", "layout=sp4", "layout.dp=2"])
    assert cfg.model.rope_scaling is None and cfg.model.hidden_size == 2048
    assert cfg.layout == ParallelLayout(sp=4, dp=2)


def test_override_nested_and_lists():
    cfg = load_run_config(QUICKSTART, ["model.rope_scaling.factor=16", "layout.pp=2", "layout.stage_layers=[1, 1]", "train.lr=2"])
    assert cfg.model.rope_scaling == RopeScaling(factor=16.0)
    assert cfg.layout.stage_layers == [1, 1]
    assert cfg.train.lr == 2.0 and isinstance(cfg.train.lr, float)


def test_inline_sections_and_local_reference(tmp_path):
    write(tmp_path / "mine.yaml", "tp: 2\n")
    run = write(tmp_path / "run.yaml", "model: {hidden_size: 32, num_heads: 2}\nlayout: mine.yaml\n"
                                       "train: {lr: 1e-3}\n")
    cfg = load_run_config(run)
    assert cfg.model.hidden_size == 32 and cfg.model.head_dim == 16
    assert cfg.layout == ParallelLayout(tp=2)
    assert cfg.train.lr == 1e-3  # '1e-3' is a string to YAML 1.1; float fields accept it


def test_save_resolved_roundtrip(tmp_path):
    cfg = load_run_config(QUICKSTART, ["layout=tp2-pp2-sp2", "layout.stage_layers=[1, 1]", "train.steps=7",
                                       "model=llama-3.2-1b", "checkpoint.dir=/tmp/ckpt"])
    out = save_resolved(cfg, tmp_path / "run")
    assert out == tmp_path / "run" / "config.yaml"
    text = out.read_text()
    assert list(yaml.safe_load(text)) == ["model", "layout", "memory", "train", "data", "checkpoint", "logging"]
    assert load_run_config(out) == cfg


def test_empty_run_file_is_refused(tmp_path):
    """All defaults would train nothing meaningful (4 ranks of an untrained layout): an empty file is a mistake."""
    with pytest.raises(ConfigError, match=r"run\.yaml: the run file is empty.*quickstart\.yaml"):
        load_run_config(write(tmp_path / "run.yaml", ""))


# ------------------------------------------------------------------------------------------------ bad input

def test_unknown_top_level_key_suggests(tmp_path):
    run = write(tmp_path / "run.yaml", "trian:\n  lr: 1.0\n")
    with pytest.raises(ConfigError, match=r"run\.yaml: trian: unknown key 'trian'; did you mean 'train'\?"):
        load_run_config(run)


def test_unknown_nested_key_full_path(tmp_path):
    run = write(tmp_path / "run.yaml", "train:\n  lerning_rate: 1.0\n")
    with pytest.raises(ConfigError, match=r"run\.yaml: train\.lerning_rate: unknown key .*valid keys: .*\blr\b"):
        load_run_config(run)


def test_unknown_key_in_referenced_file_names_that_file(tmp_path):
    write(tmp_path / "big.yaml", "hidden_sise: 128\n")
    run = write(tmp_path / "run.yaml", "model: big.yaml\n")
    with pytest.raises(ConfigError, match=r"big\.yaml: model\.hidden_sise: unknown key.*did you mean 'hidden_size'"):
        load_run_config(run)


def test_misspelt_override_key():
    with pytest.raises(ConfigError, match=r"override 'train\.lrr=1e-4': train\.lrr: unknown key 'lrr'; "
                                          r"did you mean 'lr'\?"):
        load_run_config(QUICKSTART, ["train.lrr=1e-4"])


def test_override_into_a_scalar():
    with pytest.raises(ConfigError, match=r"train\.lr is float, not a section"):
        load_run_config(QUICKSTART, ["train.lr.x=1"])


def test_wrong_type_str_for_int(tmp_path):
    run = write(tmp_path / "run.yaml", "train:\n  steps: ten\n")
    with pytest.raises(ConfigError, match=r"run\.yaml: train\.steps: expected int, got 'ten' \(str\)"):
        load_run_config(run)


def test_bool_given_as_int(tmp_path):
    run = write(tmp_path / "run.yaml", "logging:\n  wandb: 1\n")
    with pytest.raises(ConfigError, match=r"logging\.wandb: expected bool \(true or false\), got 1 \(int\)"):
        load_run_config(run)


def test_bool_given_as_string_override():
    with pytest.raises(ConfigError, match=r"layout\.tp_sequence_parallel: expected bool .*got 'maybe' \(str\)"):
        load_run_config(QUICKSTART, ["layout.tp_sequence_parallel=maybe"])


def test_literal_choice(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.lr_schedule: expected one of 'cosine', 'wsd', 'constant', "
                                          r"got 'linear'"):
        load_run_config(QUICKSTART, ["train.lr_schedule=linear"])


def test_negative_tp_layout_error_surfaces(tmp_path):
    path = write(tmp_path / "bad.yaml", "tp: -2\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: layout: layout\.tp = -2: every parallel degree must be an "
                                          r"integer >= 1"):
        load_layout(path)


def test_vpp_without_interleaved_schedule():
    with pytest.raises(ConfigError, match=r"layout\.vpp = 2 needs schedule 'interleaved-1f1b'"):
        load_run_config(QUICKSTART, ["layout.vpp=2"])


def test_hidden_not_divisible_by_heads(tmp_path):
    path = write(tmp_path / "m.yaml", "hidden_size: 66\nnum_heads: 4\nnum_kv_heads: 4\n")
    with pytest.raises(ConfigError, match=r"m\.yaml: model: hidden_size 66 is not divisible by num_heads 4"):
        load_model_config(path)


def test_heads_not_multiple_of_kv_heads():
    with pytest.raises(ConfigError, match=r"num_heads 4 is not a multiple of num_kv_heads 3"):
        load_run_config(QUICKSTART, ["model.num_kv_heads=3"])


def test_override_without_equals():
    with pytest.raises(ConfigError, match=r"override 'train\.lr': expected section\.key=value"):
        load_run_config(QUICKSTART, ["train.lr"])


def test_referenced_file_missing_names_paths(tmp_path):
    run = write(tmp_path / "run.yaml", "layout: nowhere/mine.yaml\n")
    tried = re.escape(str(tmp_path / "nowhere" / "mine.yaml"))
    with pytest.raises(ConfigError, match=rf"run\.yaml: layout: layout file 'nowhere/mine\.yaml' not found; "
                                          rf"tried {tried}"):
        load_run_config(run)


def test_non_mapping_top_level(tmp_path):
    run = write(tmp_path / "run.yaml", "- train\n- model\n")
    with pytest.raises(ConfigError, match=r"run\.yaml: the top level must be a mapping .*got list"):
        load_run_config(run)


def test_unknown_model_reference_name():
    with pytest.raises(ConfigError, match=r"model file 'tyni' not found.*did you mean 'tiny'\?.*bundled models: .*"
                                          r"llama-3-8b"):
        load_run_config(QUICKSTART, ["model=tyni"])


def test_sequence_parallel_needs_tp():
    with pytest.raises(ConfigError, match=r"layout\.tp_sequence_parallel = true needs tp > 1"):
        load_run_config(QUICKSTART, ["layout=sp4", "layout.tp_sequence_parallel=true"])


def test_section_not_a_mapping(tmp_path):
    run = write(tmp_path / "run.yaml", "train: 5\n")
    with pytest.raises(ConfigError, match=r"run\.yaml: train: expected a mapping \(TrainConfig\), got 5 \(int\)"):
        load_run_config(run)


def test_list_item_type(tmp_path):
    with pytest.raises(ConfigError, match=r"layout\.stage_layers\[1\]: expected int, got 'x'"):
        load_run_config(QUICKSTART, ["layout.stage_layers=[1, x]"])


def test_train_post_init_checks():
    with pytest.raises(ConfigError, match=r"train\.global_batch_size = 10 is not a multiple of "
                                          r"train\.micro_batch_size = 4"):
        load_run_config(QUICKSTART, ["train.global_batch_size=10"])


def test_invalid_yaml(tmp_path):
    run = write(tmp_path / "run.yaml", "train: {lr: 1\n")
    with pytest.raises(ConfigError, match=r"run\.yaml: invalid YAML"):
        load_run_config(run)


def test_check_cross_sections():
    cfg = load_run_config(QUICKSTART, ["layout.sp=4"])  # loads: the layout alone is fine
    with pytest.raises(ConfigError, match=r"layout vs model: sp = 4 does not divide the 2 heads per TP rank"):
        cfg.check(world_size=8)
    cfg = load_run_config(QUICKSTART, ["layout=dp2"])
    with pytest.raises(ConfigError, match=r"not a multiple of train\.micro_batch_size \* dp = 4 \* 2"):
        load_run_config(QUICKSTART, ["layout=dp2", "train.global_batch_size=4"]).check(world_size=2)
    assert cfg.check(world_size=2).dp == 2


def test_from_dict_direct():
    assert from_dict(TrainConfig, {"lr": 1, "steps": 3}, "x").lr == 1.0
    with pytest.raises(ConfigError, match=r"^x: train\.steps: expected int, got 3\.5 \(float\)$"):
        from_dict(TrainConfig, {"steps": 3.5}, "x", "train")


@pytest.mark.parametrize("mode", RECOMPUTE)
def test_every_recompute_mode_is_accepted_from_the_command_line(mode):
    cfg = load_run_config("quickstart", [f"memory.recompute={mode}"])
    assert cfg.memory.recompute == mode
