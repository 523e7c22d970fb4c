"""Output folders longtune writes: never over a user's files, always complete or absent.

Contract of :func:`atomic_dir` (used by ``longtune convert``, ``longtune export``,
:func:`longtune.save_model` and the asset builder):

- The folder is built under a temporary sibling name and renamed into place only when
  complete: a reader never sees a half-written output, and a crash leaves the old one intact.
- Every folder it writes carries :data:`OUTPUT_MARKER` (a small JSON file, hidden so that
  Hugging Face tools ignore it; HF folders stay loadable as they are). That marker is how
  longtune knows a folder is its own.
- An existing output folder is replaced only when it is empty, or when ``overwrite=True`` and
  its marker says it is an output (``kind`` ``hf``, ``native`` or ``asset``: never a training
  run, whatever state it is in) and it holds nothing but the files the marker lists, each as
  longtune wrote it (the marker records every file's size, mtime and CRC32: a file added since,
  e.g. a user's README, or a file edited since makes the overwrite refused, naming it; a marker
  without that record lists nothing). A non-empty folder without the marker is refused, naming
  what is in it: longtune never deletes a file it did not write.
- The output may not be the current folder (or one above it), a source folder, inside a source
  or hold a source (all after resolving links).
- Temporary siblings left by a killed writer (``NAME.tmp-PID-…``, ``NAME.old-PID-…`` of a
  process that is gone) are removed by the next write of the same folder.
- A replaced folder keeps its permission bits; a new one gets the umask's default, not the
  0700 of a temporary folder.

Errors are :class:`OutputDirError` (a ``ValueError``): one line, with the folder and the fix.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import stat
import threading
import time
import uuid
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

OUTPUT_MARKER = ".longtune-output"
"""The file that marks a folder as written by longtune (JSON: ``written_by``, ``kind``, ``time``
and, for an output, ``files``: every file's ``size``, ``mtime_ns`` and ``crc32``)."""
OUTPUT_KINDS = ("hf", "native", "adapter", "asset")
"""Marker kinds :func:`atomic_dir` writes, the only folders ``overwrite`` may replace."""

_SHOW_ENTRIES = 5


class OutputDirError(ValueError):
    """An output folder that longtune refuses to write (names the folder and the fix)."""


def is_longtune_output(path: str | Path) -> bool:
    """True when ``path`` is a folder that longtune wrote (it holds :data:`OUTPUT_MARKER`)."""
    marker = Path(path) / OUTPUT_MARKER
    try:
        return json.loads(marker.read_text()).get("written_by") == "longtune"
    except (OSError, ValueError, AttributeError):
        return False


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def _describe(entries: list[str]) -> str:
    shown = ", ".join(entries[:_SHOW_ENTRIES])
    more = len(entries) - _SHOW_ENTRIES
    return shown + (f" and {more} more" if more > 0 else "")


def check_output_dir(
    final: str | Path, sources: Iterable[str | Path] = (), overwrite: bool = False
) -> Path:
    """Check that ``final`` may be written as an output folder; call before any heavy work.

    Args:
        final: the output folder.
        sources: folders the output is made from (it may be neither of them, in one, nor
            hold one).
        overwrite: allow replacing a folder longtune wrote before.

    Returns:
        ``final`` with links resolved (write there, so a link to a folder stays a link).

    Raises:
        OutputDirError: the folder is refused; the message says why and what to do.
    """
    given = Path(final)
    out = given.resolve()
    if _inside(Path.cwd().resolve(), out):
        raise OutputDirError(
            f"output folder {str(given)!r} is the current folder or holds it; "
            "name a new folder, e.g. ./out"
        )
    for src in sources:
        src_path = Path(src).resolve()
        if _inside(out, src_path):
            raise OutputDirError(
                f"output folder {given} is {'the source' if out == src_path else 'inside the source'} "
                f"{src}; write the output somewhere else"
            )
        if _inside(src_path, out):
            raise OutputDirError(
                f"output folder {given} holds the source {src}; write the output somewhere else"
            )
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"output {given} exists and is not a folder; choose another path")
    if out.is_dir():
        entries = sorted(p.name + ("/" if p.is_dir() else "") for p in out.iterdir())
        if entries and not is_longtune_output(out):
            raise OutputDirError(
                f"output folder {given} is not empty and was not written by longtune "
                f"(it holds {_describe(entries)}); choose a new or empty folder"
            )
        if entries:
            _check_replaceable(out, given, overwrite)
    return out


def _check_replaceable(out: Path, given: Path, overwrite: bool) -> None:
    """Refuse to replace a longtune folder that is not an output, holds files longtune did not
    write there or files changed since, or without ``overwrite``."""
    marker = _read_marker(out)
    kind = marker.get("kind")
    if kind not in OUTPUT_KINDS:
        what = "a training run" if kind == "run" else f"a longtune folder of kind {kind!r}"
        raise OutputDirError(
            f"output folder {given} is {what}, not an earlier export or convert output; it is "
            "never replaced: choose another folder"
        )
    if not overwrite:
        raise OutputDirError(
            f"output folder {given} holds an earlier longtune output; to replace it pass "
            "--overwrite on the command line (overwrite=True in Python), or choose a new folder"
        )
    if kind == "asset":
        return  # a cache only longtune reads: rebuilt whole
    written = marker.get("files") if isinstance(marker.get("files"), dict) else {}
    added = [f for f in _files(out) if f not in written and f != OUTPUT_MARKER]
    if added:
        raise OutputDirError(
            f"output folder {given} holds files longtune did not write there "
            f"({_describe(added)}); move them away or choose a new folder"
        )
    changed = [name for name, info in written.items() if _changed(out / name, info)]
    if changed:
        raise OutputDirError(
            f"output folder {given} holds files changed since longtune wrote them "
            f"({_describe(changed)}); move them away or choose a new folder"
        )


def _read_marker(folder: Path) -> dict:
    try:
        marker = json.loads((folder / OUTPUT_MARKER).read_text())
    except (OSError, ValueError):
        return {}
    return marker if isinstance(marker, dict) else {}


def _file_record(path: Path) -> dict[str, int]:
    """What the marker keeps of a file it lists."""
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "crc32": _crc32(path)}


def _changed(path: Path, info: object) -> bool:
    """True when a listed file was edited since longtune wrote it (a deleted one was not)."""
    if not path.is_file():
        return False
    if not isinstance(info, dict):
        return True
    st = path.stat()
    if st.st_size != info.get("size"):
        return True
    return st.st_mtime_ns != info.get("mtime_ns") and _crc32(path) != info.get("crc32")


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            crc = zlib.crc32(chunk, crc)
    return crc


def _files(folder: Path) -> list[str]:
    """Every file below ``folder``, as sorted relative POSIX paths."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir())


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (someone else's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale(final: Path) -> None:
    """Remove the temporary siblings (``NAME.tmp-PID-XXXXXXXX``, ``NAME.old-PID-XXXXXXXX``)
    that a killed process left while writing ``final``: only names :func:`atomic_dir` makes,
    only of processes that no longer exist."""
    pattern = re.compile(re.escape(final.name) + r"\.(tmp|old)-(\d+)-[0-9a-f]{8}")
    for sibling in final.parent.iterdir():
        match = pattern.fullmatch(sibling.name)
        if match and sibling.is_dir() and not pid_alive(int(match.group(2))):
            shutil.rmtree(sibling, ignore_errors=True)


def _set_modes(folder: Path, mode: int) -> None:
    """Give every folder below ``folder`` ``mode`` and every file the umask's file mode
    (``0644`` under umask ``022``): writers such as safetensors create files ``0600``, which a
    server running as another user cannot read."""
    file_mode = mode & 0o666
    for path in folder.rglob("*"):
        if not path.is_symlink():
            os.chmod(path, mode if path.is_dir() else file_mode)


def _default_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o777 & ~umask


@contextmanager
def atomic_dir(
    final: str | Path,
    *,
    kind: str,
    sources: Iterable[str | Path] = (),
    overwrite: bool = False,
) -> Iterator[Path]:
    """Build a folder under a temporary sibling name and move it into place only when complete.

    Args:
        final: the output folder (checked with :func:`check_output_dir` first).
        kind: what the folder is (``hf``, ``native``, ``adapter``, ``asset``), recorded in the
            marker.
        sources: folders the output is made from.
        overwrite: replace a folder longtune wrote before.

    Yields:
        The temporary folder to fill. On success the marker is added, an existing ``final``
        (empty, or longtune's own) is moved aside, the new folder renamed to ``final`` and the
        old one removed; on error the temporary folder is removed and ``final`` is untouched.
    """
    sources = list(sources)
    final = check_output_dir(final, sources, overwrite)
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(final)
    mode = stat.S_IMODE(final.stat().st_mode) if final.is_dir() else _default_mode()
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        yield tmp
        _set_modes(tmp, mode)
        files = {name: _file_record(tmp / name) for name in _files(tmp)}
        marker = {"written_by": "longtune", "kind": kind, "time": time.time(), "files": files}
        (tmp / OUTPUT_MARKER).write_text(json.dumps(marker) + "\n")
        os.chmod(tmp, mode)
        # Checked again: the folder may have changed while the output was being built.
        check_output_dir(final, sources, overwrite)
        old = None
        if final.exists():
            old = final.with_name(f"{final.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Replace ``path`` with ``text`` atomically: a reader sees the old file or the new one,
    never a torn one, and a crash leaves the old one.

    The text goes to a temporary sibling (named for this process and thread, so concurrent
    writers never share one), which is then renamed over ``path``.

    Args:
        path: the file to write (its folder must exist).
        text: the new content.
    """
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def check_writable(folder: str | Path, what: str) -> Path:
    """Check, without creating or writing anything, that files can be written in ``folder``.

    A folder that does not exist yet is checked through its nearest existing parent (where it
    would be created).

    Args:
        folder: the folder (an output or cache folder).
        what: what it is for, e.g. ``"output.dir"`` (named in the error).

    Returns:
        The folder.

    Raises:
        OutputDirError: one line naming the folder and the cause (read-only file system,
            permission denied, a file in the way).
    """
    path = Path(folder).absolute()
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputDirError(
            f"cannot write {what} in {path}: {existing} is a file, not a folder; "
            "choose another folder"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        read_only = os.statvfs(existing).f_flag & os.ST_RDONLY
        code = errno.EROFS if read_only else errno.EACCES
        raise OutputDirError(describe_os_error(OSError(code, "", str(existing)), what))
    return path


def probe_write(folder: str | Path, nbytes: int = 4 << 20) -> OSError | None:
    """Try to write (and fsync) ``nbytes`` in ``folder``: the OSError it fails with, or None.

    Some writers report a full disk as something else (``torch.save``'s zip writer raises
    ``RuntimeError: ... unexpected pos``); a probe right after the failure tells what it was.
    """
    probe = Path(folder) / f".longtune-probe-{os.getpid()}"
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * nbytes)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        e.filename = str(folder)
        return e
    finally:
        try:
            probe.unlink()
        except OSError:
            pass
    return None


def describe_os_error(exc: OSError, what: str) -> str:
    """One line for a failed write: the folder and the cause, disk full said as such.

    Args:
        exc: the error raised by the filesystem.
        what: what was being written (e.g. ``"checkpoint"``).

    Returns:
        e.g. ``"cannot write checkpoint in runs/x/checkpoints: No space left on device; free
        space there or choose another folder"``.
    """
    where = str(exc.filename or "?")
    if exc.errno == errno.ENOSPC:
        cause = "No space left on device"
        fix = "free space there or choose another folder"
    elif exc.errno == errno.EDQUOT:
        cause = "disk quota exceeded"
        fix = "free space there or choose another folder"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        cause = "read-only file system" if exc.errno == errno.EROFS else "permission denied"
        fix = "make it writable or choose another folder"
    elif exc.errno in (errno.ENOTDIR, errno.EEXIST):
        cause = "a file is in the way of a folder"
        fix = "choose another folder"
    else:
        cause = exc.strerror or type(exc).__name__
        fix = "check the folder"
    if exc.filename is None:
        return f"cannot write {what}: {cause}; {fix}"
    folder = where if os.path.isdir(where) else os.path.dirname(where) or where
    return f"cannot write {what} in {folder}: {cause}; {fix}"
