"""The runs of a runs folder: list, inspect, launch, cancel, resume and delete them.

``longtune runs list|show|cancel|resume|delete``, ``longtune.runs.list() / get(name) /
cancel(name) / resume(name) / delete(name)`` and the web UI all use this module, and it reads runs only from their folders through
:mod:`longtune.run_dir` (``status.json``, ``config.yaml``, ``metrics.jsonl``, the launch record):
nothing is kept in memory, so runs started from the CLI, the Python API or the UI appear in all
three, and a restarted UI finds its runs again.

A run's displayed status is its ``status.json`` state, ``failed (<reason>)`` for a failed run
(``failed (process gone)`` when a ``running`` record's process no longer exists). A run started
by :func:`launch` whose trainer has not written a status yet is ``starting`` while the launched
process lives; if it ends without one, ``failed (exit code N)`` (or ``failed (process gone)``
when it was killed by a signal or nobody saw it end), with the last line of its output as the
error.

:func:`launch` starts ``python -m longtune train RUN/config.yaml`` (or the same under
``torch.distributed.run`` for several processes) with an argument list, never a shell, as the
leader of a new session, its output going to ``RUN/launch.log``, once the trainer's own
preflight checks passed (nothing is created for a launch they refuse). :func:`cancel` sends
SIGTERM to the run's process group, which the trainer answers by finishing its step, writing a
checkpoint and ending with status ``cancelled``. :func:`delete` removes a run folder that is not
running (only a marked one, under its lock).

Times: ``started_at`` is the run's first start (a resumed run keeps it), ``duration_s`` the wall
time since then, ``train_time_s`` the training time of all its processes together (the
metrics records' ``elapsed_s``), ``eta_s`` the time a running run still needs at its average
step time.
"""

from __future__ import annotations

import builtins
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from longtune.run_dir import (
    RunDir,
    RunLockedError,
    delete_run,
    end_launch,
    latest_metrics,
    launching,
    lock_run,
    mark_run,
    read_launch,
    read_run_state,
    read_status,
    stop_target,
    tail_lines,
    write_launch,
)
from longtune.train.config import Duration, JobConfig, save_config
from longtune.train.metrics import format_duration

DEFAULT_RUNS_DIR = "runs"
_RESUMING = threading.Lock()  # resumes in this process (the web UI's threads), one at a time
#: A run name: a plain folder name (letters, digits, ``.``, ``_``, ``-``; not starting with ``.``).
NAME_PATTERN = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}")
#: Failure reasons a resume with the same settings meets again at once (found before training).
SAME_AGAIN_REASONS = ("config error", "data error")
#: Bytes read from the start of ``metrics.jsonl`` for the first train record (the ETA's origin).
_HEAD_BYTES = 64 * 1024


@dataclass
class RunInfo:
    """One run as read from its folder."""

    name: str
    path: Path
    state: str
    """``running``, ``succeeded``, ``failed``, ``cancelled``, ``starting`` or ``unknown``."""
    status: str
    """What to show: the state, with the reason for a failed run (``failed (process gone)``)."""
    model: str | None = None
    data: list[str] = field(default_factory=builtins.list)
    step: int | None = None
    total_steps: int | None = None
    train_loss: float | None = None
    eval_loss: float | None = None
    started_at: float | None = None
    """Unix time the run (or its launch) first started; a resumed run keeps its first start."""
    duration_s: float | None = None
    """Wall time from the first start to the end (or to now, while it runs)."""
    train_time_s: float | None = None
    """Training time of all the run's processes together (its last metrics record's
    ``elapsed_s``)."""
    eta_s: float | None = None
    """Time a running run still needs: its average step time so far times the steps left."""
    reason: str | None = None
    """Why a failed run failed (``config error``, ``process gone``, ``exit code 2``, ...)."""
    error: str | None = None
    """The one-line reason of a failed run."""
    message: str | None = None
    """What the trainer said at the end (e.g. where a cancelled run checkpointed)."""
    pid: int | None = None
    pgid: int | None = None
    host: str | None = None
    export_dir: Path | None = None
    """The exported Hugging Face folder, once written."""
    export_check: dict[str, Any] | None = None

    @property
    def resume_refusal(self) -> str | None:
        """Why a Resume with the run's own settings would stop again at once, or None.

        A run that failed on its settings or its data (``config error``, ``data error``) meets
        the same error when started again with the same ``config.yaml``.
        """
        if self.state != "failed" or self.reason not in SAME_AGAIN_REASONS:
            return None
        return (
            f"run {self.name!r} stopped on a {self.reason}: a Resume with the same settings "
            "would stop the same way; fix the settings or the data and start a new run, or "
            "resume it from the command line with corrected settings: "
            f"longtune train {RunDir(self.path).config} --section.key=value"
        )

    @property
    def progress(self) -> float | None:
        """Fraction of the optimizer steps done, when the total is known."""
        if self.step is None or not self.total_steps:
            return None
        return min(1.0, self.step / self.total_steps)

    def to_json(self) -> dict[str, Any]:
        """A JSON-safe dict (paths as strings, ``progress`` included)."""
        out = asdict(self)
        out["path"] = str(self.path)
        out["export_dir"] = str(self.export_dir) if self.export_dir else None
        out["progress"] = self.progress
        out["resume_refusal"] = self.resume_refusal
        return out


def check_name(name: str) -> str:
    """Check that ``name`` is a plain run-folder name.

    Args:
        name: the run name.

    Returns:
        The name.

    Raises:
        ValueError: naming the rule, for names with path separators, leading dots and the like.
    """
    if not NAME_PATTERN.fullmatch(name):
        raise ValueError(
            f"run name {name!r} is not valid: use 1-100 letters, digits, '.', '_' or '-', "
            "not starting with '.'"
        )
    return name


def list(runs_dir: str | Path = DEFAULT_RUNS_DIR) -> builtins.list[RunInfo]:  # noqa: A001
    """Every run in ``runs_dir``, newest first.

    Args:
        runs_dir: the folder holding run folders (a missing folder holds none).

    Returns:
        One :class:`RunInfo` per longtune run folder.
    """
    root = Path(runs_dir)
    if not root.is_dir():
        return []
    runs = [
        _readable_info(RunDir(p))
        for p in sorted(root.iterdir())
        if p.is_dir() and RunDir(p).is_run()
    ]
    return sorted(runs, key=lambda r: -(r.started_at or 0.0))


def get(name: str, runs_dir: str | Path = DEFAULT_RUNS_DIR) -> RunInfo:
    """One run of ``runs_dir``.

    Args:
        name: the run's folder name.
        runs_dir: the runs folder.

    Returns:
        The run.

    Raises:
        FileNotFoundError: no such run (the message lists the runs there).
        ValueError: ``name`` is not a plain folder name.
    """
    run = RunDir(Path(runs_dir) / check_name(name))
    if not run.path.is_dir() or not run.is_run():
        names = [r.name for r in list(runs_dir)]
        known = ", ".join(names[:20]) if names else "none"
        raise FileNotFoundError(f"no run {name!r} in {runs_dir} (runs there: {known})")
    return _readable_info(run)


def cancel(name: str, runs_dir: str | Path = DEFAULT_RUNS_DIR, now: bool = False) -> RunInfo:
    """Ask a running run to stop: SIGTERM to its process group (SIGQUIT with ``now``).

    On SIGTERM the trainer finishes the current step, writes a checkpoint and ends with status
    ``cancelled``; asking again changes nothing (the checkpoint it is writing is never cut
    short). On SIGQUIT it stops at once, without a checkpoint of the current step (the newest
    complete one stays). The process signalled is the run's own, proven as
    :func:`longtune.run_dir.stop_target` says; a run launched by :func:`launch` is signalled
    through its launched process's group (under ``torch.distributed.run`` that process forwards
    the signal to every rank).

    Args:
        name: the run's folder name.
        runs_dir: the runs folder.
        now: stop at once instead of after a checkpoint.

    Returns:
        The run as read just after the signal was sent.

    Raises:
        ValueError: the run is not running, runs on another host, or no running process is
            provably its own.
        FileNotFoundError: no such run.
    """
    info = get(name, runs_dir)
    if info.state not in ("running", "starting"):
        raise ValueError(f"run {name!r} is not running (status: {info.status}); nothing to cancel")
    if info.host != socket.gethostname():
        raise ValueError(
            f"run {name!r} runs on host {info.host!r}, not this one "
            f"({socket.gethostname()!r}); cancel it there"
        )
    run = RunDir(info.path)
    group, pid = stop_target(run)
    signum = signal.SIGQUIT if now else signal.SIGTERM
    try:
        if group is not None and group != os.getpgid(0):
            os.killpg(group, signum)
        elif pid is not None:
            os.kill(pid, signum)
        else:
            raise ValueError(
                f"run {name!r}: no running process is provably this run's own (the trainer "
                "holding its lock, with the start time and command line it recorded); not "
                "signalling anything"
            )
    except ProcessLookupError:
        pass  # it ended meanwhile; the status says how
    except PermissionError:
        raise ValueError(
            f"run {name!r} runs as another user; this user may not signal it"
        ) from None
    return _info(run)


def launch(cfg: JobConfig, nproc: int = 1) -> RunInfo:
    """Start a training run in a new folder as a background process.

    First the checks ``longtune train`` makes before it starts anything
    (:func:`longtune.train.preflight.preflight` for ``nproc`` processes: the model folder, every
    data file and line, the output and cache folders, the parallel layout): a launch they refuse
    creates nothing. Then the folder ``cfg.output.dir`` is created (it must not exist) and the
    config written to it, so the folder is a run from the start and a launch that still fails
    in the trainer ends with a ``failed`` status (or, if the trainer never got that far, its
    output's last line).

    Args:
        cfg: the validated job config; ``output.dir`` is the new run folder.
        nproc: processes on this machine (more than one: ``torch.distributed.run``).

    Returns:
        The run, ``starting``.

    Raises:
        FileExistsError: the run folder exists already.
        ValueError, FileNotFoundError, NotImplementedError: the preflight's one-line refusal
            (naming the setting, file or line), or ``nproc`` below 1.
        OSError: a folder the checks had to read could not be read.
    """
    if nproc < 1:
        raise ValueError(f"nproc={nproc} must be >= 1")
    run = RunDir(Path(cfg.output.dir))
    if run.path.exists():
        raise FileExistsError(_exists_message(run))
    # Imports torch: only when a run is launched (listing runs stays light).
    from longtune.train.preflight import preflight

    preflight(cfg, world_size=nproc)
    run.path.parent.mkdir(parents=True, exist_ok=True)
    try:
        run.path.mkdir()
    except FileExistsError:
        raise FileExistsError(_exists_message(run)) from None
    mark_run(run)
    save_config(cfg, run.config)
    return _start(run, nproc)


def _exists_message(run: RunDir) -> str:
    return (
        f"{run.path} exists already; choose another run name (longtune never writes into a "
        "folder it did not create for this run)"
    )


def resume(name: str, runs_dir: str | Path = DEFAULT_RUNS_DIR, nproc: int | None = None) -> RunInfo:
    """Start a stopped run (cancelled, failed) again in its folder, as :func:`launch` does.

    The trainer continues from the run's newest complete checkpoint (``checkpoint.resume=auto``
    over the run's own ``config.yaml``), or starts it over when there is none.

    Args:
        name: the run's folder name.
        runs_dir: the runs folder.
        nproc: processes; default: as the run was launched (1 for a run started elsewhere).

    Returns:
        The run, ``starting``.

    Raises:
        ValueError: the run is running or finished.
        FileNotFoundError: no such run, or it has no ``config.yaml``.
    """
    run = RunDir(get(name, runs_dir).path)
    # A double-clicked Resume, or two `longtune runs resume` at once: one process.
    with _RESUMING, launching(run):
        info = get(name, runs_dir)
        if info.state not in ("cancelled", "failed"):
            raise ValueError(
                f"run {name!r} is {info.status}; only a cancelled or failed run can be resumed"
            )
        run = RunDir(info.path)
        if not run.config.is_file():
            raise FileNotFoundError(
                f"run {name!r} has no {run.config.name}; it cannot be restarted"
            )
        _check_ended(run, name, "resume")
        if nproc is None:
            nproc = int((read_launch(run) or {}).get("nproc", 1))
        # The folder as it is now (it may have been moved since the run was written).
        extra = ["--checkpoint.resume=auto", f"--output.dir={run.path.resolve()}"]
        return _start(run, nproc, extra)


def delete(name: str, runs_dir: str | Path = DEFAULT_RUNS_DIR) -> RunInfo:
    """Delete a run's folder: its checkpoints, export, metrics and logs.

    Only a longtune run folder (it holds the run marker, and nothing a run does not write) that
    is not running, starting or still stopping; the folder's lock is held while it is deleted,
    so a run that starts meanwhile is refused by the lock (or refuses the delete).

    Args:
        name: the run's folder name.
        runs_dir: the runs folder.

    Returns:
        The run as it was just before it was deleted.

    Raises:
        ValueError: the run is running or starting or still stopping, or the folder is not a
            longtune run folder, or holds files a run does not write (nothing is deleted).
        FileNotFoundError: no such folder.
    """
    run = RunDir(Path(runs_dir) / check_name(name))
    if run.path.exists() and not run.is_run():
        raise ValueError(
            f"{run.path} is not a longtune run folder (it has no run marker); not deleting it: "
            "remove it yourself if you mean to"
        )
    with _RESUMING:  # not while this process resumes it
        info = get(name, runs_dir)
        if info.state in ("running", "starting"):
            raise ValueError(
                f"run {name!r} is {info.status}; cancel it and wait for it to end before "
                "deleting it"
            )
        try:
            _check_ended(run, name, "delete")
            delete_run(run)
        except RunLockedError:
            raise ValueError(
                f"run {name!r} is in use by a process that started meanwhile; not deleting it"
            ) from None
    return info


def _check_ended(run: RunDir, name: str, action: str) -> None:
    """Refuse to resume or delete a run whose earlier process has not ended yet (it may still
    be writing its last checkpoint after recording its end)."""
    message = f"run {name!r} is still stopping; {action} it once its process has ended"
    if (read_launch(run) or {}).get("alive"):
        raise ValueError(message)
    try:
        lock_run(run).release()
    except RunLockedError:
        raise ValueError(message) from None


def _start(run: RunDir, nproc: int, extra: builtins.list[str] | None = None) -> RunInfo:
    """Start ``longtune train RUN/config.yaml`` for ``run`` in a new session; record it."""
    if nproc < 1:
        raise ValueError(f"nproc={nproc} must be >= 1")
    argv = [sys.executable, "-m", "longtune", "train", str(run.config), *(extra or [])]
    if nproc > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        argv = [*launcher, "--nproc-per-node", str(nproc), *argv[1:]]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(run.launch_log, "ab") as out:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    write_launch(run, proc.pid, argv=argv, nproc=nproc)
    # Reap the process when it ends (no zombie shows as alive) and record its exit code.
    threading.Thread(target=_reap, args=(proc, run), daemon=True).start()
    return _info(run)


def _reap(proc: subprocess.Popen, run: RunDir) -> None:
    code = proc.wait()
    end_launch(run, proc.pid, code)


def tail_log(run_path: str | Path, lines: int = 40) -> str:
    """The last ``lines`` lines of the run's ``train.log`` (or of its launch output, when the
    trainer has written no log yet).

    Args:
        run_path: the run folder.
        lines: how many lines.

    Returns:
        The text ('' when there is none).
    """
    run = RunDir(run_path)
    for path in (run.log, run.launch_log):
        if path.is_file() and path.stat().st_size:
            return "\n".join(tail_lines(path, lines))
    return ""


def launch_output(run_path: str | Path, lines: int = 40) -> str:
    """The last ``lines`` lines of a launched run's stdout and stderr (``launch.log``).

    Args:
        run_path: the run folder.
        lines: how many lines.

    Returns:
        The text ('' when the run was not launched by :func:`launch`).
    """
    path = RunDir(run_path).launch_log
    return "\n".join(tail_lines(path, lines))


def _readable_info(run: RunDir) -> RunInfo:
    """:func:`_info`, or an ``unknown`` run when its files hold values of the wrong types (a
    hand-edited ``status.json``): one odd folder does not hide the others."""
    try:
        return _info(run)
    except (TypeError, ValueError, AttributeError) as e:
        return RunInfo(
            name=run.name,
            path=run.path,
            state="unknown",
            status="unknown",
            error=f"unreadable run files: {e}",
        )


def _info(run: RunDir) -> RunInfo:
    """Read everything shown about one run from its folder."""
    cfg = _read_config(run)
    state = read_run_state(run)
    info = RunInfo(
        name=run.name,
        path=run.path,
        state=state.state,
        status=state.status,
        step=state.step,
        total_steps=state.total_steps,
        started_at=state.started_at,
        error=state.error,
        message=state.message,
        pid=state.pid,
        pgid=state.pgid,
        host=state.host,
    )
    if state.state == "failed" and state.status.startswith("failed ("):
        info.reason = state.status[len("failed (") : -1]
    # The first start: a resumed run's status carries it over, and until the resumed process
    # writes its own status, the earlier one still tells it.
    earlier = read_status(run) or {}
    starts = [state.started_at, earlier.get("first_started_at"), earlier.get("started_at")]
    known = [t for t in starts if t is not None]
    info.started_at = min(known) if known else None
    if info.started_at is not None:
        running = state.state in ("running", "starting")
        ended_at = time.time() if running else state.ended_at
        if ended_at is not None:
            info.duration_s = max(0.0, ended_at - info.started_at)
    model, data = _section(cfg, "model"), _section(cfg, "data")
    info.model = model.get("path") if isinstance(model.get("path"), str) else None
    train_files = data.get("train")
    if isinstance(train_files, builtins.list):
        info.data = [f for f in train_files if isinstance(f, str)]
    has_eval = bool(data.get("eval"))
    train, eval_, last_step = latest_metrics(run, want_eval=has_eval)
    info.train_loss = train["loss"] if train else None
    info.eval_loss = eval_["eval_loss"] if eval_ else None
    info.train_time_s = train.get("elapsed_s") if train else None
    if last_step is not None:
        info.step = max(info.step or 0, last_step)
    if info.total_steps is None:
        try:
            duration = Duration.parse(str(_section(cfg, "train").get("duration", "")))
        except ValueError:
            duration = None
        info.total_steps = duration.value if duration and duration.unit == "st" else None
    if info.state == "running" and train is not None and info.total_steps:
        info.eta_s = _eta(_first_train_record(run), train, info.total_steps)
    if run.export_check.is_file():
        try:
            info.export_check = json.loads(run.export_check.read_text())
        except json.JSONDecodeError:
            info.export_check = {"passed": False, "error": f"unreadable {run.export_check}"}
    if run.export.is_dir():
        info.export_dir = run.export
    return info


def _first_train_record(run: RunDir) -> dict[str, Any] | None:
    """The first train record of ``metrics.jsonl`` (read from the file's head only)."""
    try:
        with open(run.metrics, "rb") as f:
            head = f.read(_HEAD_BYTES)
    except FileNotFoundError:
        return None
    for line in head.split(b"\n"):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # empty, or cut at the end of the head
            continue
        if isinstance(rec, dict) and rec.get("kind", "train") == "train" and "loss" in rec:
            return rec
    return None


def _eta(first: dict[str, Any] | None, last: dict[str, Any], total_steps: int) -> float | None:
    """Seconds until ``total_steps`` at the average step time from ``first`` to ``last`` (as
    the training log's progress line computes it: training time, so the pauses between a run's
    processes and the first step's start-up do not count). None when it cannot be told."""
    step, elapsed = last.get("step"), last.get("elapsed_s")
    if not isinstance(step, int) or not isinstance(elapsed, (int, float)):
        return None
    if first is not None and isinstance(first.get("elapsed_s"), (int, float)):
        first_step = first.get("step")
        if isinstance(first_step, int) and step > first_step:
            per_step = (elapsed - first["elapsed_s"]) / (step - first_step)
            return max(0.0, per_step * (total_steps - step))
    if step > 0:
        return max(0.0, elapsed / step * (total_steps - step))
    return None


def _section(cfg: dict[str, Any], name: str) -> dict[str, Any]:
    """One section of a config read from a run folder ({} when absent or not a mapping)."""
    section = cfg.get(name)
    return section if isinstance(section, dict) else {}


def _read_config(run: RunDir) -> dict[str, Any]:
    try:
        data = yaml.safe_load(run.config.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def format_loss(value: float | None) -> str:
    """A loss for display (``-`` when there is none).

    Args:
        value: the loss.

    Returns:
        Four decimals, or ``-``.
    """
    return "-" if value is None else f"{value:.4f}"


def format_time(timestamp: float | None) -> str:
    """A Unix time as local ``YYYY-MM-DD HH:MM:SS`` (``-`` when there is none).

    Args:
        timestamp: seconds since the epoch.

    Returns:
        The text.
    """
    if timestamp is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))


def format_progress(info: RunInfo) -> str:
    """``12/200`` steps (``-`` before the first).

    Args:
        info: the run.

    Returns:
        The text.
    """
    if info.step is None:
        return "-"
    return f"{info.step}/{info.total_steps}" if info.total_steps else str(info.step)


def format_table(runs: builtins.list[RunInfo]) -> str:
    """The runs as a text table (``longtune runs list``).

    Args:
        runs: from :func:`list`.

    Returns:
        One header line and one line per run.
    """
    header = (
        "NAME",
        "STATUS",
        "STEP",
        "TRAIN LOSS",
        "EVAL LOSS",
        "STARTED",
        "WALL",
        "TRAINING",
        "MODEL",
    )
    rows = [header] + [
        (
            r.name,
            r.status,
            format_progress(r),
            format_loss(r.train_loss),
            format_loss(r.eval_loss),
            format_time(r.started_at),
            _seconds(r.duration_s),
            _seconds(r.train_time_s),
            r.model or "-",
        )
        for r in runs
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)) + "  " + row[-1]
        for row in rows
    )


def _seconds(value: float | None) -> str:
    return "-" if value is None else format_duration(value)


def format_details(info: RunInfo) -> str:
    """One run as ``key: value`` lines (``longtune runs show``).

    Args:
        info: the run.

    Returns:
        The text.
    """
    check = info.export_check
    lines = [
        ("name", info.name),
        ("folder", str(info.path)),
        ("status", info.status),
        ("error", info.error),
        ("message", info.message if info.message != info.error else None),
        ("model", info.model),
        ("data", ", ".join(info.data) or None),
        ("step", format_progress(info)),
        ("train loss", format_loss(info.train_loss)),
        ("eval loss", format_loss(info.eval_loss)),
        ("started", format_time(info.started_at)),
        ("wall time", None if info.duration_s is None else _seconds(info.duration_s)),
        ("training", None if info.train_time_s is None else _seconds(info.train_time_s)),
        ("eta", None if info.eta_s is None else _seconds(info.eta_s)),
        ("process", f"pid {info.pid}, group {info.pgid} on {info.host}" if info.pid else None),
        ("export", str(info.export_dir) if info.export_dir else None),
        ("self-check", None if check is None else ("passed" if check.get("passed") else "FAILED")),
    ]
    return "\n".join(f"{key + ':':<12} {value}" for key, value in lines if value is not None)
