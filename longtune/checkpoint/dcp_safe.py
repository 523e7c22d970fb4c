"""Reading torch.distributed.checkpoint (DCP) checkpoints without running code from them.

DCP stores a checkpoint's index, ``.metadata``, as a Python pickle, and non-tensor values
(optimizer hyper-parameters, the scheduler's step) inside the ``.distcp`` shards as
``torch.load(weights_only=False)`` pickles. Unpickling a crafted file runs any code it names.
This module closes both doors:

- :func:`read_metadata` unpickles ``.metadata`` with a restricted unpickler that resolves only
  the DCP metadata classes and the few torch / pathlib types they hold (:data:`ALLOWED`);
  anything else raises :class:`UnsafeCheckpointError` before it is imported or called;
- :class:`SafeReader` is a ``FileSystemReader`` whose metadata comes from :func:`read_metadata`,
  and :class:`SafePlanner` a ``DefaultLoadPlanner`` whose non-tensor values are read with
  ``torch.load(weights_only=True)``. ``dcp.load`` with both never unpickles anything unrestricted
  (tensors are already read with ``weights_only=True`` by DCP itself).
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem

METADATA_FILE = ".metadata"

#: module -> names a DCP ``.metadata`` pickle may refer to (torch 2.11 - 2.14). Each is a plain
#: data class, an enum, a path, ``torch.Size`` or a function that maps a name to a layout.
ALLOWED: dict[str, frozenset[str]] = {
    "torch.distributed.checkpoint.metadata": frozenset(
        {
            "Metadata",
            "MetadataIndex",
            "StorageMeta",
            "TensorProperties",
            "TensorStorageMetadata",
            "ChunkStorageMetadata",
            "BytesStorageMetadata",
            "_MEM_FORMAT_ENCODING",
        }
    ),
    "torch.distributed.checkpoint.filesystem": frozenset({"_StorageInfo", "_StoragePrefix"}),
    "torch.serialization": frozenset({"_get_layout"}),
    "torch": frozenset({"Size"}),
    "pathlib": frozenset({"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath", "Path"}),
    "collections": frozenset({"OrderedDict"}),
    "builtins": frozenset({"set", "frozenset", "slice"}),
}


class UnsafeCheckpointError(ValueError):
    """A checkpoint file refers to code that a DCP checkpoint never holds (possibly crafted)."""


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, where: str) -> None:
        super().__init__(file)
        self.where = where

    def find_class(self, module: str, name: str) -> Any:
        if name in ALLOWED.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)  # torch.float32, torch.bfloat16, ...
        raise UnsafeCheckpointError(
            f"{self.where} refers to {module}.{name}, which DCP checkpoint metadata never holds; "
            "refusing to load it (it may have been crafted to run code) — delete it or use a "
            "checkpoint you wrote yourself"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeCheckpointError(f"{self.where} holds a persistent id; refusing to load it")


def read_metadata(path: str | Path) -> Metadata:
    """Unpickle a DCP ``.metadata`` file, allowing only the classes in :data:`ALLOWED`.

    Args:
        path: the checkpoint folder or its ``.metadata`` file.

    Returns:
        The DCP ``Metadata``.

    Raises:
        UnsafeCheckpointError: the pickle names anything else (nothing of it was run).
        ValueError: the file is not a DCP metadata pickle (truncated, corrupted, another type).
    """
    path = Path(path)
    file = path / METADATA_FILE if path.is_dir() else path
    data = file.read_bytes()
    try:
        metadata = _RestrictedUnpickler(io.BytesIO(data), str(file)).load()
    except UnsafeCheckpointError:
        raise
    except Exception as exc:  # a truncated or corrupted pickle fails in many ways
        raise ValueError(f"{file} is not readable DCP metadata ({type(exc).__name__})") from None
    if not isinstance(metadata, Metadata):
        raise ValueError(f"{file} holds a {type(metadata).__name__}, not DCP metadata")
    return metadata


class SafeReader(FileSystemReader):
    """``FileSystemReader`` whose ``.metadata`` is read by :func:`read_metadata`."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        metadata = read_metadata(self._get_metadata_path(kwargs.get("rank")))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafePlanner(DefaultLoadPlanner):
    """``DefaultLoadPlanner`` that reads non-tensor values with ``weights_only=True``."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as exc:
            raise UnsafeCheckpointError(
                f"checkpoint value {read_item.dest_index.fqn!r} is not plain data; refusing to "
                f"load it ({str(exc).splitlines()[0]})"
            ) from None
        # Hand the parent a pickle of what weights_only accepted (plain data and tensors only),
        # so it stores the value where it belongs without our reimplementing its bookkeeping.
        plain = io.BytesIO()
        torch.save(obj, plain)
        plain.seek(0)
        super().load_bytes(read_item, plain)
