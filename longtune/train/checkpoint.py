"""Resumable training checkpoints that survive ``kill -9`` at any instant.

Layout of one checkpoint, ``<run_dir>/checkpoints/step-<N>/``::

    .metadata, __<rank>_0.distcp   model + optimizer state, written by torch.distributed.checkpoint
                                   (DCP): each rank writes its own shards, any world size can load
    rank-<r>.pt                    per rank: scheduler state, RNG states, the caller's ``extra``
    COMPLETE                       JSON manifest (step, world size, every file with its size and
                                   CRC32), written last

Protocol (why no crash leaves something that looks complete but is not):

1. rank 0 creates ``step-N.tmp-<pid>``; every rank writes its files there and fsyncs them
   (DCP fsyncs its shards and ``.metadata``), then computes the CRC32 of the files it wrote
   (rank 0 gathers them); barrier.
2. rank 0 writes and fsyncs ``COMPLETE`` inside the tmp dir, fsyncs the tmp dir, then renames
   it to ``step-N`` and fsyncs ``checkpoints/``. The rename is the commit: before it only a
   ``*.tmp-*`` directory exists (never considered), after it a complete ``step-N`` exists.
3. Only then are older checkpoints pruned to ``keep_last``, each first renamed to
   ``step-K.trash-<pid>`` (so a half-deleted one never looks like a checkpoint), and stale
   tmp/trash directories of killed runs are removed.

:func:`find_latest_checkpoint` trusts a checkpoint only once every file in its manifest is
there with its size and CRC32 (zlib, read in 1 MiB blocks: about 0.5 s per GB and core, one
read of the checkpoint by rank 0, up to 8 files at a time; the other ranks check sizes and the
small files, and follow rank 0's choice) and its DCP metadata unpickles under :mod:`longtune.train.dcp_safe`'s
allowlist; anything else is skipped with a warning naming it, and the previous complete
checkpoint is used. A verified checkpoint is not read again in the same process unless a
file's size, mtime or inode changed. Metadata that names code a DCP checkpoint never holds is
not a corruption but a crafted file: :class:`UnsafeCheckpointError` stops the run instead.
:func:`load_checkpoint` reads through the same allowlist (``dcp_safe.SafeReader`` and
``SafePlanner``) and refuses a checkpoint whose model tensors have other names or shapes than
the model it is loaded into ("checkpoint is for a different model").
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
import re
import shutil
import time
import warnings
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from longtune.fsutil import OutputDirError, describe_os_error, probe_write
from longtune.train.dcp_safe import (
    SafePlanner,
    SafeReader,
    UnsafeCheckpointError,
    read_metadata,
)

logger = logging.getLogger(__name__)

CHECKPOINTS_SUBDIR = "checkpoints"


class CheckpointLoadError(ValueError):
    """A complete checkpoint whose values cannot be loaded (one line: the checkpoint, the first
    failure, what to do)."""


MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"step-(\d+)")
_STALE_DIR = re.compile(r"step-\d+\.(tmp|trash)-.+")
_CRC_BLOCK = 1 << 20
_SMALL_FILE = 64 << 20  # checksummed by every rank; larger files and shards by rank 0 only
# Checkpoints verified by this process: path -> (size, mtime_ns, inode) of every file.
_VERIFIED: dict[Path, tuple] = {}

__all__ = [
    "UnsafeCheckpointError",
    "check_checkpoint_model",
    "checkpoint_info",
    "find_latest_checkpoint",
    "load_checkpoint",
    "save_checkpoint",
]


def _dist_state() -> tuple[bool, int, int]:
    """(process group initialized, rank, world size)."""
    if dist.is_available() and dist.is_initialized():
        return True, dist.get_rank(), dist.get_world_size()
    return False, 0, 1


def _barrier(initialized: bool) -> None:
    if initialized:
        dist.barrier()


@contextmanager
def _quiet_single_process() -> Iterator[None]:
    """Silence DCP's "assuming the intent is to save/load in a single process" warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durable(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CRC_BLOCK):
            crc = zlib.crc32(chunk, crc)
    return crc


def _own_files(tmp: Path, rank: int) -> dict[str, int]:
    """CRC32 of the files this rank wrote: its DCP shards and rank file (rank 0: all others)."""
    mine = {}
    for path in sorted(tmp.iterdir()):
        name = path.name
        written_by = re.fullmatch(r"__(\d+)_\d+\.distcp|rank-(\d+)\.pt", name)
        owner = int(next(g for g in written_by.groups() if g is not None)) if written_by else 0
        if owner == rank:
            mine[name] = _crc32(path)
    return mine


def capture_rng_state() -> dict[str, Any]:
    """The RNG states of Python, NumPy, torch (CPU) and, when initialized, CUDA of this process.

    Returns:
        A dict that ``torch.load(..., weights_only=True)`` can read back (no numpy objects).
    """
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "name": np_name,
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restore the RNG states captured by :func:`capture_rng_state`.

    Args:
        state: the dict from capture_rng_state (possibly after a torch.save/torch.load).
    """
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    npst = state["numpy"]
    np.random.set_state(
        (
            npst["name"],
            npst["keys"].numpy().astype(np.uint32),
            npst["pos"],
            npst["has_gauss"],
            npst["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _app_state(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """DCP-ready state: plain or FSDP2-sharded (DTensor) model and optimizer state dicts."""
    if optimizer is None:
        return {"model": get_model_state_dict(model)}
    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optim": optim_sd}


def _checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS_SUBDIR


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    extra: dict[str, Any],
    keep_last: int,
) -> Path:
    """Atomically write ``run_dir/checkpoints/step-{step}`` and prune old checkpoints.

    Call on every rank (collective when a process group is initialized). Model and optimizer
    state go through DCP, so FSDP2-sharded models write only their local shards.

    Args:
        run_dir: the run directory (shared by all ranks; a shared filesystem across nodes).
        step: the optimizer step the state corresponds to.
        model: the model (plain or FSDP2 ``fully_shard``-ed).
        optimizer: its optimizer, or None to save only the model.
        scheduler: the learning-rate scheduler, or None.
        extra: this rank's extra state (step, tokens seen, loader state, ...). Must hold only
            tensors, numbers, strings, None and lists/tuples/dicts of them, as it is loaded with
            ``weights_only=True``. RNG states are captured automatically.
        keep_last: complete checkpoints to keep after this one is written (>= 1).

    Returns:
        The checkpoint directory. If a complete checkpoint for this step already exists it is
        left untouched (a warning is logged) and returned.
    """
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    initialized, rank, world = _dist_state()
    root = _checkpoint_root(run_dir)
    final = root / f"step-{step}"

    # Rank 0 decides the tmp directory and whether this step already has a complete checkpoint.
    # Whatever fails on rank 0 alone is sent to every rank, so that all of them raise the same
    # one-line error instead of the others waiting for rank 0 until the collective timeout.
    decision: list[Any] = [None, False, None]
    if rank == 0:
        tmp = root / f"step-{step}.tmp-{os.getpid()}"
        try:
            root.mkdir(parents=True, exist_ok=True)
            already = _verify(final) is None
            if tmp.exists():  # a pid reused from a killed run
                shutil.rmtree(tmp)
            if not already:
                tmp.mkdir()
            decision = [str(tmp), already, None]
        except OSError as exc:
            decision = [None, False, _write_failure(exc, tmp)]
    if initialized:
        dist.broadcast_object_list(decision, src=0)
    if decision[2] is not None:
        raise OutputDirError(decision[2])
    tmp, already = Path(decision[0]), decision[1]
    if already:
        if rank == 0:
            logger.warning("checkpoint %s already exists and is complete; not overwriting", final)
        return final

    # Each rank writes its files and checksums them (read back from the page cache); rank 0
    # collects the checksums, and every rank learns whether any rank failed to write.
    try:
        _write_rank_files(tmp, step, rank, world, model, optimizer, scheduler, extra, initialized)
        result = {"crc": _own_files(tmp, rank), "error": None}
    except (OSError, CheckpointException) as exc:
        result = {"crc": {}, "error": _write_failure(exc, tmp)}
    results = [result]
    if initialized:
        results = [None] * world
        dist.all_gather_object(results, result)
    errors = [r["error"] for r in results if r["error"]]
    if errors:
        if rank == 0:  # free the space; the complete checkpoints were never touched
            shutil.rmtree(tmp, ignore_errors=True)
        _barrier(initialized)
        raise OutputDirError(errors[0])
    crcs = [r["crc"] for r in results]

    outcome: list[str | None] = [None]
    if rank == 0:
        try:
            _commit(tmp, final, step, world, crcs)
        except OSError as exc:  # e.g. the manifest on a disk the shards just filled
            shutil.rmtree(tmp, ignore_errors=True)
            outcome = [_write_failure(exc, tmp)]
        else:
            try:
                _prune(root, keep_last, step)
            except OSError as exc:  # the new checkpoint is complete: only old ones are left
                logger.warning("could not remove old checkpoints in %s: %s", root, exc)
    if initialized:
        dist.broadcast_object_list(outcome, src=0)
    if outcome[0] is not None:
        raise OutputDirError(outcome[0])
    return final


def _commit(tmp: Path, final: Path, step: int, world: int, crcs: list[dict[str, int]]) -> None:
    """Write the manifest of every file (the ``COMPLETE`` marker), then rename ``tmp`` to
    ``final``, each made durable: before the rename the checkpoint does not exist."""
    by_name = {name: crc for part in crcs for name, crc in part.items()}
    files = {}
    for path in sorted(tmp.iterdir()):
        crc = by_name.get(path.name)
        files[path.name] = {
            "size": path.stat().st_size,
            "crc32": crc if crc is not None else _crc32(path),
        }
    manifest = {"step": step, "world_size": world, "time": time.time(), "files": files}
    _write_durable(tmp / MARKER, json.dumps(manifest, indent=1).encode())
    _fsync_dir(tmp)
    if final.exists():  # incomplete (checked before writing): move it out of the way first
        _remove_dir(final)
    os.rename(tmp, final)
    _fsync_dir(final.parent)
    logger.info("saved checkpoint %s", final)


def _write_rank_files(
    tmp: Path,
    step: int,
    rank: int,
    world: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    extra: dict[str, Any],
    initialized: bool,
) -> None:
    """This rank's DCP shards (rank 0 also ``.metadata``) and ``rank-<r>.pt``, fsynced."""
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
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng": capture_rng_state(),
        "extra": extra,
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    _write_durable(tmp / f"rank-{rank}.pt", buffer.getvalue())


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


def _remove_dir(path: Path) -> None:
    """Rename to a trash name (atomic), then delete: a half-deleted dir never looks valid."""
    trash = path.with_name(f"{path.name}.trash-{os.getpid()}")
    if trash.exists():
        shutil.rmtree(trash)
    os.rename(path, trash)
    shutil.rmtree(trash)


def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    """``step-N`` directories, newest first."""
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_DIR.fullmatch(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found, reverse=True)


def _prune(root: Path, keep_last: int, written: int) -> None:
    """Remove partial directories and all but the newest ``keep_last`` complete checkpoints up
    to step ``written`` (the one just saved). Later steps (left by a run that was restarted
    from an earlier one, e.g. after their files turned out corrupt) do not count: they must
    never push out the checkpoint just written."""
    for path in root.iterdir():
        if _STALE_DIR.fullmatch(path.name) and path.is_dir():
            logger.info("removing stale partial checkpoint directory %s", path)
            shutil.rmtree(path)
    complete = [
        path for step, path in _step_dirs(root) if step <= written and (path / MARKER).is_file()
    ]
    for path in complete[keep_last:]:
        logger.info("removing old checkpoint %s (keep_last=%d)", path, keep_last)
        _remove_dir(path)
    _fsync_dir(root)


def _read_manifest(path: Path) -> tuple[dict[str, Any] | None, str]:
    """(manifest, "") or (None, why it is unusable)."""
    marker = path / MARKER
    if not marker.is_file():
        return None, f"no {MARKER} marker"
    try:
        manifest = json.loads(marker.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return None, f"unreadable {MARKER} marker ({exc})"
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        return None, f"malformed {MARKER} marker"
    return manifest, ""


def _signature(path: Path, names: list[str]) -> tuple:
    stats = [(path / name).stat() for name in names]
    return tuple((s.st_size, s.st_mtime_ns, s.st_ino) for s in stats)


def _is_coordinator() -> bool:
    """Rank 0 of the job (``RANK`` before the process group exists, as torchrun sets it)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def _verify(path: Path) -> str | None:
    """None if ``path`` is a complete, intact checkpoint, else the reason it is not.

    Raises:
        UnsafeCheckpointError: the files are intact but the metadata names code (crafted).
    """
    if not path.is_dir():
        return "not a directory"
    manifest, why = _read_manifest(path)
    if manifest is None:
        return why
    names = sorted(manifest["files"]) + [MARKER]
    for name, info in manifest["files"].items():
        file = path / name
        if not file.is_file():
            return f"missing file {name}"
        if file.stat().st_size != info.get("size"):
            return f"{name} has {file.stat().st_size} bytes, expected {info.get('size')}"
        if "crc32" not in info:
            return f"the manifest has no checksum for {name} (written by an older longtune)"
    signature = _signature(path, names)
    if _VERIFIED.get(path.resolve()) == signature:
        return None
    # Rank 0 (the one that picks the checkpoint; the others follow its choice) checksums every
    # file; the other ranks the small ones, so N ranks do not read the checkpoint N times.
    everything = _is_coordinator()
    names = [
        n
        for n, info in sorted(manifest["files"].items())
        if everything or (info["size"] <= _SMALL_FILE and not n.endswith(".distcp"))
    ]
    workers = max(1, min(8, os.cpu_count() or 1, len(names)))
    with ThreadPoolExecutor(workers) as pool:  # zlib releases the GIL: files in parallel
        crcs = list(pool.map(_crc32, [path / n for n in names]))
    for name, crc in zip(names, crcs, strict=True):
        if crc != manifest["files"][name]["crc32"]:
            return f"{name} is corrupted (CRC32 mismatch)"
    try:
        read_metadata(path)
    except UnsafeCheckpointError:
        raise
    except (OSError, ValueError) as exc:
        return f"unreadable DCP metadata ({exc})"
    _VERIFIED[path.resolve()] = signature
    return None


def find_latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run.

    Incomplete or corrupted ``step-N`` directories (no marker, missing or truncated files,
    unreadable metadata) are skipped with a warning naming them; tmp directories are ignored.

    Args:
        run_dir: the run directory (the one given to save_checkpoint).

    Returns:
        The checkpoint directory, or None if there is no complete checkpoint.
    """
    for _, path in _step_dirs(_checkpoint_root(run_dir)):
        reason = _verify(path)
        if reason is None:
            return path
        logger.warning("skipping incomplete or corrupted checkpoint %s: %s", path, reason)
    return None


def checkpoint_info(path: str | Path) -> dict[str, Any]:
    """The manifest of a complete checkpoint: ``step``, ``world_size``, ``time``, ``files``.

    Args:
        path: a checkpoint directory.

    Returns:
        The parsed COMPLETE manifest.

    Raises:
        ValueError: if the checkpoint is incomplete or corrupted.
    """
    path = Path(path)
    reason = _verify(path)
    if reason is not None:
        raise ValueError(f"{path} is not a usable checkpoint: {reason}")
    manifest, _ = _read_manifest(path)
    assert manifest is not None
    return manifest


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
    _check_same_model(Path(path), read_metadata(path), get_model_state_dict(model))


def _check_same_model(path: Path, metadata: Any, model_state: dict[str, Any]) -> None:
    """Refuse a checkpoint whose model tensors differ in name or shape from ``model_state``."""
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
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    restore_rng: bool = True,
) -> dict[str, Any]:
    """Load a checkpoint into model, optimizer and scheduler in place, and restore RNG states.

    Call on every rank (collective when a process group is initialized). The model must be
    built (and sharded) the same way as when saving; DCP reshards if the world size changed.

    Args:
        path: a checkpoint directory (from find_latest_checkpoint or the user).
        model: the model to load into.
        optimizer: the optimizer to load into, or None to load only the model.
        scheduler: the scheduler to load into, or None.
        restore_rng: restore this rank's Python/NumPy/torch RNG states.

    Returns:
        This rank's ``extra`` dict as given to save_checkpoint. If the checkpoint was written
        with fewer ranks than this rank's index, rank 0's extra is returned and RNG states are
        left alone (a warning is logged).

    Raises:
        ValueError: if the checkpoint is incomplete or corrupted.
    """
    info = checkpoint_info(path)
    path = Path(path)
    initialized, rank, world = _dist_state()
    state = _app_state(model, optimizer)
    reader = SafeReader(path)
    _check_same_model(path, reader.read_metadata(), state["model"])
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
    if optimizer is None:
        set_model_state_dict(model, state["model"])
    else:
        set_state_dict(
            model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
        )
    rank_file = path / f"rank-{rank}.pt"
    own_file = rank_file.is_file()
    if not own_file:
        logger.warning(
            "checkpoint %s was written by %d ranks, this is rank %d of %d: using rank 0's "
            "extra state and not restoring RNG states",
            path,
            info["world_size"],
            rank,
            world,
        )
        rank_file = path / "rank-0.pt"
    payload = torch.load(rank_file, map_location="cpu", weights_only=True)
    if scheduler is not None:
        if payload["scheduler"] is None:
            raise ValueError(f"{path} has no scheduler state; pass scheduler=None to skip it")
        scheduler.load_state_dict(payload["scheduler"])
    if restore_rng and own_file:
        restore_rng_state(payload["rng"])
    return payload["extra"]


def read_extra(path: str | Path, rank: int = 0) -> dict[str, Any]:
    """One rank's ``extra`` dict of a complete checkpoint, without loading model or optimizer.

    Args:
        path: a checkpoint directory.
        rank: whose extra state (rank 0's by default).

    Returns:
        The dict given to save_checkpoint on that rank.

    Raises:
        ValueError: if the checkpoint is incomplete or corrupted.
    """
    checkpoint_info(path)
    payload = torch.load(Path(path) / f"rank-{rank}.pt", map_location="cpu", weights_only=True)
    return payload["extra"]
