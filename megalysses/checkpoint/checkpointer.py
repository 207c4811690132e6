"""The train loop's checkpoints: `resume()` before the first step, `after_step(done)` after each one (saves every
checkpoint.every steps and after the last), atomically, keeping the newest checkpoint.keep_last."""
from __future__ import annotations

import dataclasses
import random
import sys
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
import torch.distributed as dist

from megalysses.config import ConfigError, RunConfig, load_run_config, save_resolved
from megalysses.models.build import model_inventory, same_parameters
from megalysses.parallel import ParallelMesh
from megalysses.parallel.dp import DataParallel
from megalysses.parallel import collectives as C

from .files import (CONFIG, FORMAT, META, PARTS, VERSION, CheckpointError, commit, describe_files, first_problem,
                    is_checkpoint, list_checkpoints, payload_files, problem_at, prune, read_json, remove_stale_temps,
                    step_dir_name, temp_dir_name, write_json, write_latest, write_manifest)
from .state import MOMENTS, TrainingState, model_key, optimizer_key, optimizer_present
from .hf_files import HF_EXTRA, copy_files, describe_hf_source, tokenizer_files
from .init_from import HFWeights, is_hf_folder
from .tensors import TensorReader, save_on_every_rank
from .unpickle import sanitized_te_state

def rng_file(rank: int) -> str:
    return f"rng/rank-{rank:05d}.pt"


def extra_file(rank: int) -> str:
    return f"extra/rank-{rank:05d}.pt"


def extra_state_modules(chunks) -> dict[str, torch.nn.Module]:
    """Modules that keep state outside their parameters (Transformer Engine's FP8 scaling history), by path."""
    return {f"{i}.{name}": m for i, chunk in enumerate(chunks) for name, m in chunk.named_modules()
            if type(m).get_extra_state is not torch.nn.Module.get_extra_state}


def checkpoint_root(cfg: RunConfig) -> Path:
    """The folder of a run's checkpoints: checkpoint.dir, else <logging.run_dir>/checkpoints."""
    return Path(cfg.checkpoint.dir or Path(cfg.logging.run_dir) / "checkpoints")


def check_overwrite(cfg: RunConfig) -> None:
    """Raise ConfigError when checkpoint.resume = 'never' would start afresh over existing checkpoints (which the
    run's saves replace and keep_last prunes) and checkpoint.overwrite is not set. Call before ranks start."""
    if cfg.checkpoint.resume != "never" or cfg.checkpoint.overwrite:
        return
    root = checkpoint_root(cfg)
    found = list_checkpoints(root)
    if found:
        raise ConfigError(f"checkpoint.resume = 'never', but {root} holds {len(found)} checkpoint(s) of an earlier run "
                          f"(newest step-{found[-1][0]}) that this run's saves would replace or prune: set "
                          "checkpoint.overwrite=true to discard them, checkpoint.resume=auto to continue them, or "
                          "another logging.run_dir (or checkpoint.dir)")


def load_extra_state(path: Path) -> dict:
    """A rank's {module path: extra state} file, read with torch.load(weights_only=True): tensors, numbers, text."""
    try:
        state = torch.load(path, weights_only=True)
    except Exception as e:  # noqa: BLE001 - the weights-only unpickler refuses with its own error types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not loadable as tensors only ({first}); delete the checkpoint's extra/ "
                              "folder to resume with fresh FP8 scales") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: holds a {type(state).__name__}, not a dict of module extra states; delete "
                              "the checkpoint's extra/ folder to resume with fresh FP8 scales")
    return state


class Checkpointer:
    """Saves and restores everything a run needs to continue exactly: the model and AdamW state (layout-independent),
    the step (the LR schedule is a function of it), every rank's RNG states and the data position."""

    def __init__(self, cfg: RunConfig, mesh: ParallelMesh, chunks, dp: Optional[DataParallel] = None,
                 loaders: Optional[Mapping[str, Any]] = None):
        self.cfg, self.mesh = cfg, mesh
        self.chunks = list(chunks)
        self.state = TrainingState(self.chunks, mesh, dp)
        self.loaders = dict(loaders or {})  # split -> BatchLoader (packed datasets); windows are indexed by step
        self.root = checkpoint_root(cfg)
        self.saved_once = False  # the first save checks it overwrites nothing it must not (check_overwrite)
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        self.everyone = C.CommGroup(None, tuple(range(self.world)), self.rank)  # pg None: the default group
        self.device = mesh.device
        self.skipped: list[str] = []  # checkpoints resume() passed over, and why
        self.extra_restored = False  # whether resume() brought back modules' extra state (TE FP8 scaling history)
        self.source: Optional[dict] = None  # the HF model the run started from (meta.json's source), if any
        self.source_files: tuple[Optional[Path], list[str]] = (None, [])  # its tokenizer files: folder, names

    # ---------------------------------------------------------------------------------------------------- save

    def after_step(self, done: int) -> Optional[Path]:
        """Save when `done` steps are a multiple of checkpoint.every, or the last step."""
        every = self.cfg.checkpoint.every
        if done == self.cfg.train.steps or (every and done % every == 0):
            return self.save(done)
        return None

    def save(self, step: int) -> Path:
        """Collective: write `<root>/.tmp-step-N`, hash and validate it, rename it to `step-N`, point `latest` at it,
        delete checkpoints beyond keep_last. A crash at any point leaves the previous checkpoints intact."""
        tmp, final = self.root / temp_dir_name(step), self.root / step_dir_name(step)
        if not self.saved_once:  # every rank alike: nothing is committed before the first barrier
            check_overwrite(self.cfg)
            self.saved_once = True
        if self.rank == 0:
            remove_stale_temps(self.root)
            for sub in (PARTS, "rng", "extra"):
                (tmp / sub).mkdir(parents=True, exist_ok=True)
        C.barrier(self.everyone)
        torch.save(self._rng_state(), tmp / rng_file(self.rank))
        extra = {path: m.get_extra_state() for path, m in extra_state_modules(self.chunks).items()}
        if extra:  # per rank and per layout: kept apart from the layout-independent tensors
            torch.save(extra, tmp / extra_file(self.rank))
        save_on_every_rank(tmp, self.state.gather_to_writers())
        if self.rank == 0:
            save_resolved(self.cfg, tmp)
            write_json(tmp / META, self._meta(step))
            copy_files(*self.source_files, tmp / HF_EXTRA)  # what an export needs: the source's tokenizer
        C.barrier(self.everyone)
        names = payload_files(tmp)  # each rank hashes its share of the files
        write_json(tmp / PARTS / f"rank-{self.rank}.json", describe_files(tmp, names[self.rank::self.world]))
        C.barrier(self.everyone)
        failure = None
        if self.rank == 0:
            try:
                self._publish(tmp, final, step)
            except Exception as e:  # noqa: BLE001 - every rank must learn that the save failed
                failure = e
        status = C.all_reduce(torch.tensor([int(failure is not None)], device=self.device), self.everyone, "max")
        if failure is not None:
            raise failure
        if status.item():
            raise CheckpointError(f"saving {final} failed on rank 0 (see its error); the previous checkpoints are kept")
        return final

    def _publish(self, tmp: Path, final: Path, step: int) -> None:
        """Rank 0: merge the per-rank hashes into the manifest, check the checkpoint is complete, commit it."""
        files: dict[str, dict] = {}
        for part in sorted((tmp / PARTS).glob("rank-*.json")):
            files.update(read_json(part, "a rank did not report its file hashes"))
        missing = sorted(set(payload_files(tmp)) - set(files))
        expected = [rng_file(r) for r in range(self.world)] + [".metadata", META, CONFIG]
        missing += [n for n in expected if n not in files]
        reader = TensorReader(tmp)
        missing += sorted(k for k in self._expected_keys() if k not in reader)
        if missing:
            raise CheckpointError(f"{tmp}: incomplete after writing, missing {missing[:6]}; not committed")
        for part in (tmp / PARTS).iterdir():
            part.unlink()
        (tmp / PARTS).rmdir()
        write_manifest(tmp, files, step)
        commit(tmp, final)
        write_latest(self.root, final)
        prune(self.root, self.cfg.checkpoint.keep_last)

    def _expected_keys(self) -> list[str]:
        names = list(model_inventory(self.cfg.model))
        optimizer = [optimizer_key(n, k) for n in names for k in (*MOMENTS, "step")] if self.state.dp else []
        return [model_key(n) for n in names] + optimizer

    def _meta(self, step: int) -> dict:
        return {"format": FORMAT, "version": VERSION, "step": step, "world_size": self.world,
                "layout": dataclasses.asdict(self.mesh.layout), "optimizer": self.state.dp is not None,
                "rng": True, "data": self._data_state(step), "source": self.source}

    def _data_state(self, step: int) -> dict:
        """The data position: the step (windows are drawn per step), and the packed loader's state at it."""
        gb = self.cfg.train.global_batch_size
        loaders = {}
        if "train" in self.loaders:
            self.loaders["train"].consumed_samples = step * gb  # the loop reads batch `step` at step * gb samples
            loaders["train"] = self.loaders["train"].state_dict()
        return {"step": step, "global_batch_size": gb, "loaders": loaders}

    def _rng_state(self) -> dict:
        cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        return {"torch": torch.get_rng_state(), "cuda": cuda, "python": random.getstate()}

    # -------------------------------------------------------------------------------------------------- resume

    def resume(self) -> int:
        """Collective: load the checkpoint checkpoint.resume names ('auto': the newest valid one under the
        checkpoint dir, passing over damaged ones with a warning); returns the step to continue from (0: none)."""
        choice = self.cfg.checkpoint.resume
        if choice == "never":
            return self.initialise()
        candidates, explicit = resume_candidates(choice, self.root)
        for path in candidates:
            problem = self._validate_everywhere(path)
            if problem is None:
                return self.load(path)
            if explicit:
                raise CheckpointError(f"checkpoint.resume = {choice!r}: {problem}")
            self.skipped.append(problem)
            self._say(f"warning: skipping checkpoint {path}: {problem}; trying the one before it")
        if self.skipped:
            raise CheckpointError(f"no valid checkpoint under {self.root} ({len(self.skipped)} damaged: "
                                  f"{'; '.join(self.skipped)}); repair or move them, or set checkpoint.resume=never")
        return self.initialise()

    def initialise(self) -> int:
        """Collective: a run with no checkpoint of its own starts at step 0, with checkpoint.init_from's weights when
        set (an HF folder or a checkpoint, weights only: the optimizer starts fresh); returns 0."""
        source = self.cfg.checkpoint.init_from
        if source is None:
            return 0
        if is_hf_folder(Path(source)):
            reader = HFWeights(source, self.cfg.model)
            self.source = describe_hf_source(reader.folder)
            self.source_files = (reader.folder.folder, self.source["tokenizer_files"])
        else:
            problem = self._validate_everywhere(Path(source))
            if problem is not None:
                raise CheckpointError(f"checkpoint.init_from = {source!r}: {problem}")
            reader = TensorReader(source)
            self._carry_source(Path(source), read_json(Path(source) / META, "the checkpoint is incomplete"))
        self.state.load(reader, with_optimizer=False)
        self._say(f"megalysses: weights from {source} (checkpoint.init_from); the optimizer starts fresh at step 0")
        return 0

    def _validate_everywhere(self, path: Path) -> Optional[str]:
        """Every rank checks its share of the files; all agree on the first bad one (None: the checkpoint is good)."""
        index, problem = first_problem(path, (self.rank, self.world))
        big = 2**62
        worst = torch.tensor([index if problem else big], dtype=torch.int64, device=self.device)
        C.all_reduce(worst, self.everyone, "min")
        return None if worst.item() == big else problem_at(path, int(worst.item()))

    def load(self, path: Path | str) -> int:
        """Collective-free restore from a validated checkpoint folder; returns its step."""
        path = Path(path)
        meta = read_json(path / META, "the checkpoint is incomplete")
        self._carry_source(path, meta)
        saved = load_run_config(path / CONFIG)
        self._check_model(saved, path)
        reader = TensorReader(path)
        names = self.state.written_names()
        with_optimizer = self.state.dp is not None and optimizer_present(reader, names)
        self.state.load(reader, with_optimizer)
        step = int(meta["step"])
        self._restore_rng(path, meta)
        self._restore_extra(path, meta)
        self._restore_data(path, meta, step)
        layout = meta.get("layout") or {}
        how = "" if with_optimizer else "; weights only, the optimizer starts fresh"
        self._say(f"megalysses: resumed from {path} at step {step} (saved with tp{layout.get('tp')} "
                  f"sp{layout.get('sp')} pp{layout.get('pp')} dp{layout.get('dp')} zero{layout.get('zero')} on "
                  f"{meta.get('world_size')} ranks{how})")
        return step

    def _carry_source(self, path: Path, meta: dict) -> None:
        """Keep the HF source a checkpoint records (ids, generation config, tokenizer files) for the next saves."""
        self.source = meta.get("source")
        self.source_files = (path / HF_EXTRA, tokenizer_files(path / HF_EXTRA))

    def _check_model(self, saved: RunConfig, path: Path) -> None:
        """The checkpoint's parameters (names, full shapes) must be this model's; other option changes warn."""
        mine, theirs = dataclasses.asdict(self.cfg.model), dataclasses.asdict(saved.model)
        differ = [k for k in mine if mine[k] != theirs.get(k)]

        def listed(keys) -> str:
            return "; ".join(f"model.{k}: checkpoint {theirs.get(k)!r}, config {mine[k]!r}" for k in keys)

        if not same_parameters(saved.model, self.cfg.model):
            raise CheckpointError(f"{path}: holds another model ({listed(differ)}); "
                                  f"resume with its model config ({path / CONFIG}) or set checkpoint.resume=never")
        if differ:
            self._say(f"warning: resuming {path} with changed model options: {listed(differ)}")

    def _restore_rng(self, path: Path, meta: dict) -> None:
        """Each rank takes its own saved RNG states when the world size is unchanged (else they stay seeded)."""
        if not meta.get("rng"):
            return
        if meta.get("world_size") != self.world:
            self._say(f"note: RNG states not restored: saved on {meta.get('world_size')} ranks, running on "
                      f"{self.world} (nothing in the loop draws from them)")
            return
        state = torch.load(path / rng_file(self.rank), weights_only=True)
        torch.set_rng_state(state["torch"])
        if state.get("cuda") is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda"], self.device)
        random.setstate(state["python"])

    def _restore_extra(self, path: Path, meta: dict) -> None:
        """Modules' extra state (TE FP8 scaling history) returns only to the same layout and backend; elsewhere
        it starts afresh (FP8 scales re-calibrate within amax_history_len steps)."""
        modules = extra_state_modules(self.chunks)
        saved = path / extra_file(self.rank)
        same = meta.get("layout") == dataclasses.asdict(self.mesh.layout) and meta.get("world_size") == self.world
        if not modules or not saved.exists():
            return
        if not same:
            self._say("note: module extra state (FP8 scaling history) not restored: the layout changed")
            return
        state = load_extra_state(saved)
        for key, module in modules.items():
            if key in state:
                module.set_extra_state(sanitized_te_state(state[key], f"{saved} [{key!r}]"))
                # a module that never ran in FP8 saves an empty tensor: nothing came back for it
                blob = state[key]
                self.extra_restored |= blob is not None and not (isinstance(blob, torch.Tensor) and blob.numel() == 0)

    def _restore_data(self, path: Path, meta: dict, step: int) -> None:
        """Check the packed loader continues the same sample stream at this step."""
        saved = (meta.get("data") or {}).get("loaders") or {}
        for split, loader in self.loaders.items():
            if split not in saved:
                continue
            try:
                loader.load_state_dict(saved[split])
            except ValueError as e:
                raise CheckpointError(f"{path / META}: {e}") from e
            expected = step * self.cfg.train.global_batch_size
            if loader.consumed_samples != expected:
                raise CheckpointError(
                    f"{path / META}: the data loader had consumed {loader.consumed_samples} samples at step {step}, "
                    f"but step {step} x train.global_batch_size {self.cfg.train.global_batch_size} = {expected}; "
                    f"resume with train.global_batch_size={saved[split].get('global_batch_size')}")

    def _say(self, text: str) -> None:
        if self.rank == 0:
            print(text, file=sys.stderr if text.startswith("warning") else sys.stdout, flush=True)


def resume_candidates(choice: str, root: Path) -> tuple[list[Path], bool]:
    """Folders to try, newest first, and whether `choice` named one checkpoint (then there is no fallback):
    'auto' -> the step-N folders under root; a checkpoint path -> it alone; a folder of checkpoints -> its step-N."""
    if choice == "auto":
        return [p for _, p in reversed(list_checkpoints(root))], False
    path = Path(choice)
    if is_checkpoint(path):
        return [path], True
    found = [p for _, p in reversed(list_checkpoints(path))]
    if not found:
        raise CheckpointError(f"checkpoint.resume = {choice!r}: no such checkpoint, and no step-N checkpoints in it; "
                              "give a checkpoint folder (e.g. <dir>/step-100), 'auto' or 'never'")
    return found, False
