"""megalysses-convert: Hugging Face <-> megalysses checkpoints, offline resharding, and inspection.

    megalysses-convert hf-to-megalysses llama-dir/ ckpt/ --layout tp2-sp2        # HF folder -> our checkpoint
    megalysses-convert megalysses-to-hf runs/x/checkpoints hf-out/ --max-shard-size 5GB
    megalysses-convert megalysses-to-hf runs/x/checkpoints hf-out/ --tokenizer data/chat  # the dataset's tokenizer
    megalysses-convert reshard ckpt/ ckpt-pp4/ --layout pp4 --world-size 4
    megalysses-convert inspect runs/x/checkpoints                                 # or an HF folder

Families: Llama (Llama-3 RoPE scaling included), Mistral, Qwen2 (q/k/v bias, tied embeddings). Our checkpoints are
layout-independent (full tensors under canonical names; see megalysses.checkpoint), so the target layout is checked
against the model and recorded; any layout can load the result. Every conversion streams one tensor at a time (peak
memory near the largest tensor), prints `[i/n] name` to stderr, and writes into a temporary folder next to the
output that is renamed when complete: an error leaves nothing behind.

What an export needs besides the weights travels with a converted checkpoint: its meta.json `source` records the
bos / eos / pad token ids and generation_config.json of the HF folder, and `hf_extra/` holds a byte-for-byte copy of
its tokenizer files (in the manifest, so hash-checked). The export writes config.json with those ids,
generation_config.json, and the tokenizer files from --tokenizer (a tokenizer folder, or a dataset prefix whose .json
records the tokenizer it was made with), else from the checkpoint's `hf_extra/`. A setting the target family cannot
express (e.g. model.softmax_scale) is refused by name, never dropped.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import yaml

from megalysses.checkpoint.files import (CONFIG, FORMAT, META, VERSION, CheckpointError, describe_files,
                                         first_problem, is_checkpoint, payload_files, read_json, resolve, verify,
                                         write_json, write_manifest)
from megalysses.checkpoint.hf_files import (CONFIG_JSON, GENERATION_CONFIG, HF_EXTRA, TOKENIZER_FILES, HFFolder,
                                            HFFolderError, describe_hf_source,
                                            copy_files, largest_token_id, read_optional_json, special_token_ids,
                                            token_ids, tokenizer_files, write_shards)
from megalysses.checkpoint.state import model_key
from megalysses.checkpoint.tensors import TensorReader, save_streaming
from megalysses.config import ConfigError, RunConfig, from_dict, load_layout, load_run_config, save_resolved
from megalysses.data.corpus import resolve_prefix
from megalysses.data.indexed import dataset_paths
from megalysses.data.tokenizer import file_sha256
from megalysses.models.config import GPTConfig
from megalysses.models.hf import (FAMILIES, family_fits, family_for, gpt_config_from_hf, hf_config_from_gpt, hf_names,
                                  hf_to_ours, ours_to_hf)
from megalysses.parallel.layout import LayoutError, ParallelLayout

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_IGNORED = ("rotary_emb.inv_freq",)  # buffers some old HF checkpoints carry; recomputed from the config


class ConvertError(ValueError):
    """A conversion that cannot proceed: names the file or tensor and the fix."""


def parse_size(text: str) -> int:
    """'5GB' (10^9), '500MiB' (2^20), '20KB', or a byte count."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*", text.upper())
    if not m or m.group(2) not in _UNITS and m.group(2) is not None:
        raise ConvertError(f"--max-shard-size {text!r}: expected a size like 5GB, 500MB, 2GiB or a byte count")
    size = int(float(m.group(1)) * _UNITS[m.group(2) or ""])
    if size < 1:
        raise ConvertError(f"--max-shard-size {text!r}: must be at least one byte")
    return size


def target_layout(name: str, model: GPTConfig, world_size: Optional[int]) -> ParallelLayout:
    """A bundled layout name, a layout file or an inline mapping ('{pp: 2, dp: 2}'), checked against the model (and
    the world size, when given)."""
    if name.lstrip().startswith("{"):
        try:
            layout = from_dict(ParallelLayout, yaml.safe_load(name), f"--layout {name!r}", "layout")
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at column {mark.column + 1}" if mark is not None else ""
            raise ConvertError(f"--layout {name!r}: not a YAML mapping ({getattr(e, 'problem', None) or 'unparsable'}"
                               f"{where}); write it like '{{tp: 2, sp: 2}}'") from e
    else:
        layout = load_layout(name)
    try:
        layout.check_model(heads=model.num_heads, kv_heads=model.num_kv_heads, layers=model.num_layers)
        return layout.resolve(world_size) if world_size else layout
    except LayoutError as e:
        raise ConvertError(f"layout {name!r} cannot hold this model ({model.num_heads} heads, {model.num_kv_heads} kv "
                           f"heads, {model.num_layers} layers): {e}") from e


class Progress:
    """`[i/n] name` lines on stderr (silent with --quiet)."""

    def __init__(self, total: int, quiet: bool):
        self.total, self.quiet, self.i = total, quiet, 0

    def __call__(self, name: str) -> None:
        self.i += 1
        if not self.quiet:
            print(f"[{self.i}/{self.total}] {name}", file=sys.stderr, flush=True)


def into_new_folder(out: Path | str, write: Callable[[Path], None]) -> Path:
    """Run write(tmp) on a temporary sibling of out, then rename it to out; on any error remove it and re-raise."""
    out = Path(out)
    if out.exists():
        raise ConvertError(f"{out}: already exists; choose a new output path or remove it first")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write(tmp)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def finish_checkpoint(folder: Path, run: RunConfig, meta: dict) -> None:
    """config.yaml, meta.json, then the manifest (last) of an offline-written checkpoint."""
    save_resolved(run, folder)
    write_json(folder / META, meta)
    write_manifest(folder, describe_files(folder, payload_files(folder)), meta["step"])


# ----------------------------------------------------------------------------------------------- hf-to-megalysses

def hf_to_megalysses(hf_dir: str, out: str, layout_name: str = "single", world_size: Optional[int] = None,
                     quiet: bool = False) -> Path:
    """An HF folder -> our checkpoint (step 0, weights only) for a target layout."""
    folder = HFFolder(hf_dir)
    model_type = folder.config.get("model_type")
    if model_type not in FAMILIES:
        raise ConvertError(f"{folder.folder / CONFIG_JSON}: model_type {model_type!r} (architectures "
                           f"{folder.config.get('architectures')}) is not supported; megalysses converts the "
                           f"families {', '.join(FAMILIES)} ({', '.join(FAMILIES.values())})")
    try:
        model = gpt_config_from_hf(folder.config)
    except ValueError as e:
        raise ConvertError(f"{folder.folder / CONFIG_JSON}: {e}") from e
    layout = target_layout(layout_name, model, world_size)
    shapes = _planned_shapes(folder, model)
    progress = Progress(len(shapes), quiet)

    def get(key: str) -> torch.Tensor:
        name = key[len("model."):]
        progress(key)
        return next(hf_to_ours(folder.get, model, only={name}))[1].float()  # masters are fp32

    source = describe_hf_source(folder)
    extras = source["tokenizer_files"]

    def write(tmp: Path) -> None:
        save_streaming(tmp, [(model_key(n), s, torch.float32) for n, s in shapes.items()], get)
        copy_files(folder.folder, extras, tmp / HF_EXTRA)
        finish_checkpoint(tmp, RunConfig(model=model, layout=layout), _meta(0, layout, source))

    return into_new_folder(out, write)


def _planned_shapes(folder: HFFolder, model: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Our full shapes, checked against every HF tensor's stored shape before anything is written."""
    asked: list[str] = []

    def header_only(name: str) -> torch.Tensor:
        asked.append(name)
        return folder.meta(name)

    try:
        shapes = {name: tuple(t.shape) for name, t in hf_to_ours(header_only, model)}
    except (KeyError, ValueError) as e:
        where = folder.where(asked[-1]) if asked else folder.folder
        raise ConvertError(f"{where}: {e.args[0]}; the weights do not match {CONFIG_JSON} (fix the config or "
                           "re-download the model)") from e
    not_float = [n for n in asked if not folder.meta(n).dtype.is_floating_point]
    if not_float:
        name = not_float[0]
        raise ConvertError(f"{folder.where(name)}: tensor {name!r} is {str(folder.meta(name).dtype)[6:]}, not a "
                           f"floating-point weight ({len(not_float)} such: {not_float[:4]}); model weights are float32, "
                           "bfloat16 or float16 and are never cast from integers or bools: the file is not these "
                           "weights or is damaged (re-download it)")
    known = set(hf_names(model)) | ({"lm_head.weight"} if model.tie_embeddings else set())
    extra = sorted(n for n in folder.files if n not in known and not n.endswith(_IGNORED))
    if extra:
        raise ConvertError(f"{folder.where(extra[0])}: tensors with no place in this {folder.config['model_type']} "
                           f"model: {extra[:6]}; the weights do not match {CONFIG_JSON}")
    return shapes


def _meta(step: int, layout: ParallelLayout, source: Optional[dict], **extra) -> dict:
    world = layout.tp * layout.sp * layout.pp * layout.dp if layout.dp else None
    return {"format": FORMAT, "version": VERSION, "step": step, "world_size": world,
            "layout": dataclasses.asdict(layout), "optimizer": False, "rng": False,
            "data": {"step": step, "loaders": {}}, "source": source, **extra}


# ----------------------------------------------------------------------------------------------- megalysses-to-hf

def megalysses_to_hf(ckpt: str, out: str, family: Optional[str] = None, dtype: Optional[str] = None,
                     max_shard_size: str = "5GB", quiet: bool = False, tokenizer: Optional[str] = None) -> Path:
    """Our checkpoint (any layout) -> an HF folder: config.json, generation_config.json, the tokenizer files, sharded
    safetensors, model.safetensors.index.json."""
    path, run, meta = _open_checkpoint(ckpt)
    model, source = run.model, meta.get("source") or {}
    family = family or source.get("family") or family_for(model)
    dtype = dtype or source.get("dtype") or "float32"
    try:
        config = hf_config_from_gpt(model, family)
    except ValueError as e:
        misfit = family in FAMILIES and not family_fits(model, family)
        raise ConvertError(f"{path / CONFIG}: {e}{'; pass --family with a family that fits' if misfit else ''}") from e
    extras = export_extras(path, source, model, tokenizer)
    config.update(torch_dtype=dtype, dtype=dtype, **extras.ids)
    reader = TensorReader(path)
    not_float = sorted(k for k in reader.entries if k.startswith("model.") and not reader.dtype(k).is_floating_point)
    if not_float:
        raise ConvertError(f"{path}: tensor {not_float[0]!r} is {str(reader.dtype(not_float[0]))[6:]}, not a "
                           f"floating-point weight ({len(not_float)} such); megalysses checkpoints hold float weights "
                           "and nothing is cast from integers or bools: the checkpoint is damaged or not ours")
    try:
        planned = [(n, tuple(t.shape), DTYPES[dtype]) for n, t in ours_to_hf(
            lambda name: torch.empty(reader.shape(model_key(name)), device="meta"), model)]
    except (KeyError, ValueError) as e:
        raise ConvertError(f"{path}: {e.args[0]}; the tensors do not match {path / CONFIG}") from e
    progress = Progress(len(planned), quiet)
    tensors = ((n, t.to(DTYPES[dtype])) for n, t in ours_to_hf(lambda name: reader.get(model_key(name)), model))

    def write(tmp: Path) -> None:
        write_shards(tmp, planned, tensors, parse_size(max_shard_size), progress)
        (tmp / CONFIG_JSON).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if extras.generation is not None:
            (tmp / GENERATION_CONFIG).write_text(json.dumps(extras.generation, indent=2, sort_keys=True) + "\n")
        copy_files(extras.folder, extras.files, tmp)

    done = into_new_folder(out, write)
    if not extras.files:
        print(f"megalysses-convert: warning: {done}: no tokenizer files written ({path} holds none and no --tokenizer "
              f"was given; config.json has the token ids {extras.ids or 'of the family defaults'}); copy them in "
              "or export again with --tokenizer <tokenizer folder or dataset prefix>", file=sys.stderr, flush=True)
    return done


@dataclasses.dataclass
class ExportExtras:
    """What an export writes besides the weights and the model geometry."""

    ids: dict
    """bos / eos / pad token ids for config.json (absent keys: the family's defaults)."""
    generation: Optional[dict]
    """generation_config.json's contents (None: not written)."""
    folder: Optional[Path]
    """Where the tokenizer files are copied from."""
    files: list[str]
    """The tokenizer files, relative to folder ([]: none written)."""


def export_extras(path: Path, source: dict, model: GPTConfig, tokenizer: Optional[str]) -> ExportExtras:
    """Tokenizer files from --tokenizer, else from the checkpoint's hf_extra/; ids and generation config as the
    checkpoint's source recorded them, else as the --tokenizer folder states them."""
    ids, generation = source.get("token_ids"), source.get("generation_config")
    folder, files = (path / HF_EXTRA, tokenizer_files(path / HF_EXTRA)) if tokenizer is None else (None, [])
    if tokenizer is not None:
        folder = tokenizer_folder(tokenizer)
        files = _checked_tokenizer(folder, tokenizer, model)
        own_generation = read_optional_json(folder / GENERATION_CONFIG)
        if ids is None:
            ids = token_ids(read_optional_json(folder / CONFIG_JSON) or {}, own_generation) or special_token_ids(folder)
        generation = own_generation if generation is None else generation
    ids = ids or {}
    if generation is None and any(v is not None for v in ids.values()):
        generation = {k: v for k, v in ids.items() if v is not None}
    return ExportExtras(ids, generation, folder, files)


def _checked_tokenizer(folder: Path, spec: str, model: GPTConfig) -> list[str]:
    """The tokenizer files of a --tokenizer folder, which must hold a tokenizer whose ids fit the model."""
    files = tokenizer_files(folder)
    if not files:
        raise ConvertError(f"--tokenizer {spec}: {folder} holds no tokenizer (none of {', '.join(TOKENIZER_FILES[:5])} "
                           "...); pass the folder the tokenizer was saved to (save_pretrained), or the prefix of a "
                           "dataset made with it")
    largest = largest_token_id(folder)
    if largest is not None and largest >= model.vocab_size:
        raise ConvertError(f"--tokenizer {spec}: {folder / 'tokenizer.json'} has token ids up to {largest}, the "
                           f"model's vocab_size is {model.vocab_size}: it is not this model's tokenizer; pass the one "
                           "its training data was made with")
    return files


def tokenizer_folder(spec: str) -> Path:
    """The folder a --tokenizer names: a folder, a tokenizer file's folder, or the tokenizer a dataset records."""
    path = Path(spec)
    if path.is_dir():
        return path
    if path.is_file() and path.name in TOKENIZER_FILES:
        return path.parent
    meta_path = dataset_paths(resolve_prefix(spec))["json"]
    if not meta_path.is_file():
        raise ConvertError(f"--tokenizer {spec}: no such folder, tokenizer file or dataset (no {meta_path}); pass "
                           "a tokenizer folder (save_pretrained) or the prefix of a dataset made with it")
    meta = read_json(meta_path, "the dataset is incomplete: preprocess it again")
    recorded = meta.get("tokenizer")
    if recorded in (None, "byte"):
        raise ConvertError(f"--tokenizer {spec}: {meta_path} was made with the byte-level tokenizer ({recorded!r}), "
                           "which has no tokenizer files; pass a tokenizer folder instead")
    found = next((p for p in (Path(recorded), meta_path.parent / recorded) if p.exists()), None)
    if found is None:
        raise ConvertError(f"--tokenizer {spec}: {meta_path} records tokenizer {recorded!r}, which is not there "
                           "(relative to here or to the dataset); pass that tokenizer's folder instead")
    file = found / "tokenizer.json" if found.is_dir() else found
    if meta.get("tokenizer_sha256") and file.is_file() and file_sha256(file) != meta["tokenizer_sha256"]:
        raise ConvertError(f"--tokenizer {spec}: {file} changed since {meta_path} was made with it (SHA-256 differs); "
                           "pass the tokenizer folder the data was made with")
    return found if found.is_dir() else found.parent


def _open_checkpoint(ckpt: str) -> tuple[Path, RunConfig, dict]:
    """A validated checkpoint folder (a folder of them: the newest), its run config and meta."""
    path = resolve(ckpt)
    verify(path)
    return path, load_run_config(path / CONFIG), read_json(path / META, "the checkpoint is incomplete")


# -------------------------------------------------------------------------------------------------------- reshard

def reshard(ckpt: str, out: str, layout_name: str, world_size: Optional[int] = None, quiet: bool = False) -> Path:
    """Our checkpoint -> a copy for another layout: the layout is checked against the model and recorded; tensors
    (already full and layout-independent) are streamed across; per-rank RNG states go along when the world size
    stays the same."""
    path, run, meta = _open_checkpoint(ckpt)
    layout = target_layout(layout_name, run.model, world_size)
    reader = TensorReader(path)
    specs = [(k, reader.shape(k), reader.dtype(k)) for k in sorted(reader.entries)]
    progress = Progress(len(specs), quiet)
    new_meta = {**_meta(meta["step"], layout, meta.get("source")),
                **{k: meta[k] for k in ("optimizer", "data") if k in meta}}
    keep_rng = bool(meta.get("rng")) and new_meta["world_size"] == meta.get("world_size")
    new_meta["rng"] = keep_rng

    def get(key: str) -> torch.Tensor:
        progress(key)
        return reader.get(key)

    def write(tmp: Path) -> None:
        save_streaming(tmp, specs, get)
        if keep_rng:
            shutil.copytree(path / "rng", tmp / "rng")
        if (path / HF_EXTRA).is_dir():
            shutil.copytree(path / HF_EXTRA, tmp / HF_EXTRA)
        finish_checkpoint(tmp, dataclasses.replace(run, layout=layout), new_meta)

    return into_new_folder(out, write)


# -------------------------------------------------------------------------------------------------------- inspect

def inspect(target: str) -> tuple[str, Optional[str]]:
    """A readable summary (validity, step, layout, model config, every tensor's name, shape and dtype) and what is
    wrong with the checkpoint (None: valid); an invalid one's tensor index is not read (nothing is unpickled before
    the files match the manifest)."""
    path = Path(target)
    if (path / CONFIG_JSON).is_file() and not is_checkpoint(path):
        return _inspect_hf(path), None
    path = resolve(path)
    _, problem = first_problem(path)
    meta = read_json(path / META, "the checkpoint is incomplete")
    run = load_run_config(path / CONFIG)
    reader = TensorReader(path) if problem is None else None
    lines = [f"checkpoint  {path}", f"status      {'valid' if problem is None else 'INVALID: ' + problem}",
             f"step        {meta.get('step')}", f"saved on    {meta.get('world_size') or 'any number of'} ranks",
             f"layout      {_short(meta.get('layout') or {})}",
             f"optimizer   {'AdamW state' if meta.get('optimizer') else 'none (weights only)'}",
             f"source      {meta.get('source')}"]
    if reader is not None:
        lines.append(f"parameters  {sum(_numel(reader.shape(k)) for k in reader.entries if k.startswith('model.')):,}")
    lines.append("model:")
    lines += [f"  {k}: {v}" for k, v in dataclasses.asdict(run.model).items()]
    if reader is None:
        lines.append("tensors: not read (the checkpoint failed validation; its tensor index is not trusted)")
        return "\n".join(lines), problem
    lines.append(f"tensors ({len(reader.entries)}):")
    lines += [f"  {k}  {list(reader.shape(k))}  {str(reader.dtype(k)).replace('torch.', '')}"
              for k in sorted(reader.entries)]
    return "\n".join(lines), None


def _inspect_hf(path: Path) -> str:
    folder = HFFolder(path)
    lines = [f"Hugging Face folder  {path}", f"model_type  {folder.config.get('model_type')}", "config:"]
    lines += [f"  {k}: {v}" for k, v in sorted(folder.config.items())]
    lines.append(f"tensors ({len(folder.files)}):")
    for name in sorted(folder.files):
        t = folder.meta(name)
        dtype = str(t.dtype).replace("torch.", "")
        lines.append(f"  {name}  {list(t.shape)}  {dtype}  ({folder.where(name).name})")
    return "\n".join(lines)


def _short(layout: dict) -> str:
    keys = ("tp", "sp", "ring", "pp", "dp", "vpp", "zero", "tp_sequence_parallel")
    return " ".join(f"{k}={layout.get(k)}" for k in keys if k in layout)


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# ------------------------------------------------------------------------------------------------------------ CLI

def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="megalysses-convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("hf-to-megalysses", help="HF folder (config.json + safetensors) -> our checkpoint")
    p.add_argument("hf_dir")
    p.add_argument("out")
    p.add_argument("--layout", default="single",
                   help="target layout: bundled name, YAML file or inline '{tp: 2, sp: 2}' (default: single)")
    p.add_argument("--world-size", type=int, help="check the layout against this many ranks too")
    p = sub.add_parser("megalysses-to-hf", help="our checkpoint (any layout) -> HF folder")
    p.add_argument("ckpt", help="a checkpoint folder, or a folder of them (the newest is used)")
    p.add_argument("out")
    p.add_argument("--family", choices=sorted(FAMILIES), help="default: the source family, else llama (qwen2 with "
                   "a q/k/v bias)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: the source dtype, else float32")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    p.add_argument("--tokenizer", help="copy the tokenizer files from this folder, or from the tokenizer a dataset "
                   "prefix records (default: those the checkpoint holds from its conversion)")
    p = sub.add_parser("reshard", help="our checkpoint -> a copy for another layout")
    p.add_argument("ckpt")
    p.add_argument("out")
    p.add_argument("--layout", required=True, help="target layout: bundled name, YAML file or inline mapping")
    p.add_argument("--world-size", type=int, help="check the layout against this many ranks too")
    p = sub.add_parser("inspect", help="print config, layout, step and tensors of a checkpoint or HF folder")
    p.add_argument("ckpt")
    for p in sub.choices.values():
        p.add_argument("--quiet", action="store_true", help="no progress lines")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        if args.command == "hf-to-megalysses":
            done = hf_to_megalysses(args.hf_dir, args.out, args.layout, args.world_size, args.quiet)
        elif args.command == "megalysses-to-hf":
            done = megalysses_to_hf(args.ckpt, args.out, args.family, args.dtype, args.max_shard_size, args.quiet,
                                    args.tokenizer)
        elif args.command == "reshard":
            done = reshard(args.ckpt, args.out, args.layout, args.world_size, args.quiet)
        else:
            summary, problem = inspect(args.ckpt)
            print(summary)
            if problem:
                print(f"megalysses-convert: error: invalid checkpoint: {problem}", file=sys.stderr)
            return 1 if problem else 0
    except (ConvertError, CheckpointError, HFFolderError, ConfigError, OSError) as err:
        print(f"megalysses-convert: error: {err}", file=sys.stderr)
        return 2
    print(f"megalysses-convert: wrote {done}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
