"""How a run ended: the :class:`RunResult` a caller gets, and the one mapping from the exception
a run ended with to the status its folder records.

Imports no torch (the Python API, the CLI and ``longtune runs`` use it before, or without,
loading the trainer): an exception class whose module was never imported cannot have been
raised, so the classes are looked up among the modules already loaded.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from longtune.train.signals import RunCancelled, signal_name


class TrainingDivergedError(RuntimeError):
    """The loss or gradient norm became NaN or infinite."""


class StepOutOfMemory(MemoryError):
    """A training step ran out of device (or host) memory; the message says where and what
    to change (a MemoryError: the run's reason is ``oom``)."""


@dataclass
class RunResult:
    """What a finished, failed or cancelled run left behind."""

    status: str
    """``succeeded``, ``failed`` or ``cancelled`` (the words of the run's ``status.json``)."""
    run_dir: Path
    export_dir: Path | None = None
    final_step: int = 0
    metrics: list[dict[str, Any]] = field(default_factory=list)
    """Every record of ``metrics.jsonl`` (train steps and eval records)."""
    export_check: dict[str, Any] | None = None
    error: str | None = None

    @property
    def eval_losses(self) -> list[float]:
        """The eval losses of the run in step order."""
        return [m["eval_loss"] for m in self.metrics if m.get("kind") == "eval"]


# (module, class name, reason): checked in this order, the first match wins.
_REASONS = (
    ("longtune.train.result", "TrainingDivergedError", "nan"),
    ("torch", "OutOfMemoryError", "oom"),
    ("builtins", "MemoryError", "oom"),
    ("longtune.data.validation", "DataValidationError", "data error"),
    ("longtune.fsutil", "OutputDirError", "output error"),
)


def _is(exc: BaseException, module: str, name: str) -> bool:
    loaded = sys.modules.get(module)
    cls = getattr(loaded, name, None) if loaded is not None else None
    return isinstance(cls, type) and isinstance(exc, cls)


def failure_reason(exc: BaseException) -> str:
    """The ``reason`` recorded in ``status.json`` for a run that failed with ``exc``.

    Returns:
        ``nan``, ``oom``, ``data error``, ``output error`` (a full disk, a read-only folder),
        ``config error`` (bad settings or inputs) or ``error`` (anything else).
    """
    for module, name, reason in _REASONS:
        if _is(exc, module, name):
            return reason
    if isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError):
        return "output error"
    if isinstance(exc, ValueError | FileNotFoundError | NotImplementedError):
        return "config error"
    return "error"


def end_of_run(exc: BaseException) -> tuple[str, dict[str, Any]]:
    """The end a run that stopped with ``exc`` records: its state and the status's fields.

    Returns:
        ``("cancelled", {signal, message, checkpoint})`` for a stop by SIGTERM / SIGINT, else
        ``("failed", {reason, error})`` with the first line of the message (prefixed with the
        exception's class when the reason is the unspecific ``error``).
    """
    if isinstance(exc, RunCancelled):
        fields = {"signal": signal_name(exc.signum), "message": str(exc)}
        return "cancelled", {**fields, "checkpoint": exc.checkpoint}
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    reason = failure_reason(exc)
    if reason == "error":
        text = f"{type(exc).__name__}: {text}"
    return "failed", {"reason": reason, "error": text}
