"""A checkpoint's tensors in torch.distributed.checkpoint (DCP) files: written by every rank at once (each its own
keys), or streamed by one process one tensor at a time; read a few named full tensors at a time by any process."""
from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Callable, Iterator, Mapping, Optional, Sequence

import torch

from .files import CheckpointError
from .unpickle import DCP_GLOBALS, restricted_loads

_NO_DIST = "torch.distributed is disabled, unavailable or uninitialized"


@contextlib.contextmanager
def _quiet_single_process() -> Iterator[None]:
    """DCP warns on every single-process call; that is what we mean."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_NO_DIST)
        yield


def save_on_every_rank(folder: Path | str, tensors: Mapping[str, torch.Tensor]) -> None:
    """Collective over the default group: each rank writes its own keys (one file per rank) and rank 0 the DCP
    metadata. Keys must be unique across ranks (the caller assigns each tensor one writer)."""
    import torch.distributed.checkpoint as dcp

    with _quiet_single_process():  # one process without a process group: DCP warns, and that is what we mean
        dcp.save(dict(tensors), storage_writer=dcp.FileSystemWriter(str(folder)))


def save_streaming(folder: Path | str, specs: Sequence[tuple[str, tuple[int, ...], torch.dtype]],
                   get: Callable[[str], torch.Tensor]) -> None:
    """One process, no process group: write every (key, shape, dtype) of specs, calling get(key) for each tensor only
    when its turn comes (one file per tensor, so no more than one tensor is held at once)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

    class StreamingPlanner(DefaultSavePlanner):
        """Plans from meta tensors (shapes and dtypes only); the data comes from get() at write time."""

        def resolve_data(self, write_item):
            key = write_item.index.fqn
            t = get(key)
            if tuple(t.shape) != tuple(shapes[key][0]) or t.dtype != shapes[key][1]:
                raise CheckpointError(f"tensor {key!r}: got {tuple(t.shape)} {t.dtype}, planned "
                                      f"{tuple(shapes[key][0])} {shapes[key][1]}")
            return t.detach().contiguous()

    shapes = {key: (tuple(shape), dtype) for key, shape, dtype in specs}
    plan = {key: torch.empty(shape, dtype=dtype, device="meta") for key, shape, dtype in specs}
    writer = dcp.FileSystemWriter(str(folder), single_file_per_rank=False)
    with _quiet_single_process():
        dcp.save(plan, storage_writer=writer, planner=StreamingPlanner(), no_dist=True)


def read_dcp_metadata(folder: Path | str):
    """The DCP index of a checkpoint folder, unpickled with only DCP's metadata classes admitted, its data files
    checked to be plain names inside the folder."""
    from torch.distributed.checkpoint.metadata import Metadata

    path = Path(folder) / ".metadata"
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{path}: unreadable ({e}); the checkpoint is damaged") from e
    metadata = restricted_loads(data, path, DCP_GLOBALS)
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{path}: holds a {type(metadata).__name__}, not a torch.distributed.checkpoint "
                              "Metadata; the checkpoint is damaged or foreign")
    for info in (metadata.storage_data or {}).values():
        name = getattr(info, "relative_path", None)
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            raise CheckpointError(f"{path}: names data file {name!r}, which is not a file name inside "
                                  f"{Path(folder)}; the checkpoint is crafted or damaged: do not use it")
    return metadata


class TensorReader:
    """Named full tensors of a checkpoint folder, read on demand (any process, with or without a process group)."""

    def __init__(self, folder: Path | str):
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.folder = Path(folder)
        if not (self.folder / ".metadata").is_file():
            raise CheckpointError(f"{self.folder / '.metadata'}: missing; the checkpoint's tensor index was never "
                                  "written (an interrupted save); resume from an earlier checkpoint")
        metadata = read_dcp_metadata(self.folder)  # never DCP's own read_metadata: it is a plain pickle.load
        self._reader = FileSystemReader(str(self.folder))
        self._reader.read_metadata = lambda *a, **k: metadata  # parsed once, not once per read()
        self.entries: dict[str, tuple[tuple[int, ...], torch.dtype]] = {
            key: (tuple(m.size), m.properties.dtype) for key, m in metadata.state_dict_metadata.items()
            if isinstance(m, TensorStorageMetadata)}

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entry(key)[0]

    def dtype(self, key: str) -> torch.dtype:
        return self._entry(key)[1]

    def _entry(self, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        if key not in self.entries:
            raise CheckpointError(f"{self.folder}: holds no tensor {key!r} ({len(self.entries)} tensors; list them "
                                  "with megalysses-convert inspect)")
        return self.entries[key]

    def expect(self, key: str, shape: Sequence[int]) -> None:
        """Raise CheckpointError when the stored tensor does not have this full shape."""
        if self.shape(key) != tuple(shape):
            raise CheckpointError(f"{self.folder}: tensor {key!r} has shape {self.shape(key)} but the model needs "
                                  f"{tuple(shape)}: the checkpoint holds another model geometry; use the model "
                                  f"config saved with it ({self.folder / 'config.yaml'})")

    def read(self, keys: Sequence[str], dtype: Optional[torch.dtype] = None) -> dict[str, torch.Tensor]:
        """The named full tensors (as stored, or cast to dtype); reads only their bytes."""
        import torch.distributed.checkpoint as dcp

        out = {k: torch.empty(self.shape(k), dtype=self.dtype(k)) for k in keys}
        if out:
            with _quiet_single_process():
                dcp.load(out, storage_reader=self._reader, no_dist=True)
        return {k: v if dtype is None else v.to(dtype) for k, v in out.items()}

    def get(self, key: str) -> torch.Tensor:
        return self.read([key])[key]
