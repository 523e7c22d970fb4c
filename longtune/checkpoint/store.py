"""Writing and reading one training checkpoint: model and optimizer through DCP, and the
registered states of every rank.

Layout of ``ROOT/step-N/``::

    .metadata, __<rank>_0.distcp   model + optimizer state, written by torch.distributed.checkpoint
                                   (DCP): each rank writes its own shards, any world size can load
    rank-<r>.pt                    per rank: ``{"step", "rank", "world_size", "states"}``, the
                                   ``state_dict()`` of every registered state (the trainer's
                                   counters and RNG, the data position, the LR schedule)
    COMPLETE                       the manifest (see :mod:`longtune.checkpoint.manifest`)

Protocol (why no crash leaves something that looks complete but is not):

1. rank 0 creates ``step-N.tmp-<pid>``; every rank writes its files there and fsyncs them
   (DCP fsyncs its shards and ``.metadata``), then computes the CRC32 of the files it wrote
   (rank 0 gathers them).
2. rank 0 writes and fsyncs ``COMPLETE`` inside the tmp folder, fsyncs it, then renames it to
   ``step-N`` and fsyncs the parent. The rename is the commit: before it only a ``*.tmp-*``
   folder exists (never considered), after it a complete ``step-N`` exists.
3. Only then are older checkpoints pruned to ``keep_last``, each first renamed to
   ``step-K.trash-<pid>`` (so a half-deleted one never looks like a checkpoint), and stale
   tmp/trash folders of killed runs are removed.

A write that fails on I/O (disk full, read-only) removes the tmp folder and raises one line on
every rank (:class:`~longtune.fsutil.OutputDirError`); complete checkpoints are never touched.
Reading goes through :mod:`~longtune.checkpoint.dcp_safe`'s allowlist (``weights_only`` for
the rank files), and a checkpoint whose model tensors have other names or shapes than the model
it is loaded into is refused ("checkpoint ... is for a different model").

A model with frozen parameters (LoRA: the base model) checkpoints its trainable ones only: the
frozen ones are read from the base model's own folder, so an 8B model's LoRA checkpoint holds
megabytes of adapters and their optimizer state.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import re
import shutil
import warnings
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import MetadataIndex, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from longtune.checkpoint.dcp_safe import (
    SafePlanner,
    SafeReader,
    UnsafeCheckpointError,
    read_metadata,
)
from longtune.checkpoint.manifest import (
    checkpoint_info,
    crc32,
    fsync_dir,
    prune,
    remove_dir,
    verify,
    write_durable,
    write_manifest,
)
from longtune.fsutil import OutputDirError, describe_os_error, probe_write

logger = logging.getLogger(__name__)


class Stateful(Protocol):
    """What a registered state provides (``torch.distributed.checkpoint.stateful.Stateful``)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> None: ...


class CheckpointLoadError(ValueError):
    """A complete checkpoint whose values cannot be loaded (one line: the checkpoint, the first
    failure, what to do)."""


def _dist_state() -> tuple[bool, int, int]:
    """(process group initialized, rank, world size)."""
    if dist.is_available() and dist.is_initialized():
        return True, dist.get_rank(), dist.get_world_size()
    return False, 0, 1


@contextmanager
def _quiet_single_process() -> Iterator[None]:
    """Silence DCP's "assuming the intent is to save/load in a single process" warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _options(model: nn.Module) -> StateDictOptions:
    """What a checkpoint of ``model`` holds: every parameter, or, when some are frozen, the
    trainable ones only (loaded non-strictly: the frozen ones come from the base model)."""
    frozen = any(not p.requires_grad for p in model.parameters())
    return StateDictOptions(ignore_frozen_params=frozen, strict=not frozen)


def _without_frozen(model: nn.Module, state: dict[str, Any]) -> dict[str, Any]:
    """``state`` without any frozen parameter. ``ignore_frozen_params`` misses the second name
    of a tied one (``output.weight`` when it is the embedding): dropped here by every name."""
    frozen = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if not p.requires_grad:
            for part in ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module."):
                name = name.replace(part, "")
            frozen.add(name)
    return {k: v for k, v in state.items() if k not in frozen}


def _model_state(model: nn.Module) -> dict[str, Any]:
    options = _options(model)
    return _without_frozen(model, get_model_state_dict(model, options=options))


def _app_state(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """DCP-ready state: plain or FSDP2-sharded (DTensor) model and optimizer state dicts."""
    options = _options(model)
    if optimizer is None:
        return {"model": _model_state(model)}
    model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
    return {"model": _without_frozen(model, model_sd), "optim": optim_sd}


def _rank_file(path: Path, rank: int) -> Path:
    return path / f"rank-{rank}.pt"


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def save_checkpoint(
    root: str | Path,
    step: int,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    states: Mapping[str, Stateful],
    keep_last: int,
) -> Path:
    """Atomically write ``root/step-{step}`` and prune older checkpoints.

    Call on every rank (collective when a process group is initialized). Model and optimizer
    state go through DCP, so FSDP2-sharded models write only their local shards.

    Args:
        root: the checkpoints folder (shared by all ranks; a shared filesystem across nodes).
        step: the optimizer step the state corresponds to.
        model: the model (plain or FSDP2 ``fully_shard``-ed).
        optimizer: its optimizer, or None to save only the model.
        states: this rank's registered states by name; each ``state_dict()`` must hold only
            tensors, numbers, strings, None and lists/tuples/dicts of them (it is read back
            with ``weights_only=True``).
        keep_last: complete checkpoints to keep after this one is written (>= 1).

    Returns:
        The checkpoint folder. If a complete checkpoint of this step already exists it is left
        untouched (a warning is logged) and returned.

    Raises:
        OutputDirError: the write failed on I/O on some rank (one line, on every rank).
    """
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    initialized, rank, world = _dist_state()
    root = Path(root)
    final = root / f"step-{step}"
    tmp = _start_write(root, final, rank, initialized)
    if tmp is None:
        return final
    try:
        _write_rank_files(tmp, step, model, optimizer, states)
        mine = {"crc": _own_crcs(tmp, rank), "error": None}
    except (OSError, CheckpointException) as exc:
        mine = {"crc": {}, "error": _write_failure(exc, tmp)}
    results = [mine]
    if initialized:
        results = [None] * world
        dist.all_gather_object(results, mine)
    errors = [r["error"] for r in results if r["error"]]
    if errors:
        if rank == 0:  # free the space; the complete checkpoints were never touched
            shutil.rmtree(tmp, ignore_errors=True)
        if initialized:
            dist.barrier()
        raise OutputDirError(errors[0])
    outcome: list[str | None] = [None]
    if rank == 0:
        crcs = {name: crc for r in results for name, crc in r["crc"].items()}
        outcome = [_commit(tmp, final, step, world, crcs, keep_last)]
    if initialized:
        dist.broadcast_object_list(outcome, src=0)
    if outcome[0] is not None:
        raise OutputDirError(outcome[0])
    return final


def _start_write(root: Path, final: Path, rank: int, initialized: bool) -> Path | None:
    """Rank 0 makes the tmp folder, unless a complete checkpoint of this step exists (None).

    Whatever fails on rank 0 alone is sent to every rank, so that all of them raise the same
    one-line error instead of the others waiting for rank 0 until the collective timeout.
    """
    decision: list[Any] = [None, False, None]
    if rank == 0:
        tmp = root / f"{final.name}.tmp-{os.getpid()}"
        try:
            root.mkdir(parents=True, exist_ok=True)
            already = verify(final) is None
            if tmp.exists():  # a pid reused from a killed run
                shutil.rmtree(tmp)
            if not already:
                tmp.mkdir()
            decision = [str(tmp), already, None]
        except OSError as exc:
            decision = [None, False, _write_failure(exc, tmp)]
    if initialized:
        dist.broadcast_object_list(decision, src=0)
    tmp_name, already, error = decision
    if error is not None:
        raise OutputDirError(error)
    if already:
        if rank == 0:
            logger.warning("checkpoint %s already exists and is complete; not overwriting", final)
        return None
    return Path(tmp_name)


def _write_rank_files(
    tmp: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    states: Mapping[str, Stateful],
) -> None:
    """This rank's DCP shards (rank 0 also ``.metadata``) and ``rank-<r>.pt``, fsynced."""
    initialized, rank, world = _dist_state()
    with _quiet_single_process():
        dcp.save(
            _app_state(model, optimizer),
            storage_writer=dcp.FileSystemWriter(tmp, sync_files=True),
            no_dist=not initialized,
        )
    payload = {
        "step": step,
        "rank": rank,
        "world_size": world,
        "states": {name: state.state_dict() for name, state in states.items()},
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    write_durable(_rank_file(tmp, rank), buffer.getvalue())


def _own_crcs(tmp: Path, rank: int) -> dict[str, int]:
    """CRC32 of the files this rank wrote: its DCP shards and rank file (rank 0: all others),
    read back from the page cache."""
    mine = {}
    for path in sorted(tmp.iterdir()):
        written_by = re.fullmatch(r"__(\d+)_\d+\.distcp|rank-(\d+)\.pt", path.name)
        owner = int(next(g for g in written_by.groups() if g is not None)) if written_by else 0
        if owner == rank:
            mine[path.name] = crc32(path)
    return mine


def _commit(
    tmp: Path, final: Path, step: int, world: int, crcs: dict[str, int], keep_last: int
) -> str | None:
    """Rank 0: the manifest, then the rename that makes ``final`` exist, each made durable;
    then pruning. Returns the one-line failure, or None."""
    try:
        write_manifest(tmp, step, world, crcs)
        if final.exists():  # incomplete (checked before writing): move it out of the way first
            remove_dir(final)
        os.rename(tmp, final)
        fsync_dir(final.parent)
        logger.info("saved checkpoint %s", final)
    except OSError as exc:  # e.g. the manifest on a disk the shards just filled
        shutil.rmtree(tmp, ignore_errors=True)
        return _write_failure(exc, tmp)
    try:
        prune(final.parent, keep_last, step)
    except OSError as exc:  # the new checkpoint is complete: only old ones are left
        logger.warning("could not remove old checkpoints in %s: %s", final.parent, exc)
    return None


def _write_failure(exc: BaseException, tmp: Path) -> str:
    """One line for a checkpoint write that failed on I/O (disk full, read-only, ...).

    DCP wraps each rank's error; ``torch.save`` reports a short write on a full disk as a
    ``RuntimeError``, so when no OSError is inside, a probe write tells whether the folder can
    take data at all. Anything else (a bug, an interrupt) is re-raised as it is.
    """
    if isinstance(exc, CheckpointException):
        inner = [e for e, _ in exc.failures.values() if isinstance(e, OSError)]
        found = inner[0] if inner else probe_write(tmp)
        if found is None:
            raise exc
        exc = found
    assert isinstance(exc, OSError)
    exc.filename = str(tmp.parent)  # the checkpoints folder (the tmp folder is removed)
    return describe_os_error(exc, "checkpoint")


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def read_rank_states(
    path: str | Path, rank: int = 0, require: tuple[str, ...] = ()
) -> dict[str, Any]:
    """The registered states of one rank of a complete checkpoint, without model or optimizer.

    A rank the checkpoint has no file for (it was written by fewer ranks) gets rank 0's.

    Args:
        path: a checkpoint folder.
        rank: whose states.
        require: names that must be there.

    Returns:
        ``{name: state_dict}`` as saved.

    Raises:
        ValueError: the checkpoint is incomplete or corrupted, lacks a required state, or was
            written by a version of longtune whose rank files this one cannot read.
        UnsafeCheckpointError: the rank file is not plain data (possibly crafted).
    """
    states = _read_rank_file(Path(path), rank)[0]
    _require(Path(path), states, require)
    return states


def _require(path: Path, states: dict[str, Any], names: Iterable[str]) -> None:
    missing = sorted(set(names) - set(states))
    if missing:
        raise CheckpointLoadError(
            f"{path} holds no {', '.join(missing)} state; it cannot be resumed (export its "
            f"weights with `longtune export {path} OUT` instead)"
        )


def _read_rank_file(path: Path, rank: int) -> tuple[dict[str, Any], int]:
    """``(states, the rank whose file they come from)``: this rank's, else rank 0's."""
    checkpoint_info(path)
    if not _rank_file(path, rank).is_file():
        rank = 0
    file = _rank_file(path, rank)
    try:
        payload = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = (str(exc).strip().splitlines() or [""])[0]
        raise UnsafeCheckpointError(
            f"{file} is not plain data; refusing to load it ({first[:200]})"
        ) from None
    if not isinstance(payload, dict) or not isinstance(payload.get("states"), dict):
        raise CheckpointLoadError(
            f"{path} was written by an earlier version of longtune and cannot be resumed by "
            f"this one; export its weights with `longtune export {path} OUT` and start a new "
            "run from OUT (--model OUT)"
        )
    return payload["states"], rank


def check_checkpoint_model(path: str | Path, model: nn.Module) -> None:
    """Refuse a checkpoint whose model tensors differ in name or shape from ``model``'s.

    Reads only the (verified, allowlisted) metadata, so the preflight can call it with a model
    built on the meta device.

    Args:
        path: a complete checkpoint.
        model: the model it would be loaded into (plain, sharded, or on the meta device).

    Raises:
        ValueError: "checkpoint ... is for a different model (...)".
    """
    checkpoint_info(path)
    _check_same_model(Path(path), read_metadata(path), _model_state(model))


def _check_same_model(path: Path, metadata: Any, model_state: dict[str, Any]) -> None:
    saved = {
        key.removeprefix("model."): tuple(md.size)
        for key, md in metadata.state_dict_metadata.items()
        if key.startswith("model.") and isinstance(md, TensorStorageMetadata)
    }
    here = {key: tuple(t.shape) for key, t in model_state.items() if torch.is_tensor(t)}
    if saved == here:
        return
    missing, extra = sorted(here.keys() - saved.keys()), sorted(saved.keys() - here.keys())
    shapes = [k for k in sorted(here.keys() & saved.keys()) if here[k] != saved[k]]
    if shapes:
        k = shapes[0]
        detail = f"{k} has shape {list(saved[k])} there, {list(here[k])} here"
    else:
        detail = f"tensors only here: {missing[:3]}, only there: {extra[:3]}"
    raise ValueError(
        f"checkpoint {path} is for a different model ({detail}); resume it with the model it "
        "was trained from, or start a new run in another output folder"
    )


def load_checkpoint(
    path: str | Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    states: Mapping[str, Stateful] | None = None,
) -> None:
    """Load a checkpoint into the model, the optimizer and the registered states, in place.

    Call on every rank (collective when a process group is initialized). DCP reshards when the
    layout changed. A rank the checkpoint has no file for (it was written by fewer ranks) loads
    rank 0's states (a warning is logged); each state sees which rank wrote its values.

    Args:
        path: a checkpoint folder (from :func:`find_latest_checkpoint` or the user).
        model: the model to load into (built and sharded as for training).
        optimizer: the optimizer to load into, or None to load only the model.
        states: the registered states to load, by the names they were saved under; None
            loads only model and optimizer (an export).

    Raises:
        ValueError: the checkpoint is incomplete, corrupted, of another model, or lacks a
            registered state.
        UnsafeCheckpointError: a file names code a checkpoint never holds.
    """
    path = Path(path)
    checkpoint_info(path)
    initialized, rank, world = _dist_state()
    rank_states, file_rank = _read_rank_file(path, rank) if states else ({}, rank)
    _require(path, rank_states, states or {})
    state = _app_state(model, optimizer)
    reader = SafeReader(path)
    _check_same_model(path, reader.read_metadata(), state["model"])
    _dcp_load(path, state, reader, initialized)
    options = _options(model)
    if optimizer is None:
        set_model_state_dict(model, state["model"], options=options)
    else:
        set_state_dict(
            model,
            optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optim"],
            options=options,
        )
    if file_rank != rank:
        logger.warning(
            "checkpoint %s has no state of rank %d of %d: using rank 0's", path, rank, world
        )
    for name, target in (states or {}).items():
        target.load_state_dict(rank_states[name])


class CheckpointTensors(Mapping[str, torch.Tensor]):
    """The model tensors of a checkpoint by name, each read from disk when asked for: whole
    (unsharded, however many ranks wrote it), on the CPU, in the dtype it was saved in.

    An export streams a model of any size through this: nothing but the tensor asked for is
    held, and reading it holds one copy (a tensor written whole is returned as read; one written
    in shards by several ranks is assembled shard by shard). The shards are read as DCP reads
    them (``torch.load(weights_only=True)`` of each shard's slice of its file), with the index
    read under the allowlist; in this process alone (no process group).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        checkpoint_info(self.path)  # raises on an incomplete or unsafe checkpoint
        self._metadata = read_metadata(self.path)
        self._specs = {
            key.removeprefix("model."): md
            for key, md in self._metadata.state_dict_metadata.items()
            if key.startswith("model.") and isinstance(md, TensorStorageMetadata)
        }

    def __getitem__(self, name: str) -> torch.Tensor:
        md = self._specs[name]
        whole = None
        for chunk in md.chunks:
            info = self._metadata.storage_data[MetadataIndex(f"model.{name}", chunk.offsets)]
            if getattr(info, "transform_descriptors", None):  # compressed or otherwise encoded
                return self._read_with_dcp(name)
            with open(self.path / info.relative_path, "rb") as f:
                part = torch.load(_FileSlice(f, info.offset, info.length), weights_only=True)
            if tuple(chunk.sizes) == tuple(md.size):
                return part.reshape(md.size).to(md.properties.dtype)  # written whole: as read
            if whole is None:
                whole = torch.empty(md.size, dtype=md.properties.dtype)
            rows = whole
            for dim, (start, length) in enumerate(zip(chunk.offsets, chunk.sizes, strict=True)):
                rows = rows.narrow(dim, start, length)
            rows.copy_(part)
            del part
        return whole

    def _read_with_dcp(self, name: str) -> torch.Tensor:
        md = self._specs[name]
        tensor = torch.empty(md.size, dtype=md.properties.dtype)
        reader = SafeReader(self.path)
        _dcp_load(self.path, {"model": {name: tensor}}, reader, initialized=False)
        return tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self._specs)

    def __len__(self) -> int:
        return len(self._specs)

    def dtype_of(self, name: str) -> torch.dtype:
        """The dtype of ``name`` (from the index: nothing is read)."""
        return self._specs[name].properties.dtype


class _FileSlice(io.RawIOBase):
    """Bytes ``[offset, offset + length)`` of an open file, as a seekable file of their own."""

    def __init__(self, file: io.BufferedReader, offset: int, length: int) -> None:
        super().__init__()
        self.file, self.start, self.length, self.pos = file, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.length}[whence]
        self.pos = min(max(base + pos, 0), self.length)
        return self.pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        n = min(len(view), self.length - self.pos)
        self.file.seek(self.start + self.pos)
        got = self.file.readinto(view[:n]) or 0
        self.pos += got
        return got


def _dcp_load(path: Path, state: dict[str, Any], reader: SafeReader, initialized: bool) -> None:
    """``dcp.load`` through the allowlist, its wrapped errors turned into one line."""
    try:
        with _quiet_single_process():
            dcp.load(state, storage_reader=reader, planner=SafePlanner(), no_dist=not initialized)
    except CheckpointException as exc:  # DCP wraps each rank's error with its traceback
        inner = [e for e, _ in exc.failures.values()]
        for error in inner:
            if isinstance(error, UnsafeCheckpointError):
                raise UnsafeCheckpointError(f"{path}: {error}") from None
        for error in inner:
            if isinstance(error, torch.OutOfMemoryError | MemoryError | OSError):
                raise error from None
        first = str(inner[0]).strip().splitlines()[0] if inner and str(inner[0]).strip() else ""
        raise CheckpointLoadError(
            f"{path} cannot be loaded ({type(inner[0]).__name__ if inner else 'error'}: {first}); "
            "resume from an earlier checkpoint (checkpoint.resume=PATH)"
        ) from None


class Checkpointer:
    """The checkpoints of one run: where they go, how many stay, and what they hold.

    Model, optimizer and the named states are registered once (torchtitan's ``Stateful``
    objects); :meth:`save` and :meth:`load` then write and read all of them together, so what
    a checkpoint holds is said in one place.

    Args:
        root: the checkpoints folder.
        keep_last: complete checkpoints to keep.
        model: the (sharded) model.
        optimizer: its optimizer.
        states: the per-rank states by name (``state_dict()`` / ``load_state_dict()``).
    """

    def __init__(
        self,
        root: Path,
        *,
        keep_last: int,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        states: Mapping[str, Stateful],
    ) -> None:
        self.root = Path(root)
        self.keep_last = keep_last
        self.model, self.optimizer, self.states = model, optimizer, dict(states)

    def save(self, step: int) -> Path:
        """Write the checkpoint of ``step`` (collective); returns its folder."""
        return save_checkpoint(
            self.root,
            step,
            model=self.model,
            optimizer=self.optimizer,
            states=self.states,
            keep_last=self.keep_last,
        )

    def load(self, path: Path) -> None:
        """Load everything registered from the checkpoint at ``path`` (collective)."""
        load_checkpoint(path, model=self.model, optimizer=self.optimizer, states=self.states)
