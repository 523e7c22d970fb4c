"""Run logging: metrics.jsonl, the progress line, train.log."""

from __future__ import annotations

import io
import json
import logging

import pytest
import torch

from longtune.run_dir import RunDir
from longtune.train.metrics import (
    MetricsWriter,
    ProgressLine,
    format_duration,
    format_rate,
    setup_logging,
)


def test_metrics_jsonl_rank0_only_and_flushed(tmp_path, caplog):
    writer = MetricsWriter(RunDir(tmp_path), rank=0, tensorboard=True, mlflow=True)
    writer.log(1, {"loss": torch.tensor(2.5), "lr": 1e-5, "tokens": 4096})
    # Flushed per line: readable before close.
    first = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1 and first["loss"] == 2.5 and first["lr"] == 1e-5
    writer.log(2, {"loss": float("nan")})
    writer.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[1])["step"] == 2
    other = MetricsWriter(RunDir(tmp_path / "r1"), rank=1)
    other.log(1, {"loss": 1.0})
    other.close()
    assert not (tmp_path / "r1").exists()
    # Appends on resume.
    with MetricsWriter(RunDir(tmp_path), rank=0) as again:
        again.log(3, {"loss": 1.0})
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3


def test_format_helpers():
    assert format_rate(5123.4) == "5.1k"
    assert format_rate(2.5e6) == "2.5M"
    assert format_rate(812) == "812"
    assert format_duration(192) == "3m12s"
    assert format_duration(7) == "7s"
    assert format_duration(3725) == "1h02m"


def test_progress_line_format():
    now = [100.0]
    out = io.StringIO()
    progress = ProgressLine(200, rank=0, stream=out, clock=lambda: now[0])
    progress.start(step=10)
    now[0] += 2.0
    progress.update(12, 1.2345, tokens=10200)  # 2 steps in 2 s -> 188 s left
    assert out.getvalue().strip() == "step 12/200 | loss 1.234 | 5.1k tok/s | ETA 3m08s"
    silent = io.StringIO()
    ProgressLine(200, rank=1, stream=silent).update(1, 1.0, tokens=1)
    assert silent.getvalue() == ""


@pytest.fixture
def restore_longtune_logger():
    """setup_logging reconfigures the global 'longtune' logger; put it back for other tests."""
    logger = logging.getLogger("longtune")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield
    for handler in logger.handlers:
        if handler not in saved[0]:
            handler.close()
    logger.handlers[:] = saved[0]
    logger.setLevel(saved[1])
    logger.propagate = saved[2]


def test_setup_logging_writes_train_log(tmp_path, restore_longtune_logger):
    logger = setup_logging(RunDir(tmp_path), rank=0)
    logging.getLogger("longtune.train.something").info("hello from the trainer")
    for handler in logger.handlers:
        handler.flush()
    assert "hello from the trainer" in (tmp_path / "train.log").read_text()
    setup_logging(RunDir(tmp_path / "other"), rank=1)  # replaces the handlers; no file on rank 1
    assert not (tmp_path / "other" / "train.log").exists()
    setup_logging(RunDir(tmp_path), rank=0)
    assert sum(isinstance(h, logging.FileHandler) for h in logger.handlers) == 1


def test_progress_lines_reach_the_log_now_and_then_and_the_console_once(
    tmp_path, restore_longtune_logger, capsys
):
    """train.log keeps the progress line on the first and last step and about 200 times in a
    run (its tail moves during a long run); the console prints it once per step, not twice."""
    logger = setup_logging(RunDir(tmp_path), rank=0)
    now = [0.0]
    console = io.StringIO()
    progress = ProgressLine(400, rank=0, stream=console, clock=lambda: now[0])
    progress.start()
    for step in range(1, 401):
        now[0] += 1.0
        progress.update(step, 1.0, tokens=10)
    for handler in logger.handlers:
        handler.flush()
    logged = [
        line for line in (tmp_path / "train.log").read_text().splitlines() if "| loss" in line
    ]
    assert len(logged) == 201 and "step 1/400" in logged[0] and "step 400/400" in logged[-1]
    assert len(console.getvalue().splitlines()) == 400
    assert "| loss" not in capsys.readouterr().out  # the log's copy is not echoed
