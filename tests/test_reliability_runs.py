"""Whole runs under faults: crafted checkpoints, full and read-only disks, kills at random moments.

All runs are real ``longtune train`` / ``longtune export`` command lines, each its own process
(forked by :class:`cli_harness.CliServer`, so the imports are paid once). One uninterrupted
baseline run (tiny model, context 64, 6 steps, a checkpoint every step) is the reference.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import time
import zlib
from pathlib import Path

import pytest
from cli_harness import CliServer
from helpers import make_hf_checkpoint

from longtune.checkpoint import find_latest_checkpoint

STEPS = 6


def write_data(path: Path, n: int, seed: int) -> Path:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            a, b = rng.randint(1, 99), rng.randint(1, 99)
            turns = [
                {"role": "user", "content": f"What is {a} plus {b}?"},
                {"role": "assistant", "content": f"{a} plus {b} is {a + b}."},
            ]
            f.write(json.dumps({"messages": turns}) + "\n")
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("rel")
    model = make_hf_checkpoint(root / "model")
    data = write_data(root / "train.jsonl", 48, seed=0)
    # One example longer than the context, so the overlength counts are not all zero.
    long = {
        "messages": [
            {"role": "user", "content": "Count."},
            {"role": "assistant", "content": "1 " * 40},
        ]
    }
    with open(data, "a") as f:
        f.write(json.dumps(long) + "\n")
    return {"root": root, "model": model, "data": data, "cache": root / "cache"}


def train_argv(setup, out: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--model",
        setup["model"],
        "--data",
        setup["data"],
        "--context-length",
        "64",
        "--duration",
        f"{STEPS}st",
        "--lr",
        "3e-3",
        "--output-dir",
        out,
        f"--data.cache_dir={setup['cache']}",
        "--checkpoint.every=1",
        "--checkpoint.keep_last=2",
        *extra,
    ]


def weights_digest(run: Path) -> str:
    """SHA-256 of the exported weights (bit for bit)."""
    return hashlib.sha256((run / "hf" / "model.safetensors").read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def server(cli_server):
    return cli_server


@pytest.fixture(scope="module")
def baseline(setup, server):
    out = setup["root"] / "baseline"
    t0 = time.monotonic()
    r = server.run(train_argv(setup, out), setup["root"])
    assert r.rc == 0, r.stderr[-3000:]
    return {
        "run": out,
        "digest": weights_digest(out),
        "stdout": r.stdout,
        "seconds": time.monotonic() - t0,
    }


def test_train_logs_what_the_overlength_policy_did(baseline):
    line = next(x for x in baseline["stdout"].splitlines() if "training data:" in x)
    assert "49 examples in 1 file(s): 1 over the 64-token context (1 truncated, 0 dropped" in line
    assert line in (baseline["run"] / "train.log").read_text()


# ------------------------------------------------------------------- crafted checkpoint files


class CreatesAFile:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def plant_malicious_metadata(step: Path, victim: Path) -> None:
    """Replace ``.metadata`` with a pickle that creates ``victim``, and fix the manifest's
    sizes and checksums as a careful attacker would."""
    import pickle

    (step / ".metadata").write_bytes(pickle.dumps(CreatesAFile(str(victim))))
    marker = step / "COMPLETE"
    manifest = json.loads(marker.read_text())
    for name in manifest["files"]:
        data = (step / name).read_bytes()
        manifest["files"][name] = {"size": len(data), "crc32": zlib.crc32(data)}
    marker.write_text(json.dumps(manifest))


def test_crafted_checkpoint_is_refused_by_train_and_export(setup, server, baseline, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(baseline["run"], run)
    newest = run / "checkpoints" / f"step-{STEPS}"
    victim = tmp_path / "pwned"
    plant_malicious_metadata(newest, victim)
    # Resume (auto) would pick the crafted checkpoint: refused in the preflight.
    train = server.run(train_argv(setup, run, f"--duration={STEPS + 2}st"), tmp_path)
    line = train.error_line()
    assert f"{newest}/.metadata refers to io.open" in line and "crafted" in line
    export = server.run(["export", newest, tmp_path / "out"], tmp_path)
    assert f"{newest}/.metadata refers to io.open" in export.error_line()
    assert not victim.exists() and not (tmp_path / "out").exists()


def test_export_of_a_checkpoint_refuses_the_run_folder_and_user_folders(server, baseline, tmp_path):
    step = baseline["run"] / "checkpoints" / f"step-{STEPS}"
    user = tmp_path / "notes"
    user.mkdir()
    (user / "todo.txt").write_text("keep me")
    sidecar = tmp_path / "new.export_check.json"  # where the export's self-check would go
    sidecar.write_text("my notes")
    results = [
        server.run(["export", step, tmp_path / "new"], tmp_path),
        server.run(["export", step, baseline["run"]], tmp_path),
        server.run(["export", step, step / "hf"], tmp_path),
        server.run(["export", step, user], tmp_path),
        server.run(["export", step, baseline["run"] / "source", "--overwrite"], tmp_path),
        server.run(["export", step, "."], tmp_path),
    ]
    lines = [r.error_line() for r in results]
    assert f"{sidecar} exists and was not written by longtune" in lines.pop(0)
    assert sidecar.read_text() == "my notes" and not (tmp_path / "new").exists()
    assert "holds the source" in lines[0]
    assert f"is inside the training run {baseline['run']}" in lines[1]
    assert "was not written by longtune (it holds todo.txt)" in lines[2]
    assert f"is inside the training run {baseline['run']}" in lines[3]
    assert "output folder '.' is the current folder or holds it" in lines[4]
    assert (user / "todo.txt").read_text() == "keep me"
    assert find_latest_checkpoint(baseline["run"] / "checkpoints") == step


# ------------------------------------------------------------------- full and read-only disks


def private_mount_prefix() -> list[str] | None:
    """A command prefix giving the CLI server a private mount namespace, or None if this
    machine allows none (no unshare, no user namespaces)."""
    for prefix in (["unshare", "-rm"], ["unshare", "-m"]):
        try:
            ok = subprocess.run([*prefix, "true"], capture_output=True, timeout=10)
        except (FileNotFoundError, subprocess.TimeoutExpired):
            return None
        if ok.returncode == 0:
            return prefix
    return None


def mounted_server(script: str) -> CliServer:
    """A CLI server whose mount namespace first ran ``script`` (tmpfs mounts)."""
    prefix = private_mount_prefix()
    if prefix is None:
        pytest.skip("no private mount namespace here (unshare -m / -rm not permitted)")
    return CliServer(prefix=[*prefix, "sh", "-c", script + ' && exec "$@"', "sh"])


def du_kib(path: Path) -> int:
    return sum(-(-p.stat().st_size // 4096) * 4 for p in path.rglob("*") if p.is_file()) + 64


def test_disk_full_is_one_line_and_keeps_the_newest_checkpoint(setup, baseline, tmp_path):
    """A fresh run on a tmpfs (in a private mount namespace) with room for its first checkpoint
    but not its second: the second hits ENOSPC for real."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    first = baseline["run"] / "checkpoints" / f"step-{STEPS}"  # the size of any checkpoint
    size = du_kib(first) + du_kib(baseline["run"] / "source") + 320  # + logs, not a checkpoint
    run = mnt / "run"
    with mounted_server(f"mount -t tmpfs -o size={size}k tmpfs {mnt}") as server:
        r = server.run(train_argv(setup, run), tmp_path)
        line = r.error_line()
        code = (
            "import pathlib\n"
            "from longtune.checkpoint import find_latest_checkpoint\n"
            f"result = [str(find_latest_checkpoint('{run}/checkpoints')), "
            f"sorted(p.name for p in pathlib.Path('{run}/checkpoints').iterdir())]"
        )
        latest, names = server.python(code)
    assert line == (
        f"longtune train: error: cannot write checkpoint in {run}/checkpoints: No space left on "
        "device; free space there or choose another folder"
    )
    # The newest complete checkpoint verifies (every file's CRC32 as written at its commit),
    # and the failed one left no half-written folder behind.
    assert latest == str(run / "checkpoints" / "step-1")
    assert names == ["step-1"]


def test_read_only_output_and_cache_folders_are_one_line(setup, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    with mounted_server(f"mount -t tmpfs -o ro tmpfs {ro}") as server:
        out = server.run(train_argv(setup, ro / "run"), tmp_path)
        cache = server.run(
            train_argv(setup, tmp_path / "run", f"--data.cache_dir={ro / 'cache'}"), tmp_path
        )
    assert out.error_line() == (
        f"longtune train: error: cannot write output.dir in {ro}: read-only file system; "
        "make it writable or choose another folder"
    )
    assert cache.error_line() == (
        f"longtune train: error: cannot write data.cache_dir in {ro}: read-only file system; "
        "make it writable or choose another folder"
    )


# ------------------------------------------------------------------------------ fault injection

TRIALS = 20
KILLS = (signal.SIGKILL, signal.SIGTERM, signal.SIGINT)


def corrupt_random_checkpoint_files(run: Path, rng: random.Random) -> list[str]:
    """XOR random bytes of 1-3 random files of random complete checkpoints (any file of the
    folder: shards, metadata, rank files, the manifest)."""
    steps = [d for d in (run / "checkpoints").glob("step-*") if re.fullmatch(r"step-\d+", d.name)]
    files = sorted(p for d in steps for p in d.iterdir() if p.is_file())
    if not files:
        return []
    hit = []
    for file in rng.sample(files, min(len(files), rng.randint(1, 3))):
        data = bytearray(file.read_bytes())
        for _ in range(rng.randint(1, 400)):
            if data:
                data[rng.randrange(len(data))] ^= rng.randrange(1, 256)
        file.write_bytes(bytes(data))
        hit.append(str(file.relative_to(run)))
    return hit


def steps_done(run: Path) -> int:
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    return sum('"kind": "train"' in line for line in lines)


def ended(pid: int) -> bool:
    """The child has exited (a zombie until the CLI server collects it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat[stat.rindex(")") + 2] == "Z"


def kill_at(pid: int, sig: int, run: Path, after_step: int, delay: float) -> None:
    """Send ``sig`` ``delay`` seconds after the run logged step ``after_step`` (0: after its
    start). Load on the machine changes how long a run takes; anchoring the moment to the
    run's own progress keeps every part of a run (loading, steps, checkpoint writes, the
    final eval, the export) in reach whatever the load."""
    deadline = time.monotonic() + 120
    while steps_done(run) < after_step and not ended(pid) and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(delay)
    os.kill(pid, sig)


@pytest.mark.slow
def test_kills_at_random_moments_then_resume_gives_the_same_weights(setup, server, baseline):
    """SIGKILL, SIGTERM or SIGINT at a random moment of a run (seeded), sometimes random bytes
    of random checkpoint files corrupted, then the same command again: the final weights equal
    the uninterrupted run's, bit for bit, every time."""
    rng = random.Random(2024)
    step_s = baseline["seconds"] / (STEPS + 4)  # about: loading and export count ~4 steps
    log = []
    for trial in range(TRIALS):
        run = setup["root"] / f"trial-{trial}"
        sig = KILLS[trial % len(KILLS)]
        after, delay = rng.randint(0, STEPS), rng.uniform(0.0, step_s)
        pid = server.start(train_argv(setup, run), setup["root"])
        kill_at(pid, sig, run, after, delay)
        first = server.wait(pid)
        if sig != signal.SIGKILL:
            # Graceful: a finished step, a checkpoint, one line, 128 + signal (or done before).
            assert first.rc in (0, 128 + sig, -sig), (trial, first.rc, first.stderr[-2000:])
            assert "Traceback" not in first.stderr, (trial, first.stderr[-3000:])
        # Which trials corrupt is drawn from the plan's RNG; what they corrupt from one of the
        # trial's own, so the plan (the signal, the moment) never depends on how many files a
        # run had written when it was stopped.
        corrupt = rng.random() < 0.4
        files_rng = random.Random(1000 + trial)
        corrupted = corrupt_random_checkpoint_files(run, files_rng) if corrupt else []
        again = server.run(train_argv(setup, run), setup["root"])
        moment = f"step {after} + {delay:.2f} s"
        log.append((trial, signal.Signals(sig).name, moment, first.rc, corrupted))
        assert again.rc == 0, (log[-1], again.stderr[-3000:])
        assert weights_digest(run) == baseline["digest"], log[-1]
        shutil.rmtree(run)
    print("trial, signal, moment, exit code, corrupted files:", *log, sep="\n")
    # The seeded plan covers every signal, corruption in several trials, and most kills land
    # inside the run (not after it ended).
    assert {name for _, name, *_ in log} == {"SIGKILL", "SIGTERM", "SIGINT"}
    assert sum(1 for *_, c in log if c) >= 4, log
    assert sum(1 for _, _, _, rc, _ in log if rc != 0) >= TRIALS // 2, log
