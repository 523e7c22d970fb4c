"""Which checkpoints exist and can be trusted: the ``COMPLETE`` manifest, checksums, discovery.

A checkpoint folder ``step-N`` counts only once its manifest (``COMPLETE``: step, world size,
every file with its size and CRC32) is there and every file matches it. Folders being written
(``step-N.tmp-PID``) or deleted (``step-N.trash-PID``) never count.

Verifying reads every file once (zlib CRC32 in 1 MiB blocks, up to 8 files at a time; zlib
releases the GIL). Global rank 0, which picks the checkpoint that every rank then follows,
checksums every file; the other ranks check sizes and the small files only, so N ranks do not
read a checkpoint N times. A checkpoint verified once is not read again by the same process
unless a file's size, mtime or inode changed. Its DCP metadata must unpickle under
:mod:`~longtune.checkpoint.dcp_safe`'s allowlist; metadata that names code a DCP checkpoint
never holds is not a corruption but a crafted file, and stops the run
(:class:`~longtune.checkpoint.dcp_safe.UnsafeCheckpointError`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch.distributed as dist

from longtune.checkpoint.dcp_safe import UnsafeCheckpointError, read_metadata

logger = logging.getLogger(__name__)

MARKER = "COMPLETE"
"""The manifest file, written last: its presence (and every file matching it) is completeness."""
STEP_DIR = re.compile(r"step-(\d+)")
_STALE_DIR = re.compile(r"step-\d+\.(tmp|trash)-.+")
_CRC_BLOCK = 1 << 20
_SMALL_FILE = 64 << 20  # checksummed by every rank; larger files and shards by rank 0 only
# Checkpoints verified by this process: path -> (size, mtime_ns, inode) of every file.
_VERIFIED: dict[Path, tuple] = {}


def fsync_dir(path: Path) -> None:
    """Make a folder's entries (a rename into it, a new file) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durable(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` and fsync it."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def crc32(path: Path) -> int:
    """CRC32 of a file's bytes."""
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CRC_BLOCK):
            crc = zlib.crc32(chunk, crc)
    return crc


def write_manifest(folder: Path, step: int, world_size: int, crcs: dict[str, int]) -> None:
    """Write and fsync the ``COMPLETE`` manifest of every file in ``folder``.

    Args:
        folder: the checkpoint being written (its temporary name).
        step: the optimizer step it holds.
        world_size: the ranks that wrote it.
        crcs: file name -> CRC32 where the writer already knows it (others are computed).
    """
    files = {}
    for path in sorted(folder.iterdir()):
        crc = crcs.get(path.name)
        files[path.name] = {
            "size": path.stat().st_size,
            "crc32": crc if crc is not None else crc32(path),
        }
    manifest = {"step": step, "world_size": world_size, "time": time.time(), "files": files}
    write_durable(folder / MARKER, json.dumps(manifest, indent=1).encode())
    fsync_dir(folder)


def read_manifest(path: Path) -> tuple[dict[str, Any] | None, str]:
    """``(manifest, "")``, or ``(None, why it is unusable)``."""
    marker = path / MARKER
    if not marker.is_file():
        return None, f"no {MARKER} marker"
    try:
        manifest = json.loads(marker.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return None, f"unreadable {MARKER} marker ({exc})"
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(
        isinstance(info, dict) and {"size", "crc32"} <= info.keys() for info in files.values()
    ):
        return None, f"malformed {MARKER} marker"
    return manifest, ""


def is_coordinator() -> bool:
    """Global rank 0 (``RANK`` before a process group exists, as torchrun sets it)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def verify(path: Path) -> str | None:
    """None if ``path`` is a complete, intact checkpoint, else the reason it is not.

    Raises:
        UnsafeCheckpointError: the files are intact but the metadata names code (crafted).
    """
    if not path.is_dir():
        return "not a directory"
    manifest, why = read_manifest(path)
    if manifest is None:
        return why
    for name, info in manifest["files"].items():
        file = path / name
        if not file.is_file():
            return f"missing file {name}"
        if file.stat().st_size != info["size"]:
            return f"{name} has {file.stat().st_size} bytes, expected {info['size']}"
    stats = [(path / n).stat() for n in [*sorted(manifest["files"]), MARKER]]
    signature = tuple((s.st_size, s.st_mtime_ns, s.st_ino) for s in stats)
    if _VERIFIED.get(path.resolve()) == signature:
        return None
    everything = is_coordinator()
    names = [
        n
        for n, info in sorted(manifest["files"].items())
        if everything or (info["size"] <= _SMALL_FILE and not n.endswith(".distcp"))
    ]
    workers = max(1, min(8, os.cpu_count() or 1, len(names)))
    with ThreadPoolExecutor(workers) as pool:
        crcs = list(pool.map(crc32, [path / n for n in names]))
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


def step_dirs(root: Path) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every ``step-N`` folder under ``root``, newest first."""
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = STEP_DIR.fullmatch(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found, reverse=True)


def find_latest_checkpoint(
    root: str | Path, skipped: list[tuple[Path, str]] | None = None
) -> Path | None:
    """The newest complete checkpoint in a checkpoints folder.

    Incomplete or corrupted ``step-N`` folders (no manifest, missing or truncated files,
    unreadable metadata) are skipped with a warning naming them.

    Args:
        root: the folder holding the ``step-N`` checkpoints (a run's ``checkpoints/``).
        skipped: collects ``(folder, why)`` of the skipped ones instead of warning.

    Returns:
        The checkpoint folder, or None when there is no complete checkpoint.
    """
    for _, path in step_dirs(Path(root)):
        reason = verify(path)
        if reason is None:
            return path
        if skipped is None:
            logger.warning("skipping incomplete or corrupted checkpoint %s: %s", path, reason)
        else:
            skipped.append((path, reason))
    return None


def checkpoint_info(path: str | Path) -> dict[str, Any]:
    """The manifest of a complete checkpoint: ``step``, ``world_size``, ``time``, ``files``.

    Args:
        path: a checkpoint folder.

    Returns:
        The parsed manifest.

    Raises:
        ValueError: the checkpoint is incomplete or corrupted.
    """
    path = Path(path)
    reason = verify(path)
    if reason is not None:
        raise ValueError(f"{path} is not a usable checkpoint: {reason}")
    manifest, _ = read_manifest(path)
    assert manifest is not None
    return manifest


def remove_dir(path: Path) -> None:
    """Rename to a trash name (atomic), then delete: a half-deleted folder never looks valid."""
    trash = path.with_name(f"{path.name}.trash-{os.getpid()}")
    if trash.exists():
        shutil.rmtree(trash)
    os.rename(path, trash)
    shutil.rmtree(trash)


def prune(root: Path, keep_last: int, written: int) -> None:
    """Remove partial folders and all but the newest ``keep_last`` complete checkpoints up to
    step ``written`` (the one just saved).

    Later steps (left by a run restarted from an earlier checkpoint, e.g. after their files
    turned out corrupt) do not count: they never push out the checkpoint just written.
    """
    for path in root.iterdir():
        if _STALE_DIR.fullmatch(path.name) and path.is_dir():
            logger.info("removing stale partial checkpoint directory %s", path)
            shutil.rmtree(path)
    complete = [
        path for step, path in step_dirs(root) if step <= written and (path / MARKER).is_file()
    ]
    for path in complete[keep_last:]:
        logger.info("removing old checkpoint %s (keep_last=%d)", path, keep_last)
        remove_dir(path)
    fsync_dir(root)
