"""`longtune.runs` and `longtune runs`: runs read from their folders, cancel by process group.

Run folders are written here the way the trainer writes them (run_dir's status records, the
config module's config.yaml, metrics records), by real processes where liveness matters.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from ui_server import runs_list_cli, wait_for

import longtune
from longtune import runs
from longtune.run_dir import (
    RunDir,
    end_launch,
    lock_run,
    mark_run,
    process_cmdline,
    process_start_time,
    read_metrics_since,
    read_status,
    stop_target,
    write_launch,
    write_status,
)
from longtune.train.config import load_config, save_config

STATUS_THEN_EXIT = (
    "import sys, time; from longtune.run_dir import RunDir, write_status; "
    "write_status(RunDir(sys.argv[1]), 'running', step=4, total_steps=10, started_at=time.time())"
)

# Behaves like the trainer under `cancel`: status `running`, a child process in its group; on
# SIGTERM it writes `cancelled` and exits 143 (the child notes that it got the signal too).
CANCELLABLE = r"""
import pathlib, signal, subprocess, sys, time
from longtune.run_dir import RunDir, lock_run, write_status
run = RunDir(sys.argv[1])
lock = lock_run(run)  # as the trainer does: the run's own process holds its lock
child_code = (
    "import pathlib, signal, sys, time\n"
    "signal.signal(signal.SIGTERM, lambda *a: (pathlib.Path(sys.argv[1]).write_text('SIGTERM'), sys.exit(0)))\n"
    "pathlib.Path(sys.argv[1] + '.ready').write_text('')\n"
    "time.sleep(60)\n"
)
child = subprocess.Popen([sys.executable, "-c", child_code, sys.argv[2]])
def stop(*_):
    write_status(run, "cancelled", step=5, total_steps=10)
    child.wait()
    sys.exit(143)
signal.signal(signal.SIGTERM, stop)
while not pathlib.Path(sys.argv[2] + ".ready").exists():
    time.sleep(0.01)
write_status(run, "running", step=5, total_steps=10, started_at=time.time())
time.sleep(60)
"""


def make_run(runs_dir, name, duration="10st"):
    run = RunDir(runs_dir / name)
    run.path.mkdir(parents=True)
    mark_run(run)
    cfg = load_config(
        None,
        [
            "--model.path=/models/tiny",
            "--data.train=/data/a.jsonl,/data/b.jsonl",
            f"--train.duration={duration}",
            f"--output.dir={run.path}",
        ],
    )
    save_config(cfg, run.config)
    return run


def write_metrics(run, losses, evals):
    lines = [json.dumps({"step": s, "kind": "eval", "eval_loss": v}) for s, v in evals.items()]
    lines += [
        json.dumps({"step": i + 1, "kind": "train", "loss": v, "lr": 1e-4})
        for i, v in enumerate(losses)
    ]
    lines.sort(key=lambda line: json.loads(line)["step"])
    run.metrics.write_text("\n".join(lines) + "\n")


@pytest.fixture
def folder(tmp_path):
    runs_dir = tmp_path / "runs"
    t0 = time.time() - 100
    done = make_run(runs_dir, "done")
    write_metrics(done, [3.0, 2.5, 2.0], {0: 3.2, 3: 2.1})
    write_status(done, "succeeded", step=10, total_steps=10, started_at=t0)
    done.export.mkdir()
    done.export_check.write_text(json.dumps({"passed": True}))

    gone = make_run(runs_dir, "gone")
    subprocess.run([sys.executable, "-c", STATUS_THEN_EXIT, str(gone.path)], check=True)

    nan = make_run(runs_dir, "nan")
    write_status(nan, "failed", reason="nan", error="non-finite loss nan at step 3", started_at=t0)

    (runs_dir / "not-a-run").mkdir()
    (runs_dir / "not-a-run" / "notes.txt").write_text("hello")
    # A user's folder with the file names a run uses is still not a run.
    (runs_dir / "user-project").mkdir()
    (runs_dir / "user-project" / "config.yaml").write_text("model: {path: x}\n")
    (runs_dir / "user-project" / "status.json").write_text('{"state": "running"}')
    return runs_dir


def test_list_and_get_read_the_run_folders(folder):
    found = {r.name: r for r in runs.list(folder)}
    assert set(found) == {"done", "gone", "nan"}
    done = found["done"]
    assert done.status == "succeeded" and done.progress == 1.0
    assert (done.train_loss, done.eval_loss) == (2.0, 2.1)
    assert done.model == "/models/tiny" and done.data == ["/data/a.jsonl", "/data/b.jsonl"]
    assert done.export_dir == RunDir(folder / "done").export and done.export_check["passed"]
    assert 99 < done.duration_s < 200
    gone = found["gone"]
    assert gone.state == "failed" and gone.status == "failed (process gone)"
    assert (gone.step, gone.total_steps) == (4, 10)
    assert found["nan"].status == "failed (nan)" and "non-finite" in found["nan"].error
    assert runs.get("nan", folder).error == found["nan"].error
    # the package-level spelling, loaded lazily like longtune.finetune
    assert [r.name for r in longtune.runs.list(folder)] == [r.name for r in runs.list(folder)]


def test_get_refuses_unknown_runs_and_path_names(folder):
    with pytest.raises(FileNotFoundError, match="no run 'nope' .*runs there: .*done"):
        runs.get("nope", folder)
    for bad in ("../done", ".hidden", "a/b", ""):
        with pytest.raises(ValueError, match="is not valid"):
            runs.get(bad, folder)
    with pytest.raises(FileNotFoundError):
        runs.get("not-a-run", folder)


def test_cancel_signals_the_whole_process_group(tmp_path):
    run = make_run(tmp_path, "live")
    marker = tmp_path / "child-signal"
    proc = subprocess.Popen(
        [sys.executable, "-c", CANCELLABLE, str(run.path), str(marker)], start_new_session=True
    )
    try:
        wait_for(lambda: (read_status(run) or {}).get("state") == "running", 30, "running status")
        info = runs.get("live", tmp_path)
        assert info.status == "running" and info.pgid == proc.pid
        runs.cancel("live", tmp_path)
        assert proc.wait(timeout=30) == 143
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert marker.read_text() == "SIGTERM"  # the child in its group got it too
    assert runs.get("live", tmp_path).status == "cancelled"


def test_cancel_never_signals_a_process_that_is_not_provably_the_runs(tmp_path):
    """A crafted status.json naming a live unrelated process (with its true start time and
    command line) and its group: that process does not hold the run's lock, so nothing is
    signalled. And with the real trainer running, a crafted group is ignored: only the trainer
    is signalled, never the unrelated group."""
    victim = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True
    )
    run = make_run(tmp_path, "live")
    marker = tmp_path / "child-signal"
    trainer = subprocess.Popen(
        [sys.executable, "-c", CANCELLABLE, str(run.path), str(marker)], start_new_session=True
    )
    try:
        wait_for(lambda: (read_status(run) or {}).get("state") == "running", 30, "running status")
        wait_for(lambda: process_cmdline(victim.pid) is not None, 10, "the victim")
        real = json.loads(run.status_file.read_text())
        crafted = {
            **real,
            "pid": victim.pid,
            "pgid": victim.pid,
            "proc_start": process_start_time(victim.pid),
            "cmdline": process_cmdline(victim.pid),
        }
        run.status_file.write_text(json.dumps(crafted))
        with pytest.raises(ValueError, match="no running process is provably this run's own"):
            runs.cancel("live", tmp_path)
        run.status_file.write_text(json.dumps({**real, "pgid": victim.pid}))
        assert stop_target(run) == (None, trainer.pid)
        runs.cancel("live", tmp_path)  # the trainer alone: its stop handler records the end
        wait_for(lambda: read_status(run)["state"] == "cancelled", 30, "the trainer's stop")
        time.sleep(0.2)
        assert victim.poll() is None  # never signalled
    finally:
        for proc in (victim, trainer):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def test_cancel_refuses_runs_that_are_not_running_here(folder):
    with pytest.raises(ValueError, match="not running \\(status: succeeded\\)"):
        runs.cancel("done", folder)
    with pytest.raises(ValueError, match="not running \\(status: failed \\(process gone\\)\\)"):
        runs.cancel("gone", folder)
    elsewhere = make_run(folder, "elsewhere")
    write_status(elsewhere, "running", host="another-host", pid=1234, pgid=1234)
    with pytest.raises(ValueError, match="runs on host 'another-host', not this one"):
        runs.cancel("elsewhere", folder)
    assert socket.gethostname() != "another-host"


def test_a_launched_process_that_ends_without_status_shows_its_last_line(tmp_path):
    run = make_run(tmp_path, "crashed")
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        write_launch(run, proc.pid, argv=["python", "-m", "longtune", "train"])
        assert runs.get("crashed", tmp_path).status == "starting"
    finally:
        proc.kill()
        proc.wait()
    run.launch_log.write_text(
        "Traceback ...\nlongtune train: error: data.train: x does not exist\n"
    )
    assert runs.get("crashed", tmp_path).status == "failed (process gone)"  # nobody saw it end
    end_launch(run, proc.pid + 1, 0)  # another launch's process: not this record's
    assert runs.get("crashed", tmp_path).status == "failed (process gone)"
    end_launch(run, proc.pid, 2)
    info = runs.get("crashed", tmp_path)
    assert info.status == "failed (exit code 2)"
    assert info.error == "longtune train: error: data.train: x does not exist"


def test_metrics_cursor_returns_only_new_complete_records(tmp_path):
    run = RunDir(tmp_path)
    assert read_metrics_since(run) == ([], "0:0", False)
    with open(run.metrics, "w") as f:
        f.write(json.dumps({"step": 1, "loss": 2.0}) + "\n" + '{"step": 2, "lo')
    records, cursor, reset = read_metrics_since(run)
    assert [r["step"] for r in records] == [1] and not reset
    with open(run.metrics, "a") as f:
        f.write('ss": 1.5}\n' + json.dumps({"step": 3, "loss": 1.0}) + "\n")
    records, cursor, reset = read_metrics_since(run, cursor)
    assert [r["step"] for r in records] == [2, 3] and not reset
    assert read_metrics_since(run, cursor)[0] == []
    # A resumed run rewrites the file (records past its checkpoint dropped): start over.
    tmp = run.metrics.with_name("m.tmp")
    tmp.write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")
    os.replace(tmp, run.metrics)
    records, _, reset = read_metrics_since(run, cursor)
    assert reset and [r["step"] for r in records] == [1]


def test_runs_commands(folder):
    table = subprocess.run(
        [sys.executable, "-m", "longtune", "runs", "list", "--runs-dir", str(folder)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    lines = table.splitlines()
    assert lines[0].split()[:2] == ["NAME", "STATUS"]
    assert any(line.startswith("gone") and "failed (process gone)" in line for line in lines)
    assert any(line.startswith("done") and "2.0000" in line for line in lines)
    assert {k: v["status"] for k, v in runs_list_cli(folder).items()} == {
        "done": "succeeded",
        "gone": "failed (process gone)",
        "nan": "failed (nan)",
    }
    show = subprocess.run(
        [sys.executable, "-m", "longtune", "runs", "show", "nan", "--runs-dir", str(folder)],
        capture_output=True,
        text=True,
    )
    assert show.returncode == 0 and "error:       non-finite loss nan at step 3" in show.stdout
    cancel = subprocess.run(
        [sys.executable, "-m", "longtune", "runs", "cancel", "done", "--runs-dir", str(folder)],
        capture_output=True,
        text=True,
    )
    assert cancel.returncode == 2
    assert cancel.stderr.strip().splitlines() == [
        "longtune runs: error: run 'done' is not running (status: succeeded); nothing to cancel"
    ]


def test_latest_losses_come_from_the_end_of_a_long_metrics_file(tmp_path):
    run = make_run(tmp_path, "long", duration="3000st")
    run_cfg = run.config.read_text().replace("eval: []", "eval:\n  - /data/e.jsonl")
    run.config.write_text(run_cfg)
    losses = [5.0 - i / 1000 for i in range(3000)]
    write_metrics(run, losses, {0: 7.5})  # the only eval record is at the start
    with open(run.metrics, "a") as f:
        f.write('{"step": 3001, "kind": "tr')  # a record still being written
    info = runs.get("long", tmp_path)
    assert (info.train_loss, info.eval_loss, info.step) == (losses[-1], 7.5, 3000)
    assert run.metrics.stat().st_size > 2 * 64 * 1024  # spans several blocks


def test_a_launch_stopped_before_it_wrote_a_status_reads_as_cancelled(tmp_path):
    run = make_run(tmp_path, "early")
    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(143)"])
    write_launch(run, proc.pid, argv=["python", "-m", "longtune", "train"])
    end_launch(run, proc.pid, proc.wait())
    assert runs.get("early", tmp_path).status == "cancelled"


def test_odd_run_files_show_as_unknown_and_hide_no_other_run(folder):
    odd = make_run(folder, "odd")
    odd.config.write_text("model: just-a-string\ndata: {train: a.jsonl}\ntrain: {duration: xst}\n")
    odd.status_file.write_text("[1, 2]")
    mixed = make_run(folder, "mixed")
    write_status(mixed, "failed", reason="error", error="x", started_at="yesterday")
    found = {r.name: r for r in runs.list(folder)}
    assert {"done", "gone", "nan", "odd", "mixed"} == set(found)
    assert found["odd"].model is None and found["odd"].data == []
    assert found["odd"].status == "failed (error)" and "unreadable" in found["odd"].error
    assert found["mixed"].status == "unknown" and "unreadable run files" in found["mixed"].error


def test_resume_waits_for_the_earlier_process_and_names_the_folder_as_it_is(tmp_path, monkeypatch):
    run = make_run(tmp_path, "stopping")
    write_status(run, "cancelled", step=2, total_steps=10)
    lock = lock_run(run)  # the earlier process, still writing after recording its end
    try:
        with pytest.raises(ValueError, match="'stopping' is still stopping"):
            runs.resume("stopping", tmp_path)
    finally:
        lock.release()
    started = []
    monkeypatch.setattr(runs, "_start", lambda run, nproc, extra: started.append(extra))
    moved = tmp_path / "moved"
    moved.mkdir()
    os.replace(run.path, moved / "stopping")
    runs.resume("stopping", moved)
    assert started == [
        ["--checkpoint.resume=auto", f"--output.dir={(moved / 'stopping').resolve()}"]
    ]


# A process that records a run as `running` (itself) and stays alive.
RUNNING = (
    "import sys, time; from longtune.run_dir import RunDir, write_status; "
    "write_status(RunDir(sys.argv[1]), 'running', step=1, total_steps=10, started_at=time.time()); "
    "time.sleep(120)"
)


def cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "longtune", "runs", *args], capture_output=True, text=True
    )


def test_delete_removes_only_runs_that_have_ended(folder):
    live = make_run(folder, "live")
    proc = subprocess.Popen([sys.executable, "-c", RUNNING, str(live.path)])
    try:
        wait_for(lambda: (read_status(live) or {}).get("state") == "running", 30, "running")
        with pytest.raises(ValueError, match="'live' is running; cancel it and wait"):
            runs.delete("live", folder)
        out = cli("delete", "live", "--runs-dir", str(folder))
        assert out.returncode == 2 and out.stderr.strip().splitlines() == [
            "longtune runs: error: run 'live' is running; cancel it and wait for it to end "
            "before deleting it"
        ]
        assert live.config.is_file()
    finally:
        proc.kill()
        proc.wait()
    # A run that recorded its end but whose process still holds the folder (writing its last
    # checkpoint): not yet.
    stopping = make_run(folder, "stopping")
    write_status(stopping, "cancelled", step=2, total_steps=10)
    lock = lock_run(stopping)
    try:
        with pytest.raises(ValueError, match="'stopping' is still stopping; delete it once"):
            runs.delete("stopping", folder)
    finally:
        lock.release()
    # Folders that are not runs stay as they are.
    with pytest.raises(ValueError, match="not-a-run is not a longtune run folder"):
        runs.delete("not-a-run", folder)
    out = cli("delete", "user-project", "--runs-dir", str(folder))
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1
    assert "user-project is not a longtune run folder" in out.stderr
    assert (folder / "not-a-run" / "notes.txt").read_text() == "hello"
    assert (folder / "user-project" / "config.yaml").is_file()
    with pytest.raises(FileNotFoundError, match="no run 'nope'"):
        runs.delete("nope", folder)
    # Ended runs go, through the API and the command line.
    assert runs.delete("done", folder).name == "done" and not (folder / "done").exists()
    out = cli("delete", "nan", "--runs-dir", str(folder))
    assert out.returncode == 0 and out.stdout.startswith("deleted run nan")
    assert not (folder / "nan").exists()
    assert {r.name for r in runs.list(folder)} == {"gone", "live", "stopping"}


def test_a_resumed_run_keeps_its_first_start_and_sums_its_training_time(tmp_path):
    from longtune.train.keeper import RunKeeper

    run = make_run(tmp_path, "resumed", duration="10st")
    first = RunKeeper(run, rank=0)
    first.started_at = time.time() - 1000  # the first process started long ago
    first.claim_existing()
    first.claim()
    first.progress(4, total_steps=10)
    first.end("cancelled", signal="SIGTERM")
    first.release()
    # Its records carry the training time of the whole run (the resumed process continues it).
    records = [
        {"step": s, "kind": "train", "loss": 1.0, "elapsed_s": 30.0 * s} for s in range(1, 7)
    ]
    run.metrics.write_text("".join(json.dumps(r) + "\n" for r in records))

    second = RunKeeper(run, rank=0)
    second.claim_existing()
    second.claim()  # the resumed process (this one): running
    try:
        status = read_status(run)
        assert status["first_started_at"] == first.started_at
        assert status["started_at"] == second.started_at > first.started_at
        info = runs.get("resumed", tmp_path)
        assert info.state == "running" and info.started_at == first.started_at
        assert 1000 <= info.duration_s < 1100  # wall time since the first start
        assert info.train_time_s == 180.0
        assert info.eta_s == pytest.approx(30.0 * (10 - 6))
        details = runs.format_details(info)
        assert "training:    3m00s" in details and "eta:         2m00s" in details
        assert "wall time:   16m" in details
        assert runs.format_time(first.started_at) in details
        second.end("succeeded")
    finally:
        second.release()
    info = runs.get("resumed", tmp_path)
    assert info.started_at == first.started_at and info.eta_s is None
    assert read_status(run)["first_started_at"] == first.started_at
    table = runs.format_table([info]).splitlines()
    assert table[0].split()[-4:] == ["STARTED", "WALL", "TRAINING", "MODEL"]
    assert "3m00s" in table[1] and "16m" in table[1]


def _resume_at_the_barrier(name, runs_dir, executable, barrier, results):
    """A `longtune runs resume` of its own process, started at the same moment as another,
    slow to record its launch (the window in which a second resume could start a second
    process)."""
    sys.executable = executable  # the launched "trainer" only sleeps, so it is still starting
    record = runs.write_launch
    runs.write_launch = lambda *a, **kw: (time.sleep(1.0), record(*a, **kw))[1]
    barrier.wait()
    try:
        runs.resume(name, runs_dir)
        results.put("started")
    except ValueError as e:
        results.put(str(e))


def test_two_resumes_at_once_start_one_process(tmp_path):
    import multiprocessing

    run = make_run(tmp_path, "twice")
    write_status(run, "cancelled", step=2, total_steps=10)
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\nexec sleep 59.25\n")  # a duration no other process sleeps
    fake.chmod(0o755)
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    args = ("twice", tmp_path, str(fake), barrier, results)
    procs = [ctx.Process(target=_resume_at_the_barrier, args=args) for _ in range(2)]
    for proc in procs:
        proc.start()
    outcomes = sorted(results.get(timeout=60) for _ in procs)
    for proc in procs:
        proc.join(timeout=30)
    sleepers = subprocess.run(["pgrep", "-fx", "sleep 59.25"], capture_output=True)
    for pid in sleepers.stdout.split():
        os.kill(int(pid), signal.SIGKILL)
    assert len(sleepers.stdout.split()) == 1, outcomes  # one process started
    assert outcomes[1] == "started", outcomes
    assert "'twice' is starting; only a cancelled or failed run can be resumed" in outcomes[0]
