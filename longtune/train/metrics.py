"""Run logging: ``metrics.jsonl`` (+ optional TensorBoard / MLflow), a console progress line,
and ``train.log``. Only rank 0 writes files and prints progress."""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import sys
import time
from typing import Any, TextIO

from longtune.run_dir import RunDir

logger = logging.getLogger(__name__)

_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
PROGRESS_LOGGER = "longtune.train.progress"
"""The logger of the progress lines kept in ``train.log`` (not echoed on the console)."""


def setup_logging(run: RunDir, rank: int, level: int = logging.INFO) -> logging.Logger:
    """Configure the ``longtune`` logger for a training run.

    Rank 0 logs at ``level`` to the console and to the run's ``train.log`` (appended, so a
    resumed run keeps its history); other ranks log warnings and errors to stderr, prefixed with
    their rank. Calling it again replaces the handlers it installed before.

    Args:
        run: the run folder (created if missing, on rank 0).
        rank: this process's global rank.
        level: the logging level on rank 0.

    Returns:
        The ``longtune`` logger.
    """
    root = logging.getLogger("longtune")
    for handler in [h for h in root.handlers if getattr(h, "_longtune", False)]:
        root.removeHandler(handler)
        handler.close()
    handlers: list[logging.Handler] = []
    if rank == 0:
        run.path.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(run.log, encoding="utf-8"))
        console = logging.StreamHandler(sys.stdout)
        # The progress line is printed on the console every step; the log file keeps it now
        # and then (ProgressLine), so a log's tail moves during a long run too.
        console.addFilter(lambda record: record.name != PROGRESS_LOGGER)
        handlers.append(console)
        formatter = logging.Formatter(_LOG_FORMAT)
        root.setLevel(level)
    else:
        handlers.append(logging.StreamHandler(sys.stderr))
        formatter = logging.Formatter(f"[rank {rank}] {_LOG_FORMAT}")
        root.setLevel(logging.WARNING)
    for handler in handlers:
        handler.setFormatter(formatter)
        handler._longtune = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.propagate = False
    return root


def _scalar(value: Any) -> Any:
    """Tensors and numpy scalars to Python numbers; everything else unchanged."""
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    return value


class MetricsWriter:
    """Appends one JSON object per line to the run's ``metrics.jsonl`` (rank 0 only), flushed
    per line, and mirrors numeric values to TensorBoard and MLflow when enabled and installed.

    Args:
        run: the run folder.
        rank: this process's global rank; other ranks' calls are no-ops.
        tensorboard: also write TensorBoard events to the run's ``tensorboard/``.
        mlflow: also log to MLflow (tracking URI/experiment from MLflow's environment).
    """

    def __init__(
        self, run: RunDir, rank: int, *, tensorboard: bool = False, mlflow: bool = False
    ) -> None:
        self.enabled = rank == 0
        self.path = run.metrics
        self._file: TextIO | None = None
        self._tb: Any = None
        self._mlflow: Any = None
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")  # closed in close()
        if tensorboard:
            if importlib.util.find_spec("tensorboard") is None:
                logger.warning("tensorboard is not installed; TensorBoard logging is off")
            else:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(run.tensorboard))
        if mlflow:
            if importlib.util.find_spec("mlflow") is None:
                logger.warning("mlflow is not installed; MLflow logging is off")
            else:
                import mlflow as mlflow_module

                self._mlflow = mlflow_module
                if mlflow_module.active_run() is None:
                    mlflow_module.start_run()

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Record metrics for an optimizer step.

        Args:
            step: the optimizer step.
            metrics: name -> value (numbers, 0-d tensors, strings); non-finite floats are
                written as JSON ``NaN``/``Infinity``.
        """
        if not self.enabled or self._file is None:
            return
        values = {name: _scalar(value) for name, value in metrics.items()}
        record = {"step": step, "time": round(time.time(), 3), **values}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        numeric = {
            k: float(v)
            for k, v in values.items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        }
        if self._tb is not None:
            for name, value in numeric.items():
                self._tb.add_scalar(name, value, step)
            self._tb.flush()
        if self._mlflow is not None:
            self._mlflow.log_metrics(
                {k: v for k, v in numeric.items() if math.isfinite(v)}, step=step
            )

    def log_params(self, params: dict[str, Any]) -> None:
        """Record run parameters (e.g. the flattened config) to MLflow, if enabled.

        Args:
            params: name -> value.
        """
        if self.enabled and self._mlflow is not None:
            self._mlflow.log_params(params)

    def close(self) -> None:
        """Flush and close every sink."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._mlflow is not None:
            self._mlflow.end_run()
            self._mlflow = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def format_rate(tokens_per_s: float) -> str:
    """``5123.4`` -> ``"5.1k"``; ``2.5e6`` -> ``"2.5M"``.

    Args:
        tokens_per_s: the rate.

    Returns:
        A short human-readable number.
    """
    for divisor, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if tokens_per_s >= divisor:
            return f"{tokens_per_s / divisor:.1f}{suffix}"
    return f"{tokens_per_s:.0f}"


def format_duration(seconds: float) -> str:
    """``192`` -> ``"3m12s"``, ``3725`` -> ``"1h02m"``, ``7`` -> ``"7s"``.

    Args:
        seconds: the duration.

    Returns:
        A short human-readable duration.
    """
    total = max(0, int(round(seconds)))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


class ProgressLine:
    """Prints ``step 12/200 | loss 1.234 | 5.1k tok/s | ETA 3m12s`` on rank 0.

    Throughput is over the steps since the previous call; the ETA uses the average step time
    since the first call (so the slow first step does not dominate it for long).

    Args:
        total_steps: the run's total optimizer steps.
        rank: this process's global rank; other ranks print nothing.
        stream: where to print (stdout by default).
        clock: the time source (for tests).
    """

    def __init__(
        self,
        total_steps: int,
        rank: int,
        *,
        stream: TextIO | None = None,
        clock: Any = time.monotonic,
    ) -> None:
        self.total_steps = total_steps
        self.log_every = max(1, round(total_steps / 200))  # about 200 lines in a run's log
        self.enabled = rank == 0
        self.stream = stream
        self.clock = clock
        self._start: tuple[float, int] | None = None
        self._last: tuple[float, int] | None = None

    def start(self, step: int = 0) -> None:
        """Mark the time at which training (or resumed training) begins.

        Args:
            step: the optimizer step training starts from.
        """
        now = self.clock()
        self._start = self._last = (now, step)

    def format(self, step: int, loss: float, tokens: int, **extra: float) -> str:
        """Build the progress line and advance the internal timer.

        Args:
            step: the optimizer step just finished (1-based count of finished steps).
            loss: its loss.
            tokens: tokens processed since the previous call (all ranks together).
            **extra: more values to show before the throughput, e.g. ``lr=3e-5``.

        Returns:
            The line.
        """
        now = self.clock()
        if self._start is None or self._last is None:
            self._start = self._last = (now, step - 1)
        last_time, last_step = self._last
        start_time, start_step = self._start
        elapsed = now - last_time
        rate = tokens / elapsed if elapsed > 0 else 0.0
        parts = [f"step {step}/{self.total_steps}", f"loss {float(loss):.3f}"]
        parts += [f"{name} {value:.3g}" for name, value in extra.items()]
        parts.append(f"{format_rate(rate)} tok/s")
        done = step - start_step
        if done > 0:
            per_step = (now - start_time) / done
            parts.append(f"ETA {format_duration(per_step * (self.total_steps - step))}")
        self._last = (now, step)
        return " | ".join(parts)

    def update(self, step: int, loss: float, tokens: int, **extra: float) -> None:
        """Print the progress line (rank 0 only), and keep it in the run's log on the first
        and last step and every ``log_every`` steps; see :meth:`format` for the arguments."""
        if not self.enabled:
            return
        line = self.format(step, loss, tokens, **extra)
        print(line, file=self.stream or sys.stdout, flush=True)
        if step % self.log_every == 0 or step in (1, self.total_steps):
            logging.getLogger(PROGRESS_LOGGER).info(line)
