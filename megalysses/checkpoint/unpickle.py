"""Unpickling without running a file's code: an Unpickler that admits only named globals (the records a DCP index or
Transformer Engine's FP8 state are made of), so a crafted checkpoint cannot call os.system or open a file."""
from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from .files import CheckpointError


def _storage_from_bytes(data: bytes):
    """What torch.storage._load_from_bytes does, without its weights_only=False: a storage inside a pickled tensor."""
    return torch.load(io.BytesIO(data), weights_only=True)


DCP_GLOBALS: Mapping[str, set[str]] = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "MetadataIndex", "StorageMeta", "TensorProperties",
                                              "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
                                              "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},  # torch.layout pickles as _get_layout('torch.strided'): a dict lookup
    "torch": {"Size"},
    "pathlib": {"Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"},  # StorageMeta.checkpoint_id
    "collections": {"OrderedDict"},
}
"""The globals of a torch.distributed.checkpoint `.metadata` pickle (listed from real saves): records whose
constructors only store their arguments. Torch dtypes (`torch.float32`, ...) are admitted besides."""

TE_STATE_GLOBALS: Mapping[str, set[str]] = {
    "torch._utils": {"_rebuild_tensor_v2"},
    "torch.storage": {"_load_from_bytes"},  # replaced by _storage_from_bytes (torch's own is weights_only=False)
    "torch": {"Size"},
    "collections": {"OrderedDict"},
    "transformer_engine.common.recipe": {"*"},  # FP8 recipes: dataclasses, enums and named tuples only
}
"""The globals of Transformer Engine's pickled FP8 state (recipe, scales, amax history); a tensor's storage inside it
is read with torch.load(weights_only=True)."""

_REPLACED: Mapping[tuple[str, str], Callable] = {("torch.storage", "_load_from_bytes"): _storage_from_bytes}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles admitting only `allowed` globals ({module: {names}}, '*' for every class of a module) and torch
    dtypes; any other global raises CheckpointError naming the file and the refused global."""

    def __init__(self, file, path: Path | str, allowed: Mapping[str, set[str]]):
        super().__init__(file)
        self.path, self.allowed = path, allowed

    def find_class(self, module: str, name: str) -> Any:
        names = self.allowed.get(module, ())
        if name in names:
            return _REPLACED.get((module, name)) or super().find_class(module, name)
        if "*" in names and isinstance(found := super().find_class(module, name), type):
            return found
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise CheckpointError(f"{self.path}: refers to {module}.{name}, a global this file never holds when written "
                              "by torch and megalysses (only checkpoint records, tensors and dtypes are loaded): it is "
                              "crafted or foreign; do not use it")


def restricted_loads(data: bytes, where: Path | str, allowed: Mapping[str, set[str]]) -> Any:
    """pickle.loads admitting only `allowed` globals; any failure is a one-line CheckpointError naming `where`."""
    try:
        return RestrictedUnpickler(io.BytesIO(data), where, allowed).load()
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - a damaged pickle raises anything
        raise CheckpointError(f"{where}: unreadable ({type(e).__name__}: {e}); the checkpoint is damaged") from e


def sanitized_te_state(blob: Any, where: str) -> Any:
    """Transformer Engine's extra state is a uint8 tensor of pickled bytes that its set_extra_state hands to
    pickle.loads: unpickle it here with TE_STATE_GLOBALS only and return a fresh pickle of what came out (a
    crafted blob raises CheckpointError instead of reaching TE). Anything else passes as it is."""
    if not isinstance(blob, torch.Tensor) or blob.dtype != torch.uint8 or blob.numel() == 0:
        return blob
    state = restricted_loads(blob.detach().cpu().numpy().tobytes(), where, TE_STATE_GLOBALS)
    return torch.frombuffer(bytearray(pickle.dumps(state)), dtype=torch.uint8)
