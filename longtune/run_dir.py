"""The run folder: its layout and its status. The one owner of both.

The trainer writes a run folder; the CLI (``longtune runs``), the Python API and the web UI read
runs through this module and nothing else. Layout of ``RUN/``::

    .longtune-output     the marker that makes a folder a run (kind ``run``): longtune reads,
                         locks, resumes and deletes only folders that hold it
    config.yaml          the resolved run config (paths absolute)
    metrics.jsonl        one JSON record per optimizer step (+ ``"kind": "eval"`` records)
    train.log            the rank-0 log (appended across resumes)
    status.json          what the run is doing now (below), rewritten atomically
    run.lock             held (``flock``) by the training process for the whole run
    checkpoints/step-N/  atomic, resumable checkpoints
    source/              the source model's config, tokenizer files and tensor layout
    hf/                  the exported Hugging Face folder
    export_check.json    the export's self-check
    model.gguf           the GGUF export (``export.formats`` with ``gguf`` only)
    adapter/             the PEFT adapter folder (LoRA runs with ``export.lora_adapter`` only)
    launch.json          written only for a run launched by ``longtune.runs.launch`` (the web UI,
                         ``longtune runs resume``): the launched process (pid, pgid, host, start
                         time, argv, exit code)
    launch.log           that process's stdout and stderr
    launch.lock          held (``flock``) while a process is being launched for the run, so
                         that two resumes at once start one process
    demo_summary.json    the demo's before/after record (``longtune demo`` only)
    tensorboard/         TensorBoard event files (``output.tensorboard=true`` only)

``status.json`` holds ``state`` (one of :data:`STATES`) and, while running, ``pid``, ``pgid``,
``host`` and ``proc_start`` (the process's start time, so a reused pid is not mistaken for the
run), ``started_at``, ``updated_at``, ``step`` and ``total_steps``; ``failed`` runs add
``reason`` (one of :data:`FAIL_REASONS`) and ``error`` (the message). ``pgid`` is recorded
only for a process that leads its own group (or a torchrun that does): another group may be a
shell pipeline, which a cancel must not signal; ``signal_pid`` is then the process to signal.
A ``running`` status whose process is gone (on this host) reads as ``failed`` with reason
``process gone``: a killed run never shows as running. A process that has exited but not yet
been reaped by its parent (a zombie) counts as gone.

One writer per run folder: the training process (global rank 0) holds an exclusive ``flock`` on
``run.lock`` for the whole run (:func:`lock_run`); the OS releases it when the process dies, so
``kill -9`` never leaves a folder locked. The file names the holder's pid and host.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import signal
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from longtune.fsutil import OUTPUT_MARKER, atomic_write_text

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
LOG = "train.log"
STATUS = "status.json"
LOCK = "run.lock"
CHECKPOINTS = "checkpoints"
SOURCE = "source"
EXPORT = "hf"
EXPORT_CHECK = "export_check.json"
GGUF = "model.gguf"
ADAPTER = "adapter"
LAUNCH = "launch.json"
LAUNCH_LOG = "launch.log"
LAUNCH_LOCK = "launch.lock"
DEMO_SUMMARY = "demo_summary.json"
TENSORBOARD = "tensorboard"

STATES = ("running", "succeeded", "failed", "cancelled")
FAIL_REASONS = ("nan", "oom", "data error", "config error", "output error", "process gone", "error")
RUN_KIND = "run"
"""The ``kind`` in the :data:`~longtune.fsutil.OUTPUT_MARKER` of a run folder."""
_ENTRIES = (
    OUTPUT_MARKER,
    CONFIG,
    METRICS,
    LOG,
    STATUS,
    LOCK,
    CHECKPOINTS,
    SOURCE,
    EXPORT,
    EXPORT_CHECK,
    ADAPTER,
    LAUNCH,
    LAUNCH_LOG,
    LAUNCH_LOCK,
    DEMO_SUMMARY,
    TENSORBOARD,
)
# What a run writes: its entries and their temporary siblings (atomic writes of a killed process).
_RUN_ENTRY = re.compile(
    "(?:" + "|".join(re.escape(e) for e in _ENTRIES) + r")(?:\.(?:tmp|old)(?:-[0-9a-f-]+)?)?"
)


@dataclass(frozen=True)
class RunDir:
    """Paths of one run folder (nothing is created by building one)."""

    path: Path

    def __init__(self, path: str | Path) -> None:
        object.__setattr__(self, "path", Path(path))

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def config(self) -> Path:
        return self.path / CONFIG

    @property
    def metrics(self) -> Path:
        return self.path / METRICS

    @property
    def log(self) -> Path:
        return self.path / LOG

    @property
    def status_file(self) -> Path:
        return self.path / STATUS

    @property
    def lock(self) -> Path:
        return self.path / LOCK

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def source(self) -> Path:
        return self.path / SOURCE

    @property
    def export(self) -> Path:
        return self.path / EXPORT

    @property
    def export_check(self) -> Path:
        return self.path / EXPORT_CHECK

    @property
    def gguf(self) -> Path:
        return self.path / GGUF

    @property
    def adapter(self) -> Path:
        return self.path / ADAPTER

    @property
    def demo_summary(self) -> Path:
        return self.path / DEMO_SUMMARY

    @property
    def tensorboard(self) -> Path:
        return self.path / TENSORBOARD

    @property
    def launch(self) -> Path:
        return self.path / LAUNCH

    @property
    def launch_log(self) -> Path:
        return self.path / LAUNCH_LOG

    @classmethod
    def of_checkpoint(cls, checkpoint: str | Path) -> RunDir:
        """The run folder a checkpoint ``RUN/checkpoints/step-N`` belongs to."""
        return cls(Path(checkpoint).parent.parent)

    def is_run(self) -> bool:
        """True when longtune made this folder a run: it holds the run marker. A
        ``config.yaml`` or ``status.json`` alone does not count: those names are common in
        users' folders."""
        try:
            marker = json.loads((self.path / OUTPUT_MARKER).read_text())
        except (OSError, ValueError):
            return False
        return isinstance(marker, dict) and marker.get("kind") == RUN_KIND

    def foreign_entries(self) -> list[str]:
        """The entries of the folder that a run does not write (sorted; [] when absent)."""
        if not self.path.is_dir():
            return []
        return sorted(p.name for p in self.path.iterdir() if not _RUN_ENTRY.fullmatch(p.name))


def mark_run(run: RunDir, made_by: str = "train") -> None:
    """Make ``run`` (an existing folder) a run folder: write its marker, if it has none.

    Args:
        run: the run folder.
        made_by: what made it (``train``; ``demo`` for the demo's own folder, the only kind
            ``longtune demo`` deletes).
    """
    marker = run.path / OUTPUT_MARKER
    if not marker.exists():
        record = {"written_by": "longtune", "kind": RUN_KIND, "made_by": made_by}
        _write_json(marker, {**record, "time": time.time()})


def made_by(run: RunDir) -> str | None:
    """What made a run folder (``train``, ``demo``), from its marker; None when unknown.

    A run the demo wrote before the marker said so is known by the demo's summary file, which
    no other run writes.
    """
    try:
        marker = json.loads((run.path / OUTPUT_MARKER).read_text())
    except (OSError, ValueError):
        return None
    maker = marker.get("made_by") if isinstance(marker, dict) else None
    return maker or ("demo" if run.demo_summary.is_file() else None)


def check_run_folder(run: RunDir) -> None:
    """Refuse to start a run in a folder that holds files longtune did not write.

    Raises:
        ValueError: the folder is not empty and not a run (names what is in it and what to do).
    """
    if run.path.exists() and not run.path.is_dir():
        raise ValueError(f"output.dir={run.path} exists and is not a folder; choose another one")
    if not run.path.is_dir() or run.is_run():
        return
    entries = sorted(p.name for p in run.path.iterdir())
    if entries:
        shown = ", ".join(entries[:5]) + (
            f" and {len(entries) - 5} more" if len(entries) > 5 else ""
        )
        raise ValueError(
            f"output.dir={run.path} is not empty and is not a longtune run (it holds {shown}); "
            "choose a new or empty folder"
        )


def process_start_time(pid: int) -> int | None:
    """The start time of process ``pid`` in clock ticks since boot (Linux), None if it is gone.

    With the pid it identifies a process: a pid reused by a later process has another start time.
    A process that has exited and waits to be reaped (a zombie) is gone.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name (field 2) is in parentheses and may hold spaces: split after it.
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):  # field 3: state; exited, not yet reaped
        return None
    return int(fields[19])  # field 22 overall


def write_status(run: RunDir, state: str, **fields: Any) -> dict[str, Any]:
    """Atomically replace ``status.json`` (a reader never sees a torn file).

    Args:
        run: the run folder (must exist).
        state: one of :data:`STATES`.
        **fields: the rest of the record (``step``, ``total_steps``, ``reason``, ...). For
            ``running``, ``pid``, ``pgid``, ``host`` and ``proc_start`` of the calling process
            are filled in unless given.

    Returns:
        The record written.
    """
    if state not in STATES:
        raise ValueError(f"run state {state!r} is not one of {', '.join(STATES)}")
    record: dict[str, Any] = {"state": state}
    if state == "running":
        pid = os.getpid()
        record.update(
            pid=pid,
            pgid=pid if os.getpgid(0) == pid else None,
            host=socket.gethostname(),
            proc_start=process_start_time(pid),
            cmdline=process_cmdline(pid),
        )
    record.update(fields)
    record["updated_at"] = time.time()
    _write_json(run.status_file, record)
    return record


def _write_json(path: Path, record: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(record, indent=1))


def read_status(run: RunDir) -> dict[str, Any] | None:
    """The run's status, or None when it has none (not started, or not a longtune run).

    A ``running`` record whose process no longer exists on this host comes back as
    ``{"state": "failed", "reason": "process gone", ...}`` (the file is not changed). A run on
    another host cannot be checked and is returned as written.
    """
    try:
        record = json.loads(run.status_file.read_text())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError):
        record = None
    if not isinstance(record, dict) or not isinstance(record.get("updated_at", 0), (int, float)):
        return {"state": "failed", "reason": "error", "error": f"unreadable {run.status_file}"}
    if record.get("state") == "running" and not _alive(record):
        record = {**record, "state": "failed", "reason": "process gone"}
    return record


def _alive(record: dict[str, Any]) -> bool:
    if record.get("host") != socket.gethostname():
        return True  # cannot tell from here
    pid = record.get("pid")
    if not isinstance(pid, int):
        return False
    start = process_start_time(pid)
    return start is not None and start == record.get("proc_start")


def stop_target(run: RunDir) -> tuple[int | None, int | None]:
    """``(process group, process)`` to signal to stop a run, either None when not proven.

    Only a process that provably is the run's own is ever named, since ``status.json`` and
    ``launch.json`` are plain files anyone may write:

    - the launched process (``longtune runs resume``, the web UI) while it lives: its start time
      and command line are the recorded ones and it leads its own group (under
      ``torch.distributed.run`` that process forwards the signal to every rank);
    - else the trainer of ``status.json``: it holds the run's lock (``/proc/locks``), its start
      time and command line are the recorded ones; the group is its own, or that of its parent
      (torchrun) when that leads its own; the process to signal is the trainer, or its parent
      when the status names it.
    """
    launch = read_launch(run)
    if launch is not None and launch.get("alive"):
        pid = launch.get("pid")
        own = isinstance(pid, int) and process_cmdline(pid) == launch.get("argv")
        return (pid, None) if own and _leads_group(pid) else (None, None)
    status = read_status(run) or {}
    pid = status.get("pid")
    if (
        not isinstance(pid, int)
        or lock_holder(run) != pid
        or process_start_time(pid) != status.get("proc_start")
        or process_cmdline(pid) != status.get("cmdline")
    ):
        return None, None
    parent = _parent(pid)
    group = status.get("pgid")
    if not (group == pid and _leads_group(pid)) and not (group == parent and _leads_group(group)):
        group = None
    signal_pid = status.get("signal_pid")
    if signal_pid is None:
        return group, pid
    return group, signal_pid if signal_pid == parent else None


def process_cmdline(pid: int) -> list[str] | None:
    """The command line of process ``pid`` (Linux), None if it is gone or unreadable."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return raw.decode(errors="replace").split("\0")[:-1] if raw else None


def lock_holder(run: RunDir) -> int | None:
    """The pid holding the run's ``flock`` (from ``/proc/locks``, Linux), None when unheld."""
    try:
        st = run.lock.stat()
        entries = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return None
    device = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in entries:
        fields = line.split()
        if "FLOCK" in fields and device in fields:
            return int(fields[fields.index(device) - 1])
    return None


def _leads_group(pid: int | None) -> bool:
    try:
        return isinstance(pid, int) and pid > 1 and os.getpgid(pid) == pid
    except OSError:
        return False


def _parent(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def write_launch(run: RunDir, pid: int, **fields: Any) -> dict[str, Any]:
    """Record the process launched for a run (``launch.json``, atomic).

    Args:
        run: the run folder (must exist).
        pid: the launched process (the leader of its own session and process group).
        **fields: the rest of the record (``argv``, ``nproc``, ...).

    Returns:
        The record written: ``pid``, ``pgid``, ``host``, ``proc_start``, ``launched_at`` and
        ``fields``.
    """
    record: dict[str, Any] = {
        "pid": pid,
        "pgid": os.getpgid(pid),
        "host": socket.gethostname(),
        "proc_start": process_start_time(pid),
        "launched_at": time.time(),
        **fields,
    }
    _write_json(run.launch, record)
    return record


def end_launch(run: RunDir, pid: int, exit_code: int) -> None:
    """Add the launched process's exit code and end time to ``launch.json``, unless the record
    is already another process's (a later launch of the same run).

    Args:
        run: the run folder, with a launch record.
        pid: the process that ended.
        exit_code: its return code (negative: killed by that signal).
    """
    record = json.loads(run.launch.read_text())
    if record.get("pid") != pid:
        return
    record.update(exit_code=exit_code, ended_at=time.time())
    _write_json(run.launch, record)


def read_launch(run: RunDir) -> dict[str, Any] | None:
    """The run's launch record plus ``alive`` (whether the launched process still runs), or None
    when the run was not launched by :func:`write_launch`'s caller.

    Args:
        run: the run folder.

    Returns:
        The record, with ``alive`` added (True for a process on another host: it cannot be told).
    """
    try:
        record = json.loads(run.launch.read_text())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError):
        record = None
    if not isinstance(record, dict) or not isinstance(record.get("launched_at", 0), (int, float)):
        return {"alive": False, "error": f"unreadable {run.launch}"}
    return {**record, "alive": "exit_code" not in record and _alive(record)}


def read_metrics(run: RunDir) -> list[dict[str, Any]]:
    """Every record of ``metrics.jsonl`` in order; a line torn by a crash mid-write is skipped.

    Args:
        run: the run folder.

    Returns:
        The records (``{"step", "kind": "train" | "eval", ...}``); empty when there are none.
    """
    try:
        text = run.metrics.read_text()
    except FileNotFoundError:
        return []
    records = []
    for line in text.splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a record torn by a crash while it was being written
            continue
    return records


def read_metrics_since(
    run: RunDir, cursor: str | None = None
) -> tuple[list[dict[str, Any]], str, bool]:
    """The records of ``metrics.jsonl`` added since ``cursor`` (a live view's incremental read).

    Args:
        run: the run folder.
        cursor: from an earlier call (None: from the start).

    Returns:
        ``(records, new cursor, reset)``; ``reset`` is True when the file was rewritten since
        the cursor (a resumed run drops records it will write again): the records are then all
        of them, and earlier ones are to be forgotten. A line still being written is left for
        the next call; a line torn by a crash is skipped.
    """
    path = run.metrics
    try:
        st = path.stat()
    except FileNotFoundError:
        return [], "0:0", cursor not in (None, "0:0")
    inode, offset = (int(x) for x in (cursor or f"{st.st_ino}:0").split(":"))
    reset = inode != st.st_ino or offset > st.st_size
    if reset:
        offset = 0
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read()
    complete = data[: data.rfind(b"\n") + 1]
    records = []
    for line in complete.decode("utf-8", errors="replace").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records, f"{st.st_ino}:{offset + len(complete)}", reset and cursor is not None


def latest_metrics(
    run: RunDir, want_eval: bool = True, block: int = 64 * 1024
) -> tuple[dict[str, Any] | None, dict[str, Any] | None, int | None]:
    """The last train record, the last eval record and the last step of ``metrics.jsonl``,
    read from the end (a long run's file is not read whole on every refresh of a runs list).

    Args:
        run: the run folder.
        want_eval: look for an eval record too (else stop at the last train record).
        block: bytes read at a time, backwards.

    Returns:
        ``(train record, eval record, step of the last record)``, None where there is none.
    """
    train = eval_ = last_step = None
    try:
        f = open(run.metrics, "rb")  # noqa: SIM115 (closed below)
    except FileNotFoundError:
        return None, None, None
    with f:
        pos = f.seek(0, os.SEEK_END)
        rest = b""
        while pos > 0 and not (train is not None and (eval_ is not None or not want_eval)):
            n = min(block, pos)
            pos -= n
            f.seek(pos)
            lines = (f.read(n) + rest).split(b"\n")
            rest = lines.pop(0) if pos > 0 else b""  # may be the tail of an earlier line
            for line in reversed(lines):
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:  # empty, torn, or still being written
                    continue
                if last_step is None:
                    last_step = rec.get("step")
                if rec.get("kind") == "eval":
                    eval_ = eval_ or rec
                elif "loss" in rec:
                    train = train or rec
    return train, eval_, last_step


def rewrite_metrics(run: RunDir, keep: Callable[[dict[str, Any]], bool]) -> None:
    """Keep only the records of ``metrics.jsonl`` that ``keep`` accepts (atomically; a line
    torn by a crash mid-write is dropped). Nothing happens when the run has no metrics.

    Args:
        run: the run folder.
        keep: called with each record.
    """
    if not run.metrics.exists():
        return
    kept = [rec for rec in read_metrics(run) if keep(rec)]
    atomic_write_text(run.metrics, "".join(json.dumps(rec) + "\n" for rec in kept))


def tail_lines(path: Path, lines: int, max_bytes: int = 256 * 1024) -> list[str]:
    """The last ``lines`` lines of a run's log file ([] when it does not exist).

    Progress lines rewritten with carriage returns keep what was last on screen.
    """
    try:
        with open(path, "rb") as f:
            f.seek(max(0, path.stat().st_size - max_bytes))
            text = f.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return []
    return [line.rsplit("\r", 1)[-1] for line in text.splitlines()[-lines:]]


@dataclass
class RunState:
    """What a run is doing, decided from its ``status.json`` and its launch record."""

    state: str = "unknown"
    """``running``, ``succeeded``, ``failed``, ``cancelled``, ``starting`` or ``unknown``."""
    status: str = "unknown"
    """What to show: the state, with the reason of a failed run (``failed (process gone)``)."""
    error: str | None = None
    """The one-line reason of a failed run."""
    message: str | None = None
    """What the trainer said at the end (e.g. where a cancelled run checkpointed)."""
    step: int | None = None
    total_steps: int | None = None
    pid: int | None = None
    pgid: int | None = None
    host: str | None = None
    started_at: float | None = None
    ended_at: float | None = None
    """When it ended (its last sign of life when it died without a word); None while it runs."""


# Exit codes of a process stopped by SIGINT/SIGTERM: the trainer's own (128 + signal) and a
# process killed by the signal before it could handle it (negative, from Popen).
_SIGNAL_EXITS = (130, 143, -signal.SIGINT, -signal.SIGTERM)


def read_run_state(run: RunDir) -> RunState:
    """The state of a run: from ``status.json``, else (a launched run whose trainer has not
    written one) from its launch record.

    A ``status.json`` older than the launch record belongs to an earlier attempt: until the new
    process writes its own, the run is ``starting`` while that process lives, and when it ended
    without a status, ``failed (exit code N)`` (or ``failed (process gone)`` when a signal
    killed it or nobody saw it end) with the last line of its output as the error, or
    ``cancelled`` when it was stopped by SIGINT/SIGTERM before it wrote anything.
    """
    status, launch = read_status(run), read_launch(run)
    launched_at = launch.get("launched_at") if launch else None
    if status is not None and launched_at and launched_at > status.get("updated_at", 0):
        status = None  # from an earlier attempt: the new process has not written yet
    if status is not None:
        out = _state_from_status(run, status, launch)
    elif launch is not None:
        out = _state_from_launch(run, launch)
    else:
        out = RunState(started_at=_mtime(run.config))
    if out.started_at is not None and out.state not in ("running", "starting"):
        if out.ended_at is None:  # gone without a word: its last sign of life
            times = (_mtime(run.metrics), _mtime(run.status_file))
            out.ended_at = max(filter(None, times), default=None)
    return out


def _state_from_status(
    run: RunDir, status: dict[str, Any], launch: dict[str, Any] | None
) -> RunState:
    state, reason = status.get("state", "unknown"), status.get("reason")
    out = RunState(
        state=state,
        status=f"failed ({reason})" if state == "failed" and reason else state,
        message=status.get("message"),
        step=status.get("step"),
        total_steps=status.get("total_steps"),
        pid=status.get("pid"),
        pgid=status.get("pgid"),
        host=status.get("host"),
        started_at=status.get("started_at") or (launch or {}).get("launched_at"),
    )
    if state == "failed":
        out.error = status.get("error") or _last_line(run)
    if state != "running" and reason != "process gone":
        out.ended_at = status.get("ended_at") or status.get("updated_at")
    elif state != "running":
        out.ended_at = (launch or {}).get("ended_at")
    return out


def _state_from_launch(run: RunDir, launch: dict[str, Any]) -> RunState:
    out = RunState(
        pid=launch.get("pid"),
        pgid=launch.get("pgid"),
        host=launch.get("host"),
        started_at=launch.get("launched_at"),
        ended_at=launch.get("ended_at"),
    )
    code = launch.get("exit_code")
    if launch.get("alive"):
        out.state = out.status = "starting"
    elif code in _SIGNAL_EXITS:  # stopped before it wrote a status: nothing ran
        out.state = out.status = "cancelled"
    else:  # ended before writing a status: show its last words
        out.state = "failed"
        gone = code is None or code < 0  # unseen, or killed by a signal
        out.status = "failed (process gone)" if gone else f"failed (exit code {code})"
        out.error = _last_line(run)
    return out


def _last_line(run: RunDir) -> str | None:
    """The last non-empty line of the launched process's output (its error, if it failed)."""
    lines = [line.strip() for line in tail_lines(run.launch_log, 20) if line.strip()]
    return lines[-1] if lines else None


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return None


@contextmanager
def launching(run: RunDir) -> Iterator[None]:
    """Hold the run's launch lock (``launch.lock``, ``flock``, waiting for another holder): one
    launch of a process for the run at a time, across processes. A second resume waits, then
    finds the first one's process in the launch record."""
    fd = os.open(run.path / LAUNCH_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor drops the flock


class RunLockedError(RuntimeError):
    """Another process holds the run folder's lock."""


class RunLock:
    """An exclusive ``flock`` on ``RUN/run.lock``, held until :meth:`release` or process exit.

    Use :func:`lock_run` to take one.
    """

    def __init__(self, run: RunDir, fd: int) -> None:
        self.run = run
        self._fd: int | None = fd

    def release(self) -> None:
        """Release the lock (the file stays; an unlocked file means nothing)."""
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


def lock_run(run: RunDir) -> RunLock:
    """Take the run folder's exclusive lock without waiting, and write our pid and host into it.

    Args:
        run: the run folder (must exist).

    Returns:
        The held lock.

    Raises:
        RunLockedError: naming the pid and host of the process that holds it.
    """
    fd = os.open(run.lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 4096).decode(errors="replace").strip()
        os.close(fd)
        try:
            who = json.loads(holder)
            text = f"pid {who['pid']} on host {who['host']}"
        except (json.JSONDecodeError, KeyError, TypeError):
            text = "another process"
        raise RunLockedError(
            f"{run.path} is in use by another longtune run ({text}); wait for it to end, stop "
            "it, or choose another output folder"
        ) from None
    os.ftruncate(fd, 0)
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
    os.pwrite(fd, json.dumps(holder).encode(), 0)
    return RunLock(run, fd)


def delete_run(run: RunDir, only_made_by: str | None = None) -> None:
    """Delete a run folder that longtune wrote (nothing when it does not exist).

    Args:
        run: the run folder.
        only_made_by: delete it only when this made it (``demo``: the demo replaces its own
            folder, never a real run).

    Raises:
        ValueError: when the folder is not a longtune run (or not one ``only_made_by`` made),
            holds files a run does not write, or is the current folder or above it (a user's
            file is never deleted).
        RunLockedError: when a run is still writing into it.
    """
    if not run.path.exists():
        return
    if not run.path.is_dir() or not run.is_run():
        raise ValueError(
            f"{run.path} is not a longtune run folder (no {OUTPUT_MARKER}); not deleting it: "
            "choose another output folder or remove it yourself"
        )
    if only_made_by is not None and made_by(run) != only_made_by:
        raise ValueError(
            f"{run.path} is a training run that {only_made_by} did not make; not deleting it: "
            "choose another output folder"
        )
    where = run.path.resolve()
    if where == Path.cwd().resolve() or where in Path.cwd().resolve().parents:
        raise ValueError(f"{run.path} is the current folder or holds it; not deleting it")
    foreign = run.foreign_entries()
    if foreign:
        raise ValueError(
            f"{run.path} holds files a longtune run does not write ({', '.join(foreign[:5])}); "
            "not deleting it: move them away or choose another output folder"
        )
    lock = lock_run(run)
    try:
        shutil.rmtree(run.path)
    finally:
        lock.release()
