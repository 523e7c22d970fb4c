"""Graceful stop on SIGTERM / SIGINT (Ctrl-C).

Contract:

- Outside the training loop (reading the config, tokenizing, loading the model, the final eval
  and export) the first signal raises :class:`RunCancelled` at once: the run ends promptly,
  without a traceback and without a new checkpoint.
- Inside the loop (:meth:`StopSignals.deferred`) the first signal is only recorded. The trainer
  adds the flag to a reduction it already makes every step, so every rank sees the request after
  the same step, finishes that step, writes a checkpoint and raises :class:`RunCancelled`.
- Asking again does not cut the checkpoint short: a repeated SIGTERM (``longtune runs cancel``
  twice, the web UI's Cancel) is ignored. A hard stop is asked for explicitly: a SIGINT after
  the first signal (Ctrl-C twice in the terminal) or a SIGQUIT (``longtune runs cancel --now``)
  ends the process at once (exit status ``128 + signal``, one line on stderr, no traceback) —
  or, for the Python API (``hard_exit=False``), raises :class:`RunCancelled` wherever the run
  is.
- Python runs signal handlers in the main thread between bytecodes, so a main thread blocked
  in a library call (waiting in ``init_process_group`` or a barrier for a rank that already
  left, a long tokenizer batch) would not see the signal at all. A watcher thread woken by the
  signal itself (``signal.set_wakeup_fd``) ends the process when, outside the loop, it is still
  there :data:`GRACE_S` after the signal (or at once on a hard stop). CLI only.

Under ``torchrun`` the workers run in their own sessions; torchrun forwards the signal it gets
(from Ctrl-C or ``kill -TERM -PGID``) to each worker once, and kills workers that have not ended
after its ``--shutdown-timeout`` (30 s by default).

Stdlib only, so the CLI can install it before importing torch.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)
GRACE_S = 5.0
"""Outside the loop: how long the process may take to end after a signal (CLI)."""


class RunCancelled(BaseException):  # noqa: N818 - like KeyboardInterrupt, not an Exception
    """The run was stopped by SIGTERM or SIGINT.

    A BaseException, like KeyboardInterrupt, so ``except Exception`` in library code does not
    swallow it.

    Args:
        signum: the signal.
        message: the one line to show.
        checkpoint: the checkpoint written on the way out, if any.
    """

    def __init__(self, signum: int, message: str, checkpoint: str | None = None) -> None:
        super().__init__(message)
        self.signum = signum
        self.checkpoint = checkpoint
        self.logged = False
        """True once the trainer logged the message (the CLI then prints nothing more)."""

    @property
    def exit_code(self) -> int:
        """130 for SIGINT, 143 for SIGTERM (the shell's ``128 + signal``)."""
        return 128 + self.signum


def signal_name(signum: int) -> str:
    """``SIGTERM`` for 15."""
    return signal.Signals(signum).name


def _hard_stop_name(signum: int) -> str:
    return "second SIGINT" if signum == signal.SIGINT else signal_name(signum)


def _is_hard_stop(signum: int, first: bool) -> bool:
    """SIGQUIT always; SIGINT once a stop was asked for (Ctrl-C twice); never SIGTERM."""
    return signum == signal.SIGQUIT or (signum == signal.SIGINT and not first)


class StopSignals:
    """Catches SIGTERM and SIGINT for one run (see the module docstring).

    Use as a context manager; the previous handlers come back on exit. Outside the main thread
    it does nothing (Python delivers signals to the main thread only).

    Args:
        hard_exit: a hard stop exits the process at once (the CLI); False raises
            :class:`RunCancelled` instead (the Python API: an interrupted notebook survives).
    """

    def __init__(self, hard_exit: bool = True) -> None:
        self.hard_exit = hard_exit
        self.signum: int | None = None
        self.on_hard_exit: Callable[[int, str], None] | None = None
        """Called (best effort) with the signal and a message just before the process ends at
        once (a hard stop, or a main thread that did not react)."""
        self._deferred = False
        self._previous: dict[int, Any] = {}
        self._wakeup: tuple[socket.socket, socket.socket] | None = None
        self._watcher: threading.Thread | None = None
        self._previous_wakeup = -1
        self._received = 0
        self._seen_in_loop = False

    @property
    def requested(self) -> bool:
        """True once a stop signal arrived."""
        return self.signum is not None

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        if not self.hard_exit:
            return self
        reader, writer = socket.socketpair()
        writer.setblocking(False)
        self._wakeup = (reader, writer)
        self._previous_wakeup = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
        self._watcher = threading.Thread(target=self._watch, args=(reader,), daemon=True)
        self._watcher.start()
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        if self._wakeup is not None:
            signal.set_wakeup_fd(self._previous_wakeup)
            reader, writer = self._wakeup
            writer.close()  # the watcher reads the end of the stream and returns
            if self._watcher is not None:
                self._watcher.join(timeout=1.0)
            reader.close()  # after the watcher left its recv: the descriptor is not reused under it
            self._wakeup = self._watcher = None

    @contextmanager
    def deferred(self) -> Iterator[None]:
        """Inside this block the first signal is recorded instead of raised."""
        self._deferred = True
        try:
            yield
        finally:
            self._deferred = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal_name(signum)
        if self.signum is not None or signum == signal.SIGQUIT:
            if not _is_hard_stop(signum, first=self.signum is None):
                return  # asked again: the stop under way (and its checkpoint) goes on
            if not self.hard_exit:
                raise RunCancelled(signum, f"stopped at once by {name}")
            self._exit_now(signum, f"{_hard_stop_name(signum)}: stopping at once")
        self.signum = signum
        self._seen_in_loop = self._deferred
        if not self._deferred:
            raise self.cancelled()

    def cancelled(self) -> RunCancelled:
        """The exception for a stop outside the loop (also for an error that a stop caused:
        a library interrupted half-way, a process group torn down by another rank)."""
        signum = self.signum or signal.SIGTERM
        name = signal_name(signum)
        return RunCancelled(
            signum, f"cancelled by {name} outside a training step; nothing was lost"
        )

    def _watch(self, reader: socket.socket) -> None:
        """Woken by every signal, whatever the main thread is doing."""
        first, deadline = signal.SIGTERM, None  # the first signal; when it must have ended us
        while True:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                reader.settimeout(wait)
                data = reader.recv(64)
            except TimeoutError:
                # Outside the loop the run ends promptly: if this process is still here after
                # the grace time, its main thread is stuck in a library call. (A stop seen in
                # the loop takes its time: the step and the checkpoint are finished first.)
                deadline = None
                if not self._deferred and not self._seen_in_loop:
                    name = signal_name(first)
                    self._exit_now(first, f"cancelled by {name}; stopping at once (was blocked)")
                continue
            except OSError:
                return
            if not data:
                return
            for signum in data:
                if signum not in SIGNALS:
                    continue
                self._received += 1
                hard = _is_hard_stop(signum, first=self._received == 1)
                if hard and self.hard_exit:
                    self._exit_now(signum, f"{_hard_stop_name(signum)}: stopping at once")
                if self._received == 1:
                    first, deadline = signum, time.monotonic() + GRACE_S

    def _exit_now(self, signum: int, message: str) -> None:
        os.write(2, f"longtune train: {message}\n".encode())
        if self.on_hard_exit is not None:
            try:
                self.on_hard_exit(signum, message)
            except Exception:  # noqa: BLE001 - exiting anyway; the status is best effort
                pass
        os._exit(128 + signum)
