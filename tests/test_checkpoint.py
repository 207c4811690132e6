"""Checkpoint files, single process: manifests catch missing / truncated / corrupted files, commits are atomic with
`latest` last and keep-last-K retention, resume candidates skip temporary folders, writers stream one tensor at a
time, and our safetensors writer produces files the safetensors library reads."""
import dataclasses
import json
import weakref

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from megalysses.checkpoint import CheckpointError, TensorReader, resume_candidates, save_streaming, verify
from megalysses.checkpoint.files import (MANIFEST, META, commit, describe_files, first_problem, list_checkpoints,
                                         payload_files, problem_at, prune, remove_stale_temps,
                                         write_json, write_latest, write_manifest)
from megalysses.checkpoint.hf_files import SafetensorsWriter, plan_shards, write_shards

SPECS = [("model.a", (3, 4), torch.float32), ("model.b", (5,), torch.bfloat16), ("optim.a.step", (), torch.float32)]


def value(key, shape, dtype):
    g = torch.Generator().manual_seed(len(key) * 7 + len(shape))
    return torch.randn(shape, generator=g).to(dtype)


def write_checkpoint(folder, step=1):
    """A small complete checkpoint folder written offline (streamed), with meta and manifest."""
    save_streaming(folder, SPECS, lambda key: value(*next(s for s in SPECS if s[0] == key)))
    write_json(folder / META, {"step": step})
    write_manifest(folder, describe_files(folder, payload_files(folder)), step)
    return folder


def test_tensors_round_trip_and_validation_names_the_bad_file(tmp_path):
    folder = write_checkpoint(tmp_path / "step-1")
    assert verify(folder)["step"] == 1
    reader = TensorReader(folder)
    for key, shape, dtype in SPECS:
        assert reader.shape(key) == shape and reader.dtype(key) == dtype
        assert torch.equal(reader.get(key), value(key, shape, dtype))
    with pytest.raises(CheckpointError, match=r"holds no tensor 'model\.zzz'"):
        reader.get("model.zzz")
    with pytest.raises(CheckpointError, match=r"'model\.a' has shape \(3, 4\) but the model needs \(4, 3\)"):
        reader.expect("model.a", (4, 3))

    data = sorted(p for p in folder.iterdir() if p.suffix == ".distcp")
    raw = data[0].read_bytes()
    data[0].write_bytes(raw[:-1] + bytes([raw[-1] ^ 1]))  # same size, one bit flipped
    with pytest.raises(CheckpointError, match=rf"{data[0].name}: SHA-256 .* \(corrupted or modified\)"):
        verify(folder)
    data[0].write_bytes(raw[:-5])
    with pytest.raises(CheckpointError, match=rf"{data[0].name}: {len(raw) - 5} bytes, .* \(truncated"):
        verify(folder)
    data[0].unlink()
    with pytest.raises(CheckpointError, match=rf"{data[0].name}: missing"):
        verify(folder)
    index, problem = first_problem(folder, part=(0, 1))
    assert problem_at(folder, index) == problem  # what another rank's index resolves to
    (folder / MANIFEST).unlink()
    with pytest.raises(CheckpointError, match="manifest.json: no such file; the checkpoint is partial"):
        verify(folder)


def test_commit_latest_retention_and_resume_candidates(tmp_path):
    root = tmp_path / "ckpts"
    for step in (2, 4, 6):
        tmp = root / f".tmp-step-{step}"
        write_checkpoint(tmp, step)
        commit(tmp, root / f"step-{step}")
        write_latest(root, root / f"step-{step}")
    (root / ".tmp-step-8").mkdir()  # a save that crashed half-way
    assert [s for s, _ in list_checkpoints(root)] == [2, 4, 6] and (root / "latest").read_text() == "step-6\n"
    candidates, explicit = resume_candidates("auto", root)
    assert [p.name for p in candidates] == ["step-6", "step-4", "step-2"] and not explicit
    assert resume_candidates(str(root / "step-4"), root) == ([root / "step-4"], True)
    assert [p.name for p in resume_candidates(str(root), tmp_path)[0]] == ["step-6", "step-4", "step-2"]
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        resume_candidates(str(tmp_path / "nowhere"), root)

    redo = root / ".tmp-step-6"  # a second save of the same step replaces the first atomically
    write_checkpoint(redo, 6)
    commit(redo, root / "step-6")
    assert verify(root / "step-6")["step"] == 6 and not redo.exists()
    assert [p.name for p in prune(root, keep_last=2)] == ["step-2"]
    remove_stale_temps(root)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-4", "step-6"]
    assert prune(root, keep_last=0) == []


def test_writers_hold_one_tensor_at_a_time(tmp_path):
    """Both streaming writers ask for (or consume) the next tensor only after the previous one was written and
    released (freed by reference counting alone): peak memory is one tensor, not the model."""
    specs = [(f"model.t{i}", (64, 64), torch.float32) for i in range(6)]
    alive = []

    def make(name):
        assert all(ref() is None for ref in alive), "an earlier tensor is still held"
        t = torch.full((64, 64), float(len(alive)))
        alive.append(weakref.ref(t))
        return t

    save_streaming(tmp_path / "dcp", specs, make)
    assert torch.equal(TensorReader(tmp_path / "dcp").get("model.t5"), torch.full((64, 64), 5.0))

    alive.clear()

    def stream():
        for name, _, _ in specs:
            yield name, make(name)

    (tmp_path / "hf").mkdir()
    index = write_shards(tmp_path / "hf", specs, stream(), max_bytes=3 * 64 * 64 * 4)
    assert sorted(set(index["weight_map"].values())) == ["model-00001-of-00002.safetensors",
                                                         "model-00002-of-00002.safetensors"]


def test_safetensors_writer_is_read_by_the_library(tmp_path):
    tensors = {"a": torch.randn(3, 5), "b.bias": torch.randn(7).to(torch.bfloat16), "c": torch.tensor(2.5),
               "d": torch.arange(6, dtype=torch.int64).view(2, 3)}
    entries = [(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]
    writer = SafetensorsWriter(tmp_path / "x.safetensors", entries)
    with pytest.raises(Exception, match="got tensor 'b.bias', planned 'a' next"):
        writer.write("b.bias", tensors["b.bias"])
    for name, t in tensors.items():
        writer.write(name, t)
    writer.close()
    loaded = load_file(tmp_path / "x.safetensors")
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[n], t) for n, t in tensors.items())
    with safe_open(str(tmp_path / "x.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
    assert [len(s) for s in plan_shards(entries, max_bytes=66)] == [1, 3]  # a: 60 bytes; b, c, d: 14 + 4 + 48
    assert [len(s) for s in plan_shards(entries, max_bytes=10)] == [1, 1, 1, 1]  # too large: a shard each


class Samples:
    """The dataset protocol a BatchLoader reads (samples are never drawn here: only the state is checked)."""

    seq_len = 8

    def __init__(self, name):
        self.name = name

    def describe(self):
        return {"name": self.name}

    def position(self, consumed):
        return {"sample": consumed}


def test_one_process_save_and_load_restore_everything_and_refuse_mismatches(tmp_path):
    """Checkpointer without torch.distributed: model, AdamW state (ZeRO-0 masters), step, RNG and the packed loader's
    position come back; another model geometry or another dataset is refused with the field and the fix."""
    from megalysses.checkpoint import Checkpointer, TrainingState
    from megalysses.config import CheckpointConfig, LoggingConfig, RunConfig, TrainConfig
    from megalysses.data import BatchLoader
    from megalysses.models.config import GPTConfig
    from megalysses.models.gpt import GPT
    from megalysses.optim import build_data_parallel
    from megalysses.parallel import ParallelMesh

    model_cfg = GPTConfig(vocab_size=40, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=24)
    cfg = RunConfig(model=model_cfg, train=TrainConfig(global_batch_size=4, micro_batch_size=4, steps=5),
                    checkpoint=CheckpointConfig(dir=str(tmp_path / "ckpts")), logging=LoggingConfig(str(tmp_path)))

    def setup(cfg, dataset="a"):
        mesh = ParallelMesh.single_device()
        model = GPT(cfg.model, mesh)
        model.init_weights(1)
        dp = build_data_parallel(model, mesh, cfg.train)
        loader = BatchLoader(Samples(dataset), cfg.train.global_batch_size)
        return model, dp, Checkpointer(cfg, mesh, [model], dp, {"train": loader})

    model, dp, saver = setup(cfg)
    ids = torch.randint(0, 40, (2, 8), generator=torch.Generator().manual_seed(0))
    model(ids, labels=ids).mean().backward()
    dp.finish()
    dp.step(cfg.train.lr)
    torch.manual_seed(77)
    path = saver.save(3)
    rng_after_save = torch.rand(3)
    assert path.name == "step-3" and (tmp_path / "ckpts" / "latest").read_text() == "step-3\n"
    saved = TrainingState([model], ParallelMesh.single_device(), dp).gather_to_writers()

    model2, dp2, restorer = setup(cfg)
    assert restorer.resume() == 3
    assert torch.equal(torch.rand(3), rng_after_save)  # the RNG continues where the saved run's did
    assert restorer.loaders["train"].consumed_samples == 3 * 4
    again = TrainingState([model2], ParallelMesh.single_device(), dp2).gather_to_writers()
    assert saved.keys() == again.keys() and all(torch.equal(saved[k], again[k]) for k in saved)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), model2.parameters()))

    wider = dataclasses.replace(cfg, model=dataclasses.replace(model_cfg, hidden_size=32))
    with pytest.raises(CheckpointError, match=r"holds another model \(model.hidden_size: checkpoint 16, config 32\)"):
        setup(wider)[2].resume()
    with pytest.raises(CheckpointError, match=r"meta.json: the checkpoint's data loader read other data: "
                                              r"name: checkpoint 'a', now 'b'"):
        setup(cfg, dataset="b")[2].resume()
    other_batch = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, global_batch_size=8,
                                                                     micro_batch_size=8))
    with pytest.raises(CheckpointError, match="resume with train.global_batch_size=4"):
        setup(other_batch)[2].resume()


class _FP8Meta(torch.nn.Module):
    """Stands in for a Transformer Engine module: state outside its parameters (an amax history)."""

    def __init__(self):
        super().__init__()
        self.history = torch.zeros(4)

    def get_extra_state(self):
        if not self.history.any():  # as TE: a module that never ran in FP8 saves an empty tensor
            return torch.empty(0, dtype=torch.uint8)
        return {"amax_history": self.history.clone()}

    def set_extra_state(self, state):
        if isinstance(state, dict):
            self.history = state["amax_history"].clone()


def test_module_extra_state_is_kept_apart_and_restored_only_to_the_same_layout(tmp_path, capsys):
    """FP8 scaling state goes to extra/rank-N.pt, next to (not inside) the layout-independent tensors; it comes
    back under the same layout and is left to re-calibrate under another."""
    from megalysses.checkpoint import Checkpointer
    from megalysses.config import CheckpointConfig, LoggingConfig, RunConfig, TrainConfig
    from megalysses.models.config import GPTConfig
    from megalysses.models.gpt import GPT
    from megalysses.optim import build_data_parallel
    from megalysses.parallel import ParallelMesh

    cfg = RunConfig(model=GPTConfig(vocab_size=40, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=24),
                    train=TrainConfig(global_batch_size=4, micro_batch_size=4, steps=5),
                    checkpoint=CheckpointConfig(dir=str(tmp_path / "ckpts")), logging=LoggingConfig(str(tmp_path)))

    def setup():
        mesh = ParallelMesh.single_device()
        model = GPT(cfg.model, mesh)
        model.init_weights(1)
        model.blocks["0"].attn.fp8 = _FP8Meta()
        return model, Checkpointer(cfg, mesh, [model], build_data_parallel(model, mesh, cfg.train))

    model, saver = setup()
    never_ran = saver.save(1)  # FP8 never ran: nothing to restore, so an FP8 delayed run calibrates on resume
    _, loader = setup()
    loader.load(never_ran)
    assert not saver.extra_restored and not loader.extra_restored
    model.blocks["0"].attn.fp8.history = torch.tensor([1.0, 2.0, 3.0, 4.0])
    path = saver.save(2)
    assert (path / "extra" / "rank-00000.pt").exists()
    restored, loader = setup()
    assert loader.resume() == 2 and loader.extra_restored
    assert torch.equal(restored.blocks["0"].attn.fp8.history, torch.tensor([1.0, 2.0, 3.0, 4.0]))

    meta = json.loads((path / "meta.json").read_text())
    meta["layout"]["tp"] = 2  # as if saved under another layout
    (path / "meta.json").write_text(json.dumps(meta))
    fresh, other = setup()
    other.load(path)
    assert torch.equal(fresh.blocks["0"].attn.fp8.history, torch.zeros(4)) and not other.extra_restored
    assert "extra state (FP8 scaling history) not restored: the layout changed" in capsys.readouterr().out
