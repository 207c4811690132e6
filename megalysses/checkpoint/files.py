"""Checkpoint folders on disk: atomic commit (temporary folder -> manifest -> rename -> `latest`), a SHA-256 per
file, validation that names the bad file, and keep-last-K retention. Plain files only: no torch.distributed here."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import zlib
from pathlib import Path
from typing import Any, Optional, Sequence

FORMAT, VERSION = "megalysses-checkpoint", 2
"""Version 2: the manifest records a SHA-256 per file (version 1 recorded CRC32s; still read, with a warning)."""
MANIFEST, META, CONFIG, LATEST = "manifest.json", "meta.json", "config.yaml", "latest"
PARTS = ".parts"
"""Per-rank partial manifests while a save hashes its files (merged into manifest.json, then removed)."""
_STEP_DIR = re.compile(r"step-(\d+)")
_BLOCK = 16 * 2**20


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, partial, corrupted or does not fit the model: names the folder/file and the fix."""


def step_dir_name(step: int) -> str:
    return f"step-{step}"


def temp_dir_name(step: int) -> str:
    return f".tmp-step-{step}"


def list_checkpoints(root: Path | str) -> list[tuple[int, Path]]:
    """(step, folder) of every committed `step-N` folder under root, oldest first (temporary folders never count)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.fullmatch(p.name))]
    return sorted(found)


def is_checkpoint(folder: Path | str) -> bool:
    """Whether folder looks like one checkpoint (rather than a folder of them)."""
    folder = Path(folder)
    return (folder / MANIFEST).exists() or (folder / META).exists() or (folder / ".metadata").exists()


# ------------------------------------------------------------------------------------------------ small files

def fsync_dir(folder: Path | str) -> None:
    """Make a rename or a new file inside folder durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text_atomic(path: Path | str, text: str) -> None:
    """Write through a temporary sibling + fsync + os.replace: readers see the old file or the whole new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_json(path: Path | str, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=1, sort_keys=True) + "\n")


def read_json(path: Path | str, what: str) -> dict:
    """A JSON file of a checkpoint; CheckpointError naming it when absent or unreadable."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file; {what}") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable ({e}); {what}") from e


# --------------------------------------------------------------------------------------------- manifest, checks

def file_sha256(path: Path | str) -> str:
    """Hex SHA-256 of a file, read in blocks (never the whole file in memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def file_crc32(path: Path | str) -> str:
    """CRC32 of a file as 8 hex digits: what version-1 manifests recorded."""
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            crc = zlib.crc32(block, crc)
    return f"{crc:08x}"


_WARNED_CRC32: set[str] = set()


def _warn_crc32(folder: Path) -> None:
    """Once per folder: a version-1 manifest is checked by CRC32, which catches damage but not deliberate edits."""
    if str(folder) not in _WARNED_CRC32:
        _WARNED_CRC32.add(str(folder))
        print(f"warning: {folder / MANIFEST} records CRC32s (checkpoint format version 1): damage and truncation are "
              "detected, deliberate edits are not; rewrite it with SHA-256 by resuming and saving, or with "
              "megalysses-convert reshard", file=sys.stderr, flush=True)


def payload_files(folder: Path | str) -> list[str]:
    """Every file under folder (posix relative paths, sorted) except the manifest and the partial manifests."""
    folder = Path(folder)
    names = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
    return sorted(n for n in names if n != MANIFEST and not n.startswith(PARTS + "/"))


def describe_files(folder: Path | str, names: Sequence[str]) -> dict[str, dict]:
    """{name: {'bytes', 'sha256'}} for the named files of folder."""
    folder = Path(folder)
    return {n: {"bytes": (folder / n).stat().st_size, "sha256": file_sha256(folder / n)} for n in names}


def write_manifest(folder: Path | str, files: dict[str, dict], step: int) -> None:
    """The manifest, written last: what a complete checkpoint holds, byte counts and SHA-256s."""
    write_json(Path(folder) / MANIFEST, {"format": FORMAT, "version": VERSION, "step": step, "files": files})


def read_manifest(folder: Path | str) -> dict:
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such checkpoint folder")
    manifest = read_json(folder / MANIFEST, "the checkpoint is partial (its save did not finish) or damaged; "
                         "resume from an earlier one")
    if manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"{folder / MANIFEST}: not a {FORMAT} manifest")
    if manifest.get("version", 0) > VERSION:
        raise CheckpointError(f"{folder / MANIFEST}: format version {manifest['version']} is newer than this "
                              f"megalysses reads ({VERSION}); upgrade megalysses")
    return manifest


def check_file(folder: Path, name: str, entry: dict) -> Optional[str]:
    """What is wrong with one listed file (missing, truncated, corrupted), or None."""
    path = folder / name
    if not path.is_file():
        return f"{path}: missing (listed in {MANIFEST})"
    size = path.stat().st_size
    if size != entry.get("bytes"):
        return f"{path}: {size} bytes, the manifest records {entry.get('bytes')} (truncated or overwritten)"
    if "sha256" in entry:
        digest = file_sha256(path)
        if digest != entry["sha256"]:
            return f"{path}: SHA-256 {digest} differs from the manifest's {entry['sha256']} (corrupted or modified)"
        return None
    if "crc32" in entry:  # version 1: still readable (refusing would strand every older run's checkpoints)
        _warn_crc32(folder)
        digest = file_crc32(path)
        if digest != entry["crc32"]:
            return f"{path}: CRC32 {digest} differs from the manifest's {entry['crc32']} (corrupted)"
        return None
    return f"{path}: the manifest records no sha256 for it ({MANIFEST} damaged); resume from an earlier checkpoint"


def first_problem(folder: Path | str, part: tuple[int, int] = (0, 1)) -> tuple[int, Optional[str]]:
    """(index, message) of the first bad file among this part's share (files i with i % world == rank) of the
    manifest's sorted list; index -1 when the manifest itself is bad, len(files) with None when all are good."""
    folder = Path(folder)
    try:
        files = read_manifest(folder)["files"]
    except CheckpointError as e:
        return -1, str(e)
    names = sorted(files)
    rank, world = part
    for i in range(rank, len(names), world):
        problem = check_file(folder, names[i], files[names[i]])
        if problem:
            return i, problem
    return len(names), None


def problem_at(folder: Path | str, index: int) -> str:
    """The message for a problem first_problem reported at `index` (on whichever rank found it)."""
    folder = Path(folder)
    if index < 0:
        return first_problem(folder)[1] or f"{folder}: unreadable manifest"
    files = read_manifest(folder)["files"]
    name = sorted(files)[index]
    return check_file(folder, name, files[name]) or f"{folder / name}: failed validation"


def verify(folder: Path | str) -> dict:
    """Check every file against the manifest; returns the manifest, raises CheckpointError naming the bad file."""
    index, problem = first_problem(folder)
    if problem:
        raise CheckpointError(f"invalid checkpoint: {problem}")
    return read_manifest(folder)


# ---------------------------------------------------------------------------------------------- commit, retention

def remove_stale_temps(root: Path | str) -> None:
    """Delete `.tmp-step-*` / `.old-step-*` folders that a crashed save left behind."""
    root = Path(root)
    if root.is_dir():
        for p in root.iterdir():
            if p.is_dir() and (p.name.startswith(".tmp-step-") or p.name.startswith(".old-step-")):
                shutil.rmtree(p, ignore_errors=True)


def commit(tmp: Path | str, final: Path | str) -> None:
    """Atomically publish a validated temporary folder under its final name (an older folder of that name is moved
    aside first and deleted after)."""
    tmp, final = Path(tmp), Path(final)
    old = final.with_name(".old-" + final.name)
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def write_latest(root: Path | str, folder: Path | str) -> None:
    """Point `latest` at a committed checkpoint folder (its name, on one line); written after the folder."""
    write_text_atomic(Path(root) / LATEST, Path(folder).name + "\n")


def prune(root: Path | str, keep_last: int) -> list[Path]:
    """Delete all but the newest keep_last committed checkpoints (0 keeps all); returns what was deleted."""
    if keep_last <= 0:
        return []
    doomed = [p for _, p in list_checkpoints(root)[:-keep_last]]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed


def resolve(path: Path | str) -> Path:
    """A checkpoint folder from a path that is one, or a folder of them (its newest committed checkpoint)."""
    path = Path(path)
    if is_checkpoint(path):
        return path
    found = list_checkpoints(path)
    if not found:
        raise CheckpointError(f"{path}: neither a checkpoint (no {MANIFEST}) nor a folder holding step-N checkpoints")
    return found[-1][1]
