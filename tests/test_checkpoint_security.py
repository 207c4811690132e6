"""Loading a checkpoint never runs code from it: the DCP index is unpickled admitting only DCP's metadata classes,
every command checks the manifest (SHA-256) before unpickling anything, TE extra state loads weights-only and its
pickled FP8 state is vetted before Transformer Engine sees it; a crafted file gives one line and creates nothing."""
import io
import json
import os
import pickle

import pytest
import torch

from megalysses.checkpoint import Checkpointer, CheckpointError, TensorReader
from megalysses.checkpoint.files import MANIFEST, describe_files, payload_files, read_manifest, verify, write_manifest
from megalysses.checkpoint.unpickle import sanitized_te_state
from megalysses.config import CheckpointConfig, LoggingConfig, RunConfig, TrainConfig
from megalysses.models.config import GPTConfig
from megalysses.tools.convert import main as convert

MODEL = GPTConfig(vocab_size=40, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=24)


class CreatesFile:
    """Unpickled, it opens (creates) a file: what a crafted checkpoint would do with any code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


class RunsShell:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


def run_config(tmp_path, resume="auto"):
    return RunConfig(model=MODEL, train=TrainConfig(global_batch_size=4, micro_batch_size=4, steps=5),
                     checkpoint=CheckpointConfig(dir=str(tmp_path / "ckpts"), resume=resume),
                     logging=LoggingConfig(str(tmp_path / "run")))


def checkpointer(cfg, extra_module=None):
    from megalysses.models.gpt import GPT
    from megalysses.optim import build_data_parallel
    from megalysses.parallel import ParallelMesh

    mesh = ParallelMesh.single_device()
    model = GPT(cfg.model, mesh)
    model.init_weights(1)
    if extra_module is not None:
        model.blocks["0"].attn.fp8 = extra_module
    return Checkpointer(cfg, mesh, [model], build_data_parallel(model, mesh, cfg.train))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("saved")
    return checkpointer(run_config(tmp)).save(2)


def craft(saved, tmp_path, payload, remanifest):
    """A copy of a good checkpoint whose .metadata is `payload`; its manifest re-hashed (a tamperer who rewrote it
    too) or left as it was (then only the manifest check stands between the file and the unpickler)."""
    import shutil

    folder = tmp_path / "ckpts" / "step-2"
    shutil.copytree(saved, folder)
    size = (folder / ".metadata").stat().st_size
    (folder / ".metadata").write_bytes(payload + b" " * (size - len(payload)))  # same size: only the hash can tell
    if remanifest:
        write_manifest(folder, describe_files(folder, payload_files(folder)), 2)
    return folder


def payloads(marker):
    from torch.distributed.checkpoint.metadata import Metadata

    inside = Metadata(state_dict_metadata={}, planner_data={"x": CreatesFile(marker)})
    return {"open": pickle.dumps(CreatesFile(marker)), "system": pickle.dumps(RunsShell(marker)),
            "inside-metadata": pickle.dumps(inside)}


def one_line(text):
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in text, text
    return lines[0]


COMMANDS = {
    "inspect": lambda ckpt, tmp: convert(["inspect", str(ckpt)]),
    "to-hf": lambda ckpt, tmp: convert(["megalysses-to-hf", str(ckpt), str(tmp / "hf"), "--quiet"]),
    "reshard": lambda ckpt, tmp: convert(["reshard", str(ckpt), str(tmp / "re"), "--layout", "single", "--quiet"]),
}


@pytest.mark.parametrize("remanifest", [True, False], ids=["manifest-rewritten", "manifest-stale"])
@pytest.mark.parametrize("kind", ["open", "system", "inside-metadata"])
def test_crafted_metadata_creates_nothing_on_any_convert_command(saved, tmp_path, capsys, kind, remanifest):
    marker = tmp_path / "pwned"
    ckpt = craft(saved, tmp_path, payloads(marker)[kind], remanifest)
    for name, command in COMMANDS.items():
        code = command(ckpt, tmp_path)
        out = capsys.readouterr()
        assert code in (1, 2) and not marker.exists(), (name, out)
        line = one_line(out.err)
        if remanifest:
            assert ".metadata: refers to" in line and "do not use it" in line, line
        else:
            assert "SHA-256" in line and "(corrupted or modified)" in line, line
        assert not (tmp_path / "hf").exists() and not (tmp_path / "re").exists()


@pytest.mark.parametrize("remanifest", [True, False], ids=["manifest-rewritten", "manifest-stale"])
def test_crafted_metadata_creates_nothing_on_resume_load_and_reader(saved, tmp_path, remanifest):
    marker = tmp_path / "pwned"
    ckpt = craft(saved, tmp_path, payloads(marker)["open"], remanifest)
    for resume in ("auto", str(ckpt)):
        with pytest.raises(CheckpointError) as err:
            checkpointer(run_config(tmp_path, resume)).resume()
        assert "\n" not in str(err.value) and not marker.exists()
    for read in (lambda: checkpointer(run_config(tmp_path)).load(ckpt), lambda: TensorReader(ckpt)):
        with pytest.raises(CheckpointError, match=r"\.metadata: refers to (io|builtins)\.open") as err:
            read()
        assert "\n" not in str(err.value) and not marker.exists()


def test_real_metadata_still_loads_and_data_files_stay_inside_the_folder(saved, tmp_path):
    reader = TensorReader(saved)
    assert reader.get("model.embed.weight").shape == (40, 16)
    from megalysses.checkpoint.tensors import read_dcp_metadata

    metadata = read_dcp_metadata(saved)
    key = next(iter(metadata.storage_data))
    metadata.storage_data[key].relative_path = "../../outside.distcp"
    ckpt = craft(saved, tmp_path, pickle.dumps(metadata), remanifest=True)
    with pytest.raises(CheckpointError, match=r"names data file '\.\./\.\./outside\.distcp'"):
        TensorReader(ckpt)


def test_manifest_is_sha256_and_old_crc32_manifests_load_with_one_warning(saved, tmp_path, capsys):
    import shutil

    assert all(len(e["sha256"]) == 64 and "crc32" not in e for e in read_manifest(saved)["files"].values())
    old = tmp_path / "step-2"
    shutil.copytree(saved, old)
    manifest = json.loads((old / MANIFEST).read_text())
    from megalysses.checkpoint.files import file_crc32

    manifest["version"] = 1
    manifest["files"] = {n: {"bytes": e["bytes"], "crc32": file_crc32(old / n)} for n, e in manifest["files"].items()}
    (old / MANIFEST).write_text(json.dumps(manifest))
    verify(old)
    verify(old)
    assert capsys.readouterr().err.count("records CRC32s (checkpoint format version 1)") == 1
    (old / "meta.json").write_text((old / "meta.json").read_text() + " ")
    with pytest.raises(CheckpointError, match=r"meta\.json: \d+ bytes, the manifest records"):
        verify(old)


class _FP8Blob(torch.nn.Module):
    """Stands in for a Transformer Engine module: its extra state is a uint8 tensor of pickled bytes, which TE's
    set_extra_state hands to pickle.loads."""

    def __init__(self, state=None):
        super().__init__()
        self.state, self.received = state, None

    def get_extra_state(self):
        return torch.frombuffer(bytearray(pickle.dumps(self.state)), dtype=torch.uint8)

    def set_extra_state(self, blob):
        self.received = pickle.loads(blob.numpy().tobytes())


def test_te_extra_state_loads_weights_only_and_crafted_fp8_state_never_reaches_te(tmp_path):
    good = {"scale_fwd": torch.tensor([1.0, 2.0]), "amax": torch.ones(2, 3)[:, 1:], "extra_fp8_variables": {"n": 3}}
    cfg = run_config(tmp_path)
    path = checkpointer(cfg, _FP8Blob(good)).save(2)
    loader = checkpointer(cfg, module := _FP8Blob())
    assert loader.resume() == 2 and loader.extra_restored
    assert torch.equal(module.received["amax"], torch.ones(2, 2)) and module.received["extra_fp8_variables"]["n"] == 3

    marker = tmp_path / "pwned"
    extra = path / "extra" / "rank-00000.pt"
    key = next(iter(torch.load(extra, weights_only=True)))
    evil_blob = torch.frombuffer(bytearray(pickle.dumps({"recipe": RunsShell(marker)})), dtype=torch.uint8)
    for content, message in (({key: evil_blob}, r"refers to posix\.system|refers to os\.system"),
                             ({key: CreatesFile(marker)}, r"not loadable as tensors only")):
        torch.save(content, extra)
        write_manifest(path, describe_files(path, payload_files(path)), 2)
        loader = checkpointer(cfg, module := _FP8Blob())
        with pytest.raises(CheckpointError, match=message) as err:
            loader.resume()
        assert "\n" not in str(err.value) and not marker.exists() and module.received is None


def test_sanitized_te_state_passes_other_values_as_they_are():
    empty = torch.empty(0, dtype=torch.uint8)
    assert sanitized_te_state(empty, "x") is empty and sanitized_te_state(None, "x") is None
    assert sanitized_te_state({"a": 1}, "x") == {"a": 1}
    blob = torch.frombuffer(bytearray(pickle.dumps(io.BytesIO(b"x"))), dtype=torch.uint8)
    with pytest.raises(CheckpointError, match=r"x: refers to _io\.BytesIO"):
        sanitized_te_state(blob, "x")


def test_resume_never_refuses_to_overwrite_another_runs_checkpoints(saved, tmp_path):
    """check_overwrite (called by the CLI before ranks start) and the Checkpointer's first save both refuse to start
    afresh over existing checkpoints unless checkpoint.overwrite=true, naming the folder, the count and newest step."""
    import dataclasses
    import shutil

    from megalysses.checkpoint import check_overwrite
    from megalysses.config import ConfigError

    never = run_config(tmp_path, resume="never")
    check_overwrite(never)  # nothing there yet
    saver = checkpointer(never)
    saver.save(1)
    saver.save(2)  # its own checkpoints: checked once, at the first save
    shutil.copytree(saved, tmp_path / "ckpts" / "step-7")
    root = tmp_path / "ckpts"
    message = (rf"checkpoint.resume = 'never', but {root} holds 3 checkpoint\(s\) of an earlier run \(newest step-7\)"
               r".*set checkpoint.overwrite=true .* or another logging.run_dir")
    with pytest.raises(ConfigError, match=message) as err:
        check_overwrite(never)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=message):
        checkpointer(never).save(1)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-1", "step-2", "step-7"]  # nothing touched
    allowed = dataclasses.replace(never, checkpoint=dataclasses.replace(never.checkpoint, overwrite=True))
    check_overwrite(allowed)
    assert checkpointer(allowed).save(1).name == "step-1"
    check_overwrite(run_config(tmp_path, resume="auto"))  # continuing them is not overwriting
