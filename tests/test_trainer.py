"""The Trainer's one path: every pipeline stage is built with the backend's layers and runs inside the FP8 context;
bad choices stop at config load, before any rank starts, with one line."""
import contextlib
import os
import subprocess
import sys

import pytest

from megalysses.config import RunConfig, TrainConfig
from megalysses.models.config import GPTConfig
from megalysses.parallel import ParallelLayout
from megalysses.parallel.launch import run_ranks

os.environ.setdefault("MEGALYSSES_PRELOAD", "megalysses.trainer")

FP8_ACTIVE = []  # a stack: non-empty while the stand-in FP8 context is entered
FORWARDS = []  # (spec name, whether FP8 was active) for every forward of a spec-built module


@contextlib.contextmanager
def recording_fp8_context(recipe, group):
    """Stands in for Transformer Engine's fp8_autocast on CPU."""
    FP8_ACTIVE.append(recipe)
    try:
        yield
    finally:
        FP8_ACTIVE.pop()


def recording_te_spec():
    """A spec named 'te' (as te_spec() builds it) made of the torch layers, each forward recording whether it ran
    inside the FP8 context: Transformer Engine cannot run on CPU, the build and precision path can."""
    from megalysses.models import spec as S

    def recorded(factory):
        def build(*args, **kwargs):
            module = factory(*args, **kwargs)
            module.register_forward_pre_hook(lambda m, inputs: FORWARDS.append(bool(FP8_ACTIVE)))
            return module
        return build

    roles = {role: recorded(getattr(S.TORCH_SPEC, role)) for role in
             ("attn_norm", "qkv", "attn_out", "mlp_norm", "gate_up", "down", "norm", "embedding")}
    return S.LayerSpec(name="te", **roles)


def te_pipeline_on_rank(rank: int, world: int, cfg: RunConfig):
    from megalysses.models import spec as S
    from megalysses.models import te
    from megalysses.trainer import Trainer

    S.te_spec, te.fp8_context = recording_te_spec, recording_fp8_context  # this rank process only
    trainer = Trainer(cfg)
    ids = __import__("torch").randint(0, cfg.model.vocab_size, (cfg.train.global_batch_size, cfg.train.seq_len + 1))
    batches = trainer.batcher.micro_batches(ids[:, :-1], ids[:, 1:], __import__("torch").arange(cfg.train.seq_len)
                                            .expand(ids.shape[0], cfg.train.seq_len))
    metrics = trainer.train_step(batches, 0)
    return [c.spec.name for c in trainer.chunks], list(FORWARDS), metrics["loss"]


@pytest.mark.parametrize("layout", [ParallelLayout(pp=2), ParallelLayout(pp=2, vpp=2, schedule="interleaved-1f1b")],
                         ids=["pp2", "pp2-vpp2"])
def test_pipeline_stages_build_the_backend_layers_and_run_under_fp8(layout):
    cfg = RunConfig(model=GPTConfig(num_layers=4, backend="te"), layout=layout,
                    train=TrainConfig(global_batch_size=4, micro_batch_size=1, seq_len=16, fp8="delayed"))
    cfg.check(2)
    for stage, (specs, forwards, loss) in enumerate(run_ranks(te_pipeline_on_rank, 2, cfg, timeout=120)):
        assert specs == ["te"] * layout.vpp, f"pipeline rank {stage} built {specs}"
        assert forwards and all(forwards), f"pipeline rank {stage}: {forwards.count(False)} forwards ran outside FP8"
        assert loss > 0


BAD_CHOICES = [
    ("model.attention_core=flsh", "model.attention_core", "'sdpa', 'flash', 'te', 'auto'"),
    ("layout.schedule=1f2b", "layout.schedule", "'1f1b', 'gpipe', 'interleaved-1f1b'"),
    ("model.backend=tee", "model.backend", "'torch', 'te'"),
    ("layout.zero=2", "layout.zero", "0, 1, 3"),
    ("memory.recompute=ful", "memory.recompute", "'none', 'selective', 'around_core', 'full'"),
    ("train.fp8=fp4", "train.fp8", "'none', 'delayed', 'current'"),
    ("train.lr_schedule=linear", "train.lr_schedule", "'cosine', 'wsd', 'constant'"),
]


@pytest.mark.parametrize("override, key, choices", BAD_CHOICES, ids=[b[0] for b in BAD_CHOICES])
def test_bad_choice_stops_before_any_rank_with_one_line(override, key, choices, capsys, tmp_path):
    from megalysses import bench, train

    for main in (train.main, bench.main):
        assert main([override, f"logging.run_dir={tmp_path / 'run'}"]) == 2
        out = capsys.readouterr()
        lines = out.err.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in out.err + out.out, out.err
        value = override.split("=", 1)[1]
        assert key in lines[0] and repr(value if not value.isdigit() else int(value)) in lines[0], lines[0]
        assert f"expected one of {choices}" in lines[0], lines[0]
    assert not (tmp_path / "run").exists()  # nothing started, nothing written


def test_bad_choice_from_the_command_line_exits_2_without_a_traceback(tmp_path):
    out = subprocess.run([sys.executable, "-m", "megalysses.train", "model.attention_core=flsh",
                          f"logging.run_dir={tmp_path}"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip() == ("megalysses-train: config error: override 'model.attention_core=flsh': "
                                  "model.attention_core: expected one of 'sdpa', 'flash', 'te', 'auto', 'flex', "
                                  "'reference', got 'flsh' (str)")
