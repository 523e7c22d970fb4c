"""The run folder's keeper: its lock and its ``status.json``, held by global rank 0.

Contract:

- A refusal writes nothing: a run refused by the preflight checks leaves no new folder and
  does not touch an existing run's status (a cancelled run stays cancelled, with its
  checkpoint). A folder that already is a longtune run is locked before the preflight checks
  read it (:meth:`RunKeeper.claim_existing`), so no other run changes it meanwhile; a new
  folder is created and locked only once the checks passed (:meth:`RunKeeper.claim`), which
  also records the run as ``running``.
- One writer per folder: the lock (``run_dir.lock_run``) is held until the process ends. A run
  refused by the lock writes nothing into the folder.
- The folder gets the run marker when it is claimed; a folder that holds other files and no
  marker is refused by the preflight (``run_dir.check_run_folder``).
- ``running`` (pid, host, the process group or process to signal, ``started_at``,
  ``first_started_at``, ``step``, ``total_steps``) is rewritten after every optimizer step; the
  end is ``succeeded``, ``failed`` (``reason``, ``error``) or ``cancelled``. ``started_at`` is
  this process's start; ``first_started_at`` the run folder's first start, carried over from
  the status an earlier process of the run left (a resumed run keeps it).
- Other ranks keep nothing: every method is a no-op there.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from longtune.run_dir import RunDir, RunLock, lock_run, mark_run, read_status, write_status


class RunKeeper:
    """Lock and status of one run folder, kept by global rank 0.

    Args:
        run: the run folder.
        rank: this process's global rank.
    """

    def __init__(self, run: RunDir, rank: int) -> None:
        self.run = run
        self.active = rank == 0
        self.lock: RunLock | None = None
        self.started_at = time.time()
        self.first_started_at: float | None = None
        """The run's first start, when an earlier process of it left a status (see claim)."""
        self._running: dict[str, Any] = {}
        self._ended = False
        # end() may come from the signal watcher thread (a hard exit) while the main thread
        # writes progress: one write at a time, and none after the end.
        self._writing = threading.RLock()  # re-entered by a signal handler on the main thread

    @classmethod
    def of(cls, output_dir: str) -> RunKeeper:
        """The keeper of ``output_dir`` for this process (global rank from ``RANK``)."""
        return cls(RunDir(output_dir), int(os.environ.get("RANK", "0")))

    def claim_existing(self) -> None:
        """Lock the folder now if it already is a longtune run (before reading it)."""
        if self.active and self.lock is None and self.run.is_run():
            self.lock = lock_run(self.run)
            self.first_started_at = _first_start(self.run)

    def claim(self) -> None:
        """Create and lock the folder (if not yet locked) and record the run as ``running``."""
        if not self.active:
            return
        if self.lock is None:
            self.run.path.mkdir(parents=True, exist_ok=True)
            self.lock = lock_run(self.run)
            self.first_started_at = _first_start(self.run)
        mark_run(self.run)
        self._running = {
            "started_at": self.started_at,
            "first_started_at": min(self.started_at, self.first_started_at or self.started_at),
            "step": 0,
            "total_steps": None,
        }
        if "TORCHELASTIC_RUN_ID" in os.environ:
            # Under torchrun each worker has its own session: stopping the run means signalling
            # torchrun, which forwards the signal to every worker; its group when it leads one,
            # else torchrun alone (its group may be a shell pipeline).
            parent = os.getppid()
            if os.getpgid(parent) == parent:
                self._running["pgid"] = parent
            else:
                self._running["signal_pid"] = parent
        self._write("running", **self._running)

    def progress(self, step: int, total_steps: int | None = None) -> None:
        """Record the current step (cheap: one small atomic file write)."""
        with self._writing:
            if not self._holds() or self._ended:
                return
            self._running["step"] = step
            if total_steps is not None:
                self._running["total_steps"] = total_steps
            self._write("running", **self._running)

    def end(self, state: str, **fields: Any) -> None:
        """Record the end of the run (``succeeded``, ``failed`` or ``cancelled``); the first
        end recorded stays. Nothing is written for a run refused before it was claimed (the
        folder's earlier status, e.g. ``cancelled`` with its checkpoint, stays as it was)."""
        with self._writing:
            if not self._holds() or self._ended or not self._running:
                return
            self._ended = True
            kept = ("started_at", "first_started_at", "step", "total_steps")
            record = {k: v for k, v in self._running.items() if k in kept}
            self._write(state, **record, **fields, ended_at=time.time())

    def release(self) -> None:
        """Drop the lock (the process ending does the same)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def _holds(self) -> bool:
        return self.active and self.lock is not None

    def _write(self, state: str, **fields: Any) -> None:
        write_status(self.run, state, **fields)


def _first_start(run: RunDir) -> float | None:
    """The first start recorded by an earlier process of the run (None when there is none)."""
    status = read_status(run) or {}
    for key in ("first_started_at", "started_at"):
        value = status.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None
