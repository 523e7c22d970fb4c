"""The run folder's status record: atomic writes, and a dead process never reads as running."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from longtune.run_dir import RunDir, mark_run, process_start_time, read_status, write_status


def test_running_status_names_this_process(tmp_path):
    run = RunDir(tmp_path)
    assert read_status(run) is None and not run.is_run()
    rec = write_status(run, "running", step=3, total_steps=10)
    assert rec["pid"] == os.getpid() and rec["proc_start"] == process_start_time(os.getpid())
    back = read_status(run)
    assert back["state"] == "running" and back["step"] == 3
    assert not run.is_run()  # a status alone does not make a run: the marker does
    mark_run(run)
    assert run.is_run()
    assert not list(tmp_path.glob("*.tmp-*"))


def test_running_status_of_a_dead_process_reads_as_process_gone(tmp_path):
    run = RunDir(tmp_path)
    code = (
        "import sys; from longtune.run_dir import RunDir, write_status; "
        "write_status(RunDir(sys.argv[1]), 'running', step=1)"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True)
    raw = json.loads(run.status_file.read_text())
    assert raw["state"] == "running"  # what the process wrote before it went away
    status = read_status(run)
    assert status["state"] == "failed" and status["reason"] == "process gone"


def test_a_reused_pid_is_not_the_run(tmp_path):
    run = RunDir(tmp_path)
    write_status(run, "running", proc_start=-1)  # same pid, another start time
    assert read_status(run)["reason"] == "process gone"


def test_unknown_state_is_refused(tmp_path):
    with pytest.raises(ValueError, match="running, succeeded, failed, cancelled"):
        write_status(RunDir(tmp_path), "done")
