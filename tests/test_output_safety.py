"""Output folders: longtune never deletes or replaces a folder it did not write.

``longtune convert SRC OUT``, ``longtune export SRC OUT`` and ``save_model`` run against a
folder holding a user's file, against their own source, inside it, around it, through a link and
against the current folder; the user's file must still be there, byte for byte, with the folder's
mode.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cli_harness import cli_env
from helpers import make_hf_checkpoint
from test_model import assert_same_checkpoint

import longtune
from longtune.fsutil import OUTPUT_MARKER, OutputDirError, is_longtune_output
from longtune.model.convert import convert_hf_to_native

NOTE = b"my notes \x00\xff -- not longtune's\n"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """An HF folder, its native conversion, and a reference export (each written once)."""
    root = tmp_path_factory.mktemp("out")
    hf = make_hf_checkpoint(root / "hf")
    native = convert_hf_to_native(hf, root / "native")
    return {"root": root, "hf": hf, "native": native}


def user_folder(path: Path, mode: int = 0o750) -> Path:
    path.mkdir(parents=True)
    (path / "notes.txt").write_bytes(NOTE)
    os.chmod(path, mode)
    return path


def assert_untouched(path: Path, mode: int = 0o750) -> None:
    assert sorted(p.name for p in path.iterdir()) == ["notes.txt"]
    assert (path / "notes.txt").read_bytes() == NOTE
    assert stat.S_IMODE(path.stat().st_mode) == mode


def snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in path.rglob("*") if p.is_file()}


def test_cli_refuses_user_folders_sources_and_the_current_folder(folders, tmp_path, cli_server):
    """Every refusal is one line on stderr, exit code 2, and leaves every file as it was."""
    hf, native = folders["hf"], folders["native"]
    user = user_folder(tmp_path / "user")
    (tmp_path / "link").symlink_to(native)
    hf_before, native_before = snapshot(hf), snapshot(native)
    cases = {
        "convert into a user folder": (["convert", str(hf), str(user)], tmp_path),
        "export into a user folder": (["export", str(native), str(user)], tmp_path),
        "--overwrite a user folder": (["export", str(native), str(user), "--overwrite"], tmp_path),
        "convert onto its source": (["convert", str(hf), str(hf), "--overwrite"], tmp_path),
        "convert into its source": (["convert", str(hf), str(hf / "native")], tmp_path),
        "export onto its source": (["export", str(native), str(native), "--overwrite"], tmp_path),
        "export onto a link to its source": (
            ["export", str(native), str(tmp_path / "link"), "--overwrite"],
            tmp_path,
        ),
        "export around its source": (["export", str(native), str(native.parent)], tmp_path),
        "export into the current folder": (["export", str(native), "."], user),
    }
    results = {name: cli_server.run(argv, cwd) for name, (argv, cwd) in cases.items()}
    lines = {name: r.error_line() for name, r in results.items()}
    for name in list(cases)[:3]:
        assert "is not empty and was not written by longtune (it holds notes.txt)" in lines[name]
    assert "is the source" in lines["convert onto its source"]
    assert "is inside the source" in lines["convert into its source"]
    assert "is the source" in lines["export onto its source"]
    assert "is the source" in lines["export onto a link to its source"]
    assert "holds the source" in lines["export around its source"]
    assert "is the current folder" in lines["export into the current folder"]
    assert_untouched(user)
    assert snapshot(hf) == hf_before and snapshot(native) == native_before
    assert not (hf / "native").exists()


def test_overwrite_replaces_only_longtune_output_and_keeps_the_mode(folders, tmp_path, cli_server):
    native = folders["native"]
    out = tmp_path / "out"
    first = subprocess.run(
        [sys.executable, "-m", "longtune", "export", str(native), str(out)],
        env=cli_env(),
        capture_output=True,
        text=True,
    )
    assert first.returncode == 0, first.stderr
    assert is_longtune_output(out) and (out / OUTPUT_MARKER).is_file()
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~_umask()  # not mkdtemp's 0700
    assert_same_checkpoint(folders["hf"], out)  # the marker does not disturb an HF folder
    os.chmod(out, 0o750)
    again = cli_server.run(["export", native, out], tmp_path)
    assert "pass --overwrite" in again.error_line()
    (out / "notes.txt").write_text("the user's, added after the export")
    refused = cli_server.run(["export", native, out, "--overwrite"], tmp_path)
    assert refused.rc == 2 and "holds files longtune did not write there (notes.txt)" in (
        refused.error_line()
    )
    assert (out / "notes.txt").read_text() == "the user's, added after the export"
    (out / "notes.txt").unlink()
    forced = cli_server.run(["export", native, out, "--overwrite"], tmp_path)
    assert forced.rc == 0, forced.stderr
    assert is_longtune_output(out)
    assert stat.S_IMODE(out.stat().st_mode) == 0o750
    assert_same_checkpoint(folders["hf"], out)


def test_an_empty_folder_is_used_and_keeps_its_mode(folders, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    os.chmod(out, 0o711)
    longtune.save_model(longtune.load_model(folders["hf"]), out)
    assert stat.S_IMODE(out.stat().st_mode) == 0o711
    assert_same_checkpoint(folders["hf"], out)


def test_save_model_refuses_a_user_folder_before_writing_anything(folders, tmp_path):
    user = user_folder(tmp_path / "user")
    model = longtune.load_model(folders["hf"])
    for overwrite in (False, True):
        with pytest.raises(OutputDirError, match="was not written by longtune"):
            longtune.save_model(model, user, overwrite=overwrite)
    with pytest.raises(OutputDirError, match="is the source"):
        longtune.save_model(model, folders["hf"], overwrite=True)
    assert_untouched(user)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["user"]  # no temporary folder left


def test_a_failed_write_leaves_the_old_output_and_no_temporary(folders, tmp_path, monkeypatch):
    out = longtune.save_model(longtune.load_model(folders["hf"]), tmp_path / "out")
    before = snapshot(out)
    model = longtune.load_model(folders["hf"])
    import longtune.model.hf as hf_mod

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(hf_mod, "open", broken, raising=False)  # the weights' file
    with pytest.raises(OutputDirError, match="No space left on device"):
        longtune.save_model(model, out, overwrite=True)
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_temporaries_of_a_killed_writer_are_removed_and_nothing_else(folders, tmp_path):
    dead = 4_000_000  # above Linux's pid_max default: never a live process
    while True:
        try:
            os.kill(dead, 0)
        except ProcessLookupError:
            break
        dead += 1
    stale = tmp_path / f"out.tmp-{dead}-0123abcd"
    live = tmp_path / f"out.tmp-{os.getpid()}-0123abcd"  # a writer still at work
    user = tmp_path / "out.tmp-mine"
    for d in (stale, live, user):
        d.mkdir()
        (d / "f").write_text("x")
    longtune.save_model(longtune.load_model(folders["hf"]), tmp_path / "out")
    assert not stale.exists() and live.exists() and user.exists()


def training_run(path: Path) -> Path:
    """A run folder as a training run leaves it (marker, config, metrics, a checkpoint)."""
    from longtune.run_dir import RunDir, mark_run

    run = RunDir(path)
    run.path.mkdir(parents=True)
    mark_run(run)
    run.config.write_text("model: {path: /m}\n")
    run.metrics.write_text('{"step": 1, "loss": 2.0}\n')
    (run.checkpoints / "step-1").mkdir(parents=True)
    (run.checkpoints / "step-1" / "COMPLETE").write_text("{}")
    return run.path


def test_overwrite_never_replaces_a_training_run_finished_or_live(folders, tmp_path, cli_server):
    """`export` / `convert --overwrite` onto a run folder: refused in one line, the run (its
    checkpoints, config, metrics, lock) as it was — also while a trainer holds its lock."""
    from longtune.run_dir import RunDir, lock_run

    run = training_run(tmp_path / "run")
    before = snapshot(run)
    lock = lock_run(RunDir(run))  # a live run
    try:
        for argv in (
            ["export", folders["native"], run, "--overwrite"],
            ["convert", folders["hf"], run, "--overwrite"],
        ):
            r = cli_server.run(argv, tmp_path)
            assert r.rc == 2 and "is a training run, not an earlier export or convert output" in (
                r.error_line()
            )
    finally:
        lock.release()
    r = cli_server.run(["export", folders["native"], run, "--overwrite"], tmp_path)  # finished
    assert r.rc == 2 and "is a training run" in r.error_line()
    after = snapshot(run)
    after.pop("run.lock")
    assert after == before


def test_overwrite_refuses_a_file_edited_since_the_export(folders, tmp_path, cli_server):
    out = tmp_path / "out"
    assert cli_server.run(["export", folders["native"], out], tmp_path).rc == 0
    config = out / "config.json"
    edited = config.read_text().replace('"llama"', '"llama" ')  # same size: a real edit
    assert len(edited) == len(config.read_text()) + 1
    config.write_text(edited)
    r = cli_server.run(["export", folders["native"], out, "--overwrite"], tmp_path)
    assert r.rc == 2 and "holds files changed since longtune wrote them (config.json)" in (
        r.error_line()
    )
    assert config.read_text() == edited


def test_export_never_writes_into_a_run_folder(folders, tmp_path, cli_server):
    """A run's hf/ is the run's own export (what the run reports); `longtune export` of a
    checkpoint or native folder into it is refused."""
    run = training_run(tmp_path / "run")
    r = cli_server.run(["export", folders["native"], run / "hf", "--overwrite"], tmp_path)
    assert r.rc == 2 and f"is inside the training run {run}" in r.error_line()
    assert not (run / "hf").exists()


def test_the_demo_deletes_only_a_folder_an_earlier_demo_wrote(tmp_path):
    from longtune.demo.run import run_demo
    from longtune.run_dir import RunDir, mark_run

    run = training_run(tmp_path / "real")
    before = snapshot(run)
    with pytest.raises(ValueError, match="is a training run that demo did not make; not deleting"):
        run_demo(output_dir=str(run))
    assert snapshot(run) == before
    with pytest.raises(ValueError, match="needs at least 1 optimizer step"):
        run_demo(output_dir=str(tmp_path / "new"), steps=0)
    assert not (tmp_path / "new").exists()
    demo = RunDir(tmp_path / "demo")
    demo.path.mkdir()
    mark_run(demo, made_by="demo")
    (demo.path / "metrics.jsonl").write_text("")
    from longtune.run_dir import delete_run

    delete_run(demo, only_made_by="demo")
    assert not demo.path.exists()


def test_a_full_disk_during_an_export_is_one_line(folders, tmp_path, monkeypatch):
    """A full disk while the weights are written is one OutputDirError line naming the folder
    (status reason ``output error`` in a run), and leaves nothing behind."""
    import errno
    import io

    import longtune.model.hf as hf_mod
    from longtune.train.result import failure_reason

    class FullDisk(io.BytesIO):
        def write(self, data):
            if self.tell() > 64:
                raise OSError(errno.ENOSPC, "No space left on device")  # a write: no file name
            return super().write(data)

    monkeypatch.setattr(hf_mod, "open", lambda *a, **k: FullDisk(), raising=False)
    with pytest.raises(OutputDirError) as e:
        longtune.save_model(longtune.load_model(folders["hf"]), tmp_path / "out")
    assert str(e.value) == (
        f"cannot write the export in {tmp_path}: No space left on device; free space there or "
        "choose another folder"
    )
    assert failure_reason(e.value) == "output error"
    assert sorted(p.name for p in tmp_path.iterdir()) == []
