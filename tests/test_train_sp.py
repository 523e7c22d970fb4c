"""Sequence parallelism end to end: real `longtune train` runs under torchrun against one process.

Tiny models (4 query / 2 KV heads, and the SmolLM2 shape 9 / 3), fp32 on CPU with gloo. Packed
chat examples of ~45 tokens in sequences of 96 (97 for SP=3, padded to 99), so documents cross
every slice boundary. Each layout must reproduce the single-process run's per-step losses and
gradient norms over 3 optimizer steps and its final (exported) weights to 1e-5 relative.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import make_hf_checkpoint, rel_err
from test_model import read_all

from longtune.checkpoint import find_latest_checkpoint
from longtune.run_dir import RunDir, read_metrics

pytestmark = pytest.mark.slow
PY = sys.executable
REL = 1e-5


def write_sums(path: Path, n: int = 40) -> Path:
    """``n`` chat examples "What is a plus b?" / "a plus b is c." (seeded), as JSONL."""
    rng = random.Random(0)
    with open(path, "w") as f:
        for _ in range(n):
            a, b = rng.randint(1, 999), rng.randint(1, 999)
            turns = [
                {"role": "user", "content": f"What is {a} plus {b}?"},
                {"role": "assistant", "content": f"{a} plus {b} is {a + b}."},
            ]
            f.write(json.dumps({"messages": turns}) + "\n")
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sp")
    write_sums(root / "train.jsonl")
    return {
        "root": root,
        "model": make_hf_checkpoint(root / "model", vocab_size=128),  # 4 heads, 2 KV heads
        "model9": make_hf_checkpoint(
            root / "model9",
            vocab_size=128,
            hidden_size=72,
            num_attention_heads=9,
            num_key_value_heads=3,
        ),
        "train": root / "train.jsonl",
        "cache": root / "cache",
    }


def env() -> dict[str, str]:
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(key, None)
    return e


def train_args(setup, out: Path, *extra: str, model: str = "model", context: int = 96) -> list:
    return [
        "train",
        "--model", str(setup[model]),
        "--data", str(setup["train"]),
        "--context-length", str(context),
        "--duration", "3st",
        "--lr", "3e-3",
        "--output-dir", str(out),
        f"--data.cache_dir={setup['cache']}",
        "--checkpoint.every=1",
        "--checkpoint.keep_last=5",
        *extra,
    ]  # fmt: skip


def launch(nproc: int, args: list) -> list[str]:
    if nproc == 1:
        return [PY, "-m", "longtune", *args]
    torchrun = [PY, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    return [*torchrun, "-m", "longtune", *args]


def run(nproc: int, args: list) -> Path:
    r = subprocess.run(launch(nproc, args), env=env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    return Path(args[args.index("--output-dir") + 1])


def train_records(run_dir: Path) -> dict[int, dict]:
    return {m["step"]: m for m in read_metrics(RunDir(run_dir)) if m["kind"] == "train"}


def assert_same_run(a: Path, b: Path, steps: tuple[int, ...] = (1, 2, 3)) -> None:
    """Per-step losses and gradient norms, and the exported weights, equal to 1e-5 relative."""
    ra, rb = train_records(a), train_records(b)
    assert sorted(ra) == sorted(rb) == list(steps)
    for step in ra:
        for key in ("loss", "grad_norm"):
            assert abs(ra[step][key] - rb[step][key]) <= REL * abs(rb[step][key]), (
                step, key, ra[step][key], rb[step][key],
            )  # fmt: skip
        assert ra[step]["supervised_tokens"] == rb[step]["supervised_tokens"]
    wa, wb = read_all(a / "hf"), read_all(b / "hf")
    assert sorted(wa) == sorted(wb)
    for k in wa:
        assert rel_err(wa[k], wb[k]) < REL, k


@pytest.fixture(scope="module")
def base(setup):
    """One process, two micro-batches per optimizer step."""
    return run(1, train_args(setup, setup["root"] / "base", "--grad-accum", "2"))


#: name -> (processes, SP degree, flags)
LAYOUTS = {
    "sp2": (2, 2, ["--sp", "2", "--grad-accum", "2"]),  # KV heads scattered
    # 2 KV heads repeated on 4 ranks; sp=auto with dp=1 is world / dp
    "sp4": (4, 4, ["--sp", "auto", "--parallel.dp=1", "--grad-accum", "2"]),
    "dp2sp2": (4, 2, ["--sp", "2", "--grad-accum", "1"]),  # same global batch
}


@pytest.fixture(scope="module")
def layout_run(setup):
    """``layout_run(name)``: the finished run of ``LAYOUTS[name]``, run once per module (the
    parity test checks it, the resume test copies it)."""
    done: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in done:
            nproc, _, extra = LAYOUTS[name]
            done[name] = run(nproc, train_args(setup, setup["root"] / name, *extra))
        return done[name]

    return get


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_sequence_parallel_layouts_reproduce_one_process(base, layout_run, name):
    out = layout_run(name)
    assert_same_run(out, base)
    nproc, sp, _ = LAYOUTS[name]
    assert f"(dp {nproc // sp}, sp {sp})" in (out / "train.log").read_text()


def test_sp3_on_the_smollm2_head_shape_with_padding(setup):
    """9 query / 3 KV heads at SP=3, alone and as DP=2 x SP=3 (6 ranks: the supervised-token
    count, reported by each of an SP group's 3 ranks, is counted once); 97 tokens are padded
    to 99 (the padding carries no loss and no document sees it)."""

    def args(name: str, *extra: str) -> list:
        return train_args(setup, setup["root"] / name, *extra, model="model9", context=97)

    one = run(1, args("base9", "--grad-accum", "2"))
    assert_same_run(run(3, args("sp3", "--sp", "3", "--grad-accum", "2")), one)
    dp2sp3 = run(6, args("dp2sp3", "--sp", "3", "--grad-accum", "1"))
    assert_same_run(dp2sp3, one)
    assert "(dp 2, sp 3)" in (dp2sp3 / "train.log").read_text()


def _resume_copy(src: Path, dst: Path, keep_step: int) -> Path:
    """A copy of a finished run as it was right after checkpoint ``keep_step``."""
    shutil.copytree(src, dst)
    shutil.rmtree(dst / "hf")
    for ckpt in (dst / "checkpoints").iterdir():
        if int(ckpt.name.split("-")[1]) > keep_step:
            shutil.rmtree(ckpt)
    return dst


@pytest.mark.parametrize(
    ("source", "nproc", "extra"),
    [
        ("sp2", 1, ["--grad-accum", "2"]),  # SP=2 -> SP=1
        ("dp2sp2", 1, ["--grad-accum", "2"]),  # DP=2 x SP=2 -> one process
        ("base", 4, ["--sp", "2", "--grad-accum", "1"]),  # and back: one process -> DP=2 x SP=2
    ],
)
def test_resume_at_another_layout_continues_the_same_run(
    setup, base, layout_run, source, nproc, extra
):
    src = base if source == "base" else layout_run(source)
    out = _resume_copy(src, setup["root"] / f"resume-{source}", keep_step=1)
    run(nproc, train_args(setup, out, *extra))
    log = (out / "train.log").read_text()
    assert f"resumed from {out}/checkpoints/step-1 at step 1" in log
    assert_same_run(out, base)


def _rank_env(rank: int, world: int, port: int) -> dict[str, str]:
    return dict(
        env(),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_killed_rank_stops_the_others_and_the_same_command_resumes(setup, tmp_path):
    """Two ranks started without torchrun (as a scheduler starts them on two nodes): `kill -9`
    of one makes the other exit non-zero within parallel.timeout_s, and starting the same two
    commands again resumes from the newest complete checkpoint."""
    out = tmp_path / "killed"
    args = train_args(setup, out, "--sp", "2", "--parallel.timeout_s=20")
    args[args.index("--duration") + 1] = "20st"
    args[args.index("--checkpoint.every=1")] = "--checkpoint.every=4"

    def start() -> list[subprocess.Popen]:
        port = _free_port()
        return [
            subprocess.Popen(
                [PY, "-m", "longtune", *args],
                env=_rank_env(r, 2, port),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            for r in range(2)
        ]

    procs = start()
    deadline = time.monotonic() + 240
    while not (out / "checkpoints" / "step-8").is_dir():
        assert all(p.poll() is None for p in procs), [p.stderr.read()[-2000:] for p in procs]
        assert time.monotonic() < deadline, "the run never reached step 8"
        time.sleep(0.05)
    os.kill(procs[1].pid, signal.SIGKILL)
    killed_at = time.monotonic()
    rc = procs[0].wait(timeout=60)
    waited = time.monotonic() - killed_at
    stderr = procs[0].stderr.read()
    procs[1].wait()
    assert rc != 0 and waited < 20 + 10, (rc, waited)
    assert "Traceback" not in stderr, stderr[-3000:]
    assert "another rank died or stopped answering" in stderr
    assert "rerun the same command to resume" in stderr
    newest = find_latest_checkpoint(out / "checkpoints")
    assert newest is not None and int(newest.name.split("-")[1]) >= 8

    procs = start()
    codes = [p.wait(timeout=300) for p in procs]
    assert codes == [0, 0], [p.stderr.read()[-3000:] for p in procs]
    log = (out / "train.log").read_text()
    assert f"resumed from {newest}" in log
    assert sorted(train_records(out)) == list(range(1, 21))


@pytest.mark.parametrize(
    ("model", "world", "sp", "problem", "valid"),
    [
        ("model", 4, 3, "parallel.sp=3 does not divide the world size 4", "1, 2, 4"),
        ("model9", 2, 2, "parallel.sp=2 does not divide the 9 query heads", "1"),
    ],
)
def test_invalid_layout_is_refused_before_any_weight_is_read(
    setup, tmp_path, model, world, sp, problem, valid
):
    """The layout is checked in preflight (config.json only): the weights here are garbage, and
    the refusal is about the layout, before a process group or the run folder exists."""
    folder = tmp_path / "model"
    shutil.copytree(setup[model], folder)
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    out = tmp_path / "run"
    args = train_args(setup, out, "--sp", str(sp), model=model)
    args[args.index(str(setup[model]))] = str(folder)
    r = subprocess.run(
        [PY, "-m", "longtune", *args],
        env=dict(env(), WORLD_SIZE=str(world), RANK="0"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert problem in r.stderr
    assert f"Valid parallel.sp on {world} ranks for this model: {valid};" in r.stderr
    assert not out.exists()


@pytest.mark.slow
def test_under_torchrun_a_refusal_is_said_once(setup, tmp_path):
    """Every rank refuses the same layout in its preflight; rank 0 says why in one line, the
    other ranks exit quietly with the same code (no second copy, no "cancelled by SIGTERM")."""
    out = tmp_path / "run"
    r = subprocess.run(
        launch(2, train_args(setup, out, "--sp", "3")),
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode != 0
    said = [line for line in r.stderr.splitlines() if "longtune train" in line]
    assert len(said) == 1 and "parallel.sp=3 does not divide the world size 2" in said[0], said
    assert not out.exists()
