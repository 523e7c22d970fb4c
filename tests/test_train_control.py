"""Run control on a tiny model: graceful SIGTERM / SIGINT, one writer per run folder, the
status file, resume with changed settings, and deleting only runs longtune wrote.

Real `python -m longtune train` processes (and torchrun with 2 processes) on the fixtures of
test_train_run; its module-scoped baseline (8 steps, grad_accum 2) is the uninterrupted run.
"""

# ruff: noqa: F811 - the fixtures setup and baseline come from test_train_run

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_model import read_all
from test_train_run import (  # noqa: F401
    PY,
    assert_losses_equal,
    baseline,
    env,
    read_metrics,
    setup,
    train_args,
    train_losses,
)

import longtune.train.run as T
from longtune.api import finetune
from longtune.checkpoint import read_rank_states
from longtune.data import DataValidationError
from longtune.run_dir import RunDir, delete_run, lock_run, mark_run, read_status
from longtune.train.config import ConfigError, load_config
from longtune.train.preflight import check_resume_config
from longtune.train.result import failure_reason
from longtune.train.signals import RunCancelled

pytestmark = pytest.mark.slow


def start(args: list[str], **kw) -> subprocess.Popen:
    return subprocess.Popen(
        args, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw
    )


def steps_done(out: Path) -> int:
    return len(train_losses(out)) if (out / "metrics.jsonl").exists() else 0


def wait_for(proc: subprocess.Popen, ready, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < end, "the run never got there"
        time.sleep(0.005)


def checkpoints(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").iterdir())


def test_sigint_then_sigterm_then_rerun_equals_uninterrupted_run(setup, baseline, tmp_path):
    """Default checkpoint.every=0: the only checkpoints are the ones the stops write. An eval
    due at a stopped step (eval_every=1) is run when the run resumes."""
    out = tmp_path / "stopped"
    extra = ("--grad-accum", "2", "--train.eval_every=1")
    args = [PY, "-m", "longtune", *train_args(setup, out, *extra)]

    proc = start(args)
    wait_for(proc, lambda: steps_done(out) >= 2)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    status = read_status(RunDir(out))
    first = status["step"]
    assert status["state"] == "cancelled" and status["signal"] == "SIGINT" and first >= 2
    assert checkpoints(out) == [f"step-{first}"] and max(train_losses(out)) == first
    line = f"cancelled by SIGINT after step {first} of 8; checkpoint {out}/checkpoints/step-{first}"
    assert f"{line}; rerun the same command to resume" in stdout

    proc = start(args)
    wait_for(proc, lambda: steps_done(out) >= first + 2)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "Traceback" not in stderr
    status = read_status(RunDir(out))
    second = status["step"]
    assert status["state"] == "cancelled" and status["signal"] == "SIGTERM" and second > first
    assert checkpoints(out) == [f"step-{first}", f"step-{second}"]

    final = subprocess.run(args, env=env(), capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stderr[-3000:]
    assert read_status(RunDir(out))["state"] == "succeeded"
    evals = [m["step"] for m in read_metrics(out) if m["kind"] == "eval"]
    assert evals == list(range(9))
    assert_losses_equal(train_losses(out), train_losses(baseline), rel=1e-6)
    a, b = read_all(out / "hf"), read_all(baseline / "hf")
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_second_writer_is_refused_and_a_second_signal_stops_at_once(setup, tmp_path):
    out = tmp_path / "locked"
    args = [PY, "-m", "longtune", *train_args(setup, out, "--duration", "2000st")]
    proc = start(args)
    wait_for(proc, lambda: steps_done(out) >= 1)
    t0 = time.monotonic()
    second = subprocess.run(args, env=env(), capture_output=True, text=True, timeout=120)
    assert second.returncode == 2, second.stderr[-3000:]
    assert f"(pid {proc.pid} on host {socket.gethostname()})" in second.stderr
    assert "Traceback" not in second.stderr and len(second.stderr.strip().splitlines()) == 1
    status = read_status(RunDir(out))
    assert status["state"] == "running" and status["pid"] == proc.pid
    assert status["total_steps"] == 2000 and status["step"] >= 1
    print(f"second writer refused in {time.monotonic() - t0:.1f} s")

    # SIGTERM, then SIGINT (another signal, so the kernel cannot merge the two) mid-step.
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.03)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "second SIGINT: stopping at once" in stderr and "Traceback" not in stderr
    status = read_status(RunDir(out))
    assert status["state"] == "cancelled" and "stopping at once" in status["message"]
    # The lock died with the process.
    lock_run(RunDir(out)).release()


def test_signal_before_the_loop_ends_promptly_without_a_traceback(setup, tmp_path):
    out = tmp_path / "early"
    args = [PY, "-m", "longtune", *train_args(setup, out)]
    proc = start(args)
    # While it imports torch (the CLI's handlers are installed before that).
    wait_for(proc, lambda: "libtorch" in Path(f"/proc/{proc.pid}/maps").read_text())
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert stderr.strip().splitlines() == [
        "longtune train: cancelled by SIGINT outside a training step; nothing was lost"
    ]
    assert not out.exists()

    # While tokenizing / loading: the run folder exists, no step has run yet.
    args[args.index(f"--data.cache_dir={setup['cache']}")] = f"--data.cache_dir={tmp_path / 'c'}"
    proc = start(args)
    wait_for(proc, lambda: (out / "status.json").exists())
    proc.send_signal(signal.SIGTERM)
    t0 = time.monotonic()
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143 and "Traceback" not in stderr
    assert time.monotonic() - t0 < 10
    assert read_status(RunDir(out))["state"] == "cancelled"
    if steps_done(out) == 0:  # it did stop before the loop (the usual case)
        assert not (out / "checkpoints").exists()


def test_torchrun_stopped_by_one_sigterm_to_its_group_stops_every_rank_after_one_step(
    setup, tmp_path
):
    """torchrun runs each worker in its own session and forwards the signal it receives."""
    out = tmp_path / "dp2"
    cmd = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    proc = start([*cmd, "-m", "longtune", *train_args(setup, out)], start_new_session=True)
    wait_for(proc, lambda: steps_done(out) >= 2)
    assert read_status(RunDir(out))["pgid"] == proc.pid  # torchrun's group: what to signal
    os.killpg(proc.pid, signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0
    status = read_status(RunDir(out))
    step = status["step"]
    assert status["state"] == "cancelled" and checkpoints(out) == [f"step-{step}"]
    assert max(train_losses(out)) == step
    line = f"cancelled by SIGTERM after step {step} of 8"
    assert line in stdout  # rank 0
    assert "[rank 1] " in stderr and stderr.count(line) == 1  # rank 1, the same step
    ranks = sorted(p.name for p in (out / "checkpoints" / f"step-{step}").glob("rank-*.pt"))
    assert ranks == ["rank-0.pt", "rank-1.pt"]


def test_api_returns_a_cancelled_run(setup, tmp_path, monkeypatch):
    """A SIGTERM during step 3 (sent from inside it): the step finishes, a checkpoint is
    written, ``finetune`` returns ``status="cancelled"``."""

    def fault(step, loss_sum):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return loss_sum

    real = T.run_training
    monkeypatch.setattr(T, "run_training", lambda cfg: real(cfg, _fault=fault))
    out = tmp_path / "api"
    previous = signal.getsignal(signal.SIGTERM)
    run = finetune(
        model=str(setup["model"]),
        train_data=str(setup["train"]),
        context_length=96,
        duration="8st",
        output_dir=str(out),
        data__cache_dir=str(setup["cache"]),
    )
    assert run.status == "cancelled" and run.final_step == 3
    assert "rerun the same command to resume" in run.error
    assert checkpoints(out) == ["step-3"] and read_status(RunDir(out))["state"] == "cancelled"
    assert signal.getsignal(signal.SIGTERM) is previous


def test_status_of_a_finished_run(baseline):
    status = read_status(RunDir(baseline))
    assert status["state"] == "succeeded" and status["step"] == status["total_steps"] == 8
    assert status["ended_at"] >= status["started_at"]


def resume_cfg(setup, out: Path, *extra: str):
    return load_config(None, train_args(setup, out, *extra)[1:])


def test_resume_refuses_changed_data_model_and_optimizer_settings(setup, baseline, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(baseline, out)
    change = ["--context-length", "100", "--seed", "1", "--data.loss_on=last_assistant"]
    with pytest.raises(ConfigError) as e:
        T.run_training(resume_cfg(setup, out, "--grad-accum", "2", *change))
    msg = str(e.value)
    for diff in (
        "data.context_length: 96 → 100",
        "train.seed: 0 → 1",
        "data.loss_on: all_assistant → last_assistant",
    ):
        assert diff in msg
    assert "these change the data or the model" in msg and "optim" not in msg
    assert read_status(RunDir(out)) == read_status(RunDir(baseline))  # a refusal writes nothing

    with pytest.raises(ConfigError) as e:
        T.run_training(
            resume_cfg(setup, out, "--grad-accum", "2", "--lr", "5e-2", "--duration=10st")
        )
    msg = str(e.value)
    assert "optim.lr: 0.003 → 0.05" in msg and "train.duration: 8st → 10st" in msg
    assert f"--model {out / 'hf'}" in msg and "data.context_length" not in msg

    with pytest.raises(ConfigError, match="global batch: 2 → 3 sequences per optimizer step"):
        T.run_training(resume_cfg(setup, out, "--grad-accum", "3"))
    assert checkpoints(out) == ["step-7", "step-8"]


def test_a_refused_start_writes_nothing(setup, baseline, tmp_path):
    """Refused by the preflight: an existing run's status (here a finished run's) stays as it
    was, and no new folder is made."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    args = ["--grad-accum", "2", "--data", str(bad)]
    out = tmp_path / "copy"
    shutil.copytree(baseline, out)
    before = out / "status.json"
    snapshot = before.read_bytes()
    with pytest.raises(DataValidationError):
        T.run_training(resume_cfg(setup, out, *args))
    assert before.read_bytes() == snapshot
    with pytest.raises(DataValidationError):
        T.run_training(resume_cfg(setup, tmp_path / "new", *args))
    assert not (tmp_path / "new").exists()


def test_resume_accepts_the_same_global_batch_and_output_settings(setup, baseline, tmp_path):
    """From step 7 with batch_tokens instead of grad_accum (same 2 sequences per step), more
    checkpoints kept, eval every 4 steps: step 8 is bit-identical to the baseline's."""
    out = tmp_path / "copy"
    shutil.copytree(baseline, out)
    shutil.rmtree(out / "checkpoints" / "step-8")
    cfg = resume_cfg(setup, out, "--batch-tokens", "192", "--train.eval_every=4")
    cfg.checkpoint.keep_last = 5
    cfg.model.activation_checkpointing = "full"
    result = T.run_training(cfg)
    assert result.status == "succeeded" and result.final_step == 8
    assert train_losses(out) == train_losses(baseline)
    assert "resumed from" in (out / "train.log").read_text()


def test_resume_rule_for_layouts():
    """World size, dp and sp may change when the global batch stays (4 sequences a step)."""
    old = load_config(None, ["--model=m", "--data=t", "--grad-accum=1", "--sp=1"])
    new = load_config(None, ["--model=m", "--data=t", "--grad-accum=2", "--parallel.dp=2"])
    new.output.dir, new.checkpoint.every, new.data.cache_dir = "elsewhere", 5, "/tmp/c"
    check_resume_config(old, new, old_batch=4, new_batch=4, run_dir="r")
    with pytest.raises(ConfigError, match="global batch: 4 → 2"):
        check_resume_config(old, new, old_batch=4, new_batch=2, run_dir="r")


def test_delete_run_deletes_only_what_longtune_wrote(tmp_path, monkeypatch):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    (user / "config.yaml").write_text("model: {}\n")  # a common name: not what makes a run
    with pytest.raises(ValueError, match="not a longtune run folder"):
        delete_run(RunDir(user))
    assert (user / "notes.txt").read_text() == "keep me"

    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    mark_run(run)
    run.config.write_text("model: {}\n")
    (run.path / "notes.txt").write_text("added by the user")
    with pytest.raises(
        ValueError, match=r"holds files a longtune run does not write \(notes.txt\)"
    ):
        delete_run(run)
    (run.path / "notes.txt").unlink()
    monkeypatch.chdir(run.path)
    with pytest.raises(ValueError, match="is the current folder"):
        delete_run(run)
    monkeypatch.chdir(tmp_path)
    held = lock_run(run)
    code = f"from longtune.run_dir import *; delete_run(RunDir({str(run.path)!r}))"
    busy = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "RunLockedError" in busy.stderr and f"pid {os.getpid()}" in busy.stderr
    held.release()
    delete_run(run)
    assert not run.path.exists()
    delete_run(run)  # nothing there: nothing to do


def test_an_eval_done_on_resume_is_not_asked_for_again(setup, tmp_path):
    """Stopped at step 2 with its eval due (eval_every=2): the resume runs that eval, and the
    checkpoints written after it no longer ask a later resume to run it again."""

    def stop_at_2(step, loss_sum):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return loss_sum

    out = tmp_path / "evals"
    extra = ("--train.eval_every=2", "--checkpoint.every=2", "--checkpoint.keep_last=9")
    cfg = resume_cfg(setup, out, *extra)
    with pytest.raises(RunCancelled):
        T.run_training(cfg, _fault=stop_at_2)
    assert read_rank_states(out / "checkpoints" / "step-2")["train"]["eval_pending"] is True
    T.run_training(resume_cfg(setup, out, *extra))
    for step in (4, 6, 8):
        state = read_rank_states(out / "checkpoints" / f"step-{step}")["train"]
        assert state["eval_pending"] is False, step
    evals = [m["step"] for m in read_metrics(out) if m["kind"] == "eval"]
    assert evals == [0, 2, 4, 6, 8]


def test_failure_reasons():
    from longtune.fsutil import OutputDirError

    assert failure_reason(OutputDirError("cannot write checkpoint in x: No space")) == (
        "output error"
    )
    assert failure_reason(OSError(30, "Read-only file system")) == "output error"
    assert failure_reason(FileNotFoundError("data.train: x does not exist")) == "config error"
    assert failure_reason(ConfigError("optim.lr: 0 is invalid")) == "config error"
    assert failure_reason(RuntimeError("a bug")) == "error"


def test_an_error_that_follows_a_stop_signal_ends_the_run_cancelled(setup, tmp_path, monkeypatch):
    """A library interrupted by the signal may raise an error of its own (torch turns the
    interruption of a tensor's shape inference into a ValueError): the run ends cancelled, not
    failed with a config error."""
    from longtune.train.trainer import Trainer

    def interrupted(self):
        self.stop.signum = signal.SIGINT  # what the handler records
        raise ValueError("could not determine the shape of object type 'UntypedStorage'")

    monkeypatch.setattr(Trainer, "build", interrupted)
    out = tmp_path / "interrupted"
    with pytest.raises(RunCancelled, match="cancelled by SIGINT"):
        T.run_training(resume_cfg(setup, out))
    status = read_status(RunDir(out))
    assert status["state"] == "cancelled" and status["signal"] == "SIGINT"


def test_a_repeated_sigterm_does_not_cut_the_checkpoint_short_and_sigquit_stops_at_once(
    setup, tmp_path
):
    """`longtune runs cancel` twice (or the UI's Cancel clicked again) sends SIGTERM twice: the
    checkpoint the first asked for is still written. SIGQUIT (`runs cancel --now`) stops at once,
    leaving the newest complete checkpoint as it is."""
    out = tmp_path / "twice"
    args = [PY, "-m", "longtune", *train_args(setup, out, "--duration", "2000st")]
    proc = start(args)
    wait_for(proc, lambda: steps_done(out) >= 1)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.03)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "Traceback" not in stderr, stderr
    first = read_status(RunDir(out))
    assert first["state"] == "cancelled" and first["checkpoint"]
    assert checkpoints(out) == [f"step-{first['step']}"]

    proc = start(args)
    wait_for(proc, lambda: steps_done(out) >= first["step"] + 1)
    proc.send_signal(signal.SIGQUIT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGQUIT, stderr
    assert "SIGQUIT: stopping at once" in stderr and "Traceback" not in stderr
    status = read_status(RunDir(out))
    assert status["state"] == "cancelled" and status["signal"] == "SIGQUIT"
    assert checkpoints(out) == [f"step-{first['step']}"]  # the newest complete one, as it was


def test_data_edited_in_place_between_cancel_and_resume_is_refused(setup, tmp_path):
    """Same path, same number of packed sequences, other content: the resume is refused in one
    line naming the file, and the cancelled run's status (its checkpoint) stays as it was."""
    data = tmp_path / "train.jsonl"
    shutil.copy(setup["train"], data)

    def stop_at_2(step, loss_sum):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return loss_sum

    out = tmp_path / "edited"
    cfg = resume_cfg(setup, out, "--data", str(data))
    with pytest.raises(RunCancelled):
        T.run_training(cfg, _fault=stop_at_2)
    status = (out / "status.json").read_bytes()
    lines = data.read_text().splitlines()
    first = json.loads(lines[0])
    first["messages"][-1]["content"] += " Indeed."  # the first example's last answer, longer
    lines[0] = json.dumps(first)
    data.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError) as e:
        T.run_training(cfg)
    assert f"data file {data} (its content changed)" in str(e.value)
    assert "\n" not in str(e.value)
    assert (out / "status.json").read_bytes() == status
    assert checkpoints(out) == ["step-2"]
