"""End-to-end training runs on a tiny model: kill -9 and resume, data parallel parity, failure
policy, export.

Each run is a real `python -m longtune train` process (or torchrun with 2 processes), so what is
tested is what a user runs.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import make_hf_checkpoint
from test_model import read_all

import longtune.train.run as R
import longtune.train.trainer as T
from longtune.api import finetune
from longtune.run_dir import RunDir, read_status, rewrite_metrics
from longtune.run_dir import read_metrics as _read_metrics
from longtune.train.result import TrainingDivergedError

pytestmark = pytest.mark.slow
PY = sys.executable


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    model = make_hf_checkpoint(root / "model", vocab_size=128)
    rng = random.Random(0)

    def write(path: Path, n: int) -> Path:
        with open(path, "w") as f:
            for _ in range(n):
                a, b = rng.randint(1, 99), rng.randint(1, 99)
                turns = [
                    {"role": "user", "content": f"What is {a} plus {b}?"},
                    {"role": "assistant", "content": f"{a} plus {b} is {a + b}."},
                ]
                f.write(json.dumps({"messages": turns}) + "\n")
        return path

    return {
        "root": root,
        "model": model,
        "train": write(root / "train.jsonl", 48),
        "eval": write(root / "eval.jsonl", 10),  # packs into an odd number of sequences
        "cache": root / "cache",
    }


def train_args(setup, out: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--model",
        str(setup["model"]),
        "--data",
        str(setup["train"]),
        "--eval-data",
        str(setup["eval"]),
        "--context-length",
        "96",
        "--duration",
        "8st",
        "--lr",
        "3e-3",
        "--output-dir",
        str(out),
        f"--data.cache_dir={setup['cache']}",
        "--optim.warmup_steps=2",
        *extra,
    ]


def env() -> dict[str, str]:
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    e.pop("RANK", None)
    e.pop("WORLD_SIZE", None)
    return e


def run_cli(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PY, "-m", "longtune", *args], env=env(), capture_output=True, text=True, timeout=timeout
    )


def read_metrics(run_dir: Path) -> list[dict]:
    return _read_metrics(RunDir(run_dir))


def train_losses(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_metrics(run_dir) if m["kind"] == "train"}


def assert_losses_equal(a: dict[int, float], b: dict[int, float], rel: float) -> None:
    assert sorted(a) == sorted(b), (sorted(a), sorted(b))
    for step in a:
        assert abs(a[step] - b[step]) <= rel * abs(b[step]), (step, a[step], b[step])


@pytest.fixture(scope="module")
def baseline(setup):
    out = setup["root"] / "baseline"
    r = run_cli(train_args(setup, out, "--grad-accum", "2", "--checkpoint.every=1"))
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_baseline_run_learns_and_exports(baseline):
    m = read_metrics(baseline)
    train = [r for r in m if r["kind"] == "train"]
    evals = [r for r in m if r["kind"] == "eval"]
    assert [r["step"] for r in train] == list(range(1, 9))
    for key in (
        "loss",
        "lr",
        "grad_norm",
        "tokens",
        "supervised_tokens",
        "tokens_per_s",
        "peak_memory_gb",
        "elapsed_s",
    ):
        assert key in train[0]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 8
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    check = json.loads((baseline / "export_check.json").read_text())
    assert check["passed"] and check["rel_err_vs_transformers"] < 1e-5

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(baseline / "hf")
    tok = AutoTokenizer.from_pretrained(baseline / "hf")
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is 2 plus 3?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == prompt["input_ids"].shape[1] + 5
    assert (baseline / "config.yaml").is_file() and (baseline / "train.log").is_file()


def test_initial_eval_loss_equals_transformers_on_each_document(setup, baseline):
    """The step-0 eval of a run (data path + model loading + sharding + chunked loss) equals the
    loss transformers computes on the original model, document by document."""
    from transformers import LlamaForCausalLM

    from longtune.data import build_packed_dataset

    ds = build_packed_dataset(
        [str(setup["eval"])], setup["model"], "chat", 96, cache_dir=setup["cache"]
    )
    hf = LlamaForCausalLM.from_pretrained(setup["model"], dtype=torch.float32).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(len(ds)):
            item = ds[i]
            cu = item["cu_seqlens"].tolist()
            for a, b in zip(cu[:-1], cu[1:], strict=True):
                labels = torch.as_tensor(item["labels"][a:b])
                if (labels == -100).all():
                    continue
                logits = hf(torch.as_tensor(item["input_ids"][a:b])[None]).logits[0]
                total += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
                count += int((labels != -100).sum())
    first_eval = next(m for m in read_metrics(baseline) if m["kind"] == "eval")
    assert first_eval["step"] == 0 and first_eval["eval_tokens"] == count
    assert abs(first_eval["eval_loss"] - total / count) < 1e-5 * (total / count)


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 120) -> bool:
    """SIGKILL ``proc`` as soon as ``ready()``; False if it ended first."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            return False
        if ready():
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.002)
    raise TimeoutError("the run never reached the kill point")


@pytest.mark.slow
def test_kill9_at_random_moments_then_resume_gives_identical_run(setup, baseline):
    out = setup["root"] / "killed"
    args = [
        PY,
        "-m",
        "longtune",
        *train_args(setup, out, "--grad-accum", "2", "--checkpoint.every=1"),
    ]
    ckpts = out / "checkpoints"
    rng = random.Random(1234)

    def steps_done() -> int:
        return len(train_losses(out)) if (out / "metrics.jsonl").exists() else 0

    def writing_checkpoint() -> bool:
        return ckpts.exists() and any(".tmp-" in p.name for p in ckpts.iterdir())

    kill_points = [
        # during a checkpoint write (the tmp dir exists and is being filled)
        writing_checkpoint,
        # at a random moment after some progress
        lambda: steps_done() >= 3 and rng.random() < 0.02,
        # during a checkpoint write again, later in the run
        lambda: steps_done() >= 5 and writing_checkpoint(),
        lambda: steps_done() >= 6 and rng.random() < 0.05,
    ]
    kills = 0
    for ready in kill_points:
        proc = subprocess.Popen(args, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        kills += _kill_when(proc, ready)
    assert kills >= 3
    final = subprocess.run(args, env=env(), capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stderr[-3000:]
    assert "resumed from" in (out / "train.log").read_text()

    assert_losses_equal(train_losses(out), train_losses(baseline), rel=1e-6)
    a, b = read_all(out / "hf"), read_all(baseline / "hf")
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k

    # Starting the finished run again resumes at its last step and changes nothing.
    again = subprocess.run(args, env=env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    records = [(m["kind"], m["step"]) for m in read_metrics(out)]
    assert len(records) == len(set(records)) == len(read_metrics(baseline))


def test_two_process_data_parallel_matches_one_process(setup, baseline):
    """torchrun --nproc-per-node 2 (grad_accum 1) == one process (grad_accum 2): same global batch."""
    out = setup["root"] / "dp2"
    cmd = [
        PY,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "longtune",
        *train_args(setup, out, "--grad-accum", "1"),
    ]
    r = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_losses_equal(train_losses(out), train_losses(baseline), rel=1e-5)
    assert "dp 2" in (out / "train.log").read_text()
    # Eval too: every eval sequence scored once however many ranks share the eval set.
    evals = {m["step"]: m for m in read_metrics(out) if m["kind"] == "eval"}
    base = {m["step"]: m for m in read_metrics(baseline) if m["kind"] == "eval"}
    assert sorted(evals) == sorted(base) == [0, 8]
    for step in evals:
        assert evals[step]["eval_tokens"] == base[step]["eval_tokens"]
        assert (
            abs(evals[step]["eval_loss"] - base[step]["eval_loss"]) < 1e-5 * base[step]["eval_loss"]
        )


def test_nan_loss_stops_without_overwriting_checkpoints(setup, tmp_path, monkeypatch):
    from longtune.train.config import load_config

    out = tmp_path / "nan"
    cfg = load_config(None, train_args(setup, out, "--checkpoint.every=1")[1:])

    def fault(step, loss_sum):
        return loss_sum * float("nan") if step == 3 else loss_sum

    with pytest.raises(TrainingDivergedError, match="step 3"):
        R.run_training(cfg, _fault=fault)
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["step-1", "step-2"]
    assert max(train_losses(out)) == 2
    status = read_status(RunDir(out))
    assert status["state"] == "failed" and status["reason"] == "nan" and "step 3" in status["error"]

    # Through the Python API the same stop is a failed run object, not an exception.
    real = R.run_training
    monkeypatch.setattr(R, "run_training", lambda cfg: real(cfg, _fault=fault))
    run = finetune(
        model=str(setup["model"]),
        train_data=str(setup["train"]),
        context_length=96,
        duration="8st",
        output_dir=str(tmp_path / "nan-api"),
        data__cache_dir=str(setup["cache"]),
    )
    assert run.status == "failed" and "step 3" in run.error
    assert [m["step"] for m in run.metrics if m["kind"] == "train"] == [1, 2]


def test_corrupted_newest_checkpoint_falls_back_to_previous(setup, baseline, tmp_path):
    out = tmp_path / "corrupt"
    r = run_cli(
        train_args(
            setup,
            out,
            "--grad-accum",
            "2",
            "--checkpoint.every=1",
            "--duration",
            "8st",
            "--checkpoint.keep_last=3",
        )
    )
    assert r.returncode == 0, r.stderr[-3000:]
    newest = out / "checkpoints" / "step-8"
    victim = max(
        (p for p in newest.iterdir() if p.suffix == ".distcp"), key=lambda p: p.stat().st_size
    )
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    # Resume the same 8-step run: step-8 is corrupted, so step 7 is used and step 8 redone.
    (out / "hf").rename(out / "hf-first")
    r = run_cli(
        train_args(
            setup, out, "--grad-accum", "2", "--checkpoint.every=1", "--checkpoint.keep_last=3"
        )
    )
    assert r.returncode == 0, r.stderr[-3000:]
    log = (out / "train.log").read_text()
    assert "skipping incomplete or corrupted checkpoint" in log and "step-8" in log
    assert "resumed from" in log and "step-7" in log
    assert_losses_equal(train_losses(out), train_losses(baseline), rel=1e-6)

    # Every checkpoint damaged: one line says the run starts over (the same command recovers).
    for step in (out / "checkpoints").iterdir():
        (step / "COMPLETE").unlink()
    r = run_cli(
        train_args(
            setup, out, "--grad-accum", "2", "--checkpoint.every=1", "--checkpoint.keep_last=3"
        )
    )
    assert r.returncode == 0, r.stderr[-3000:]
    said = [line for line in r.stdout.splitlines() if "WARNING" in line]
    assert len(said) == 1, said
    assert f"no usable checkpoint in {out / 'checkpoints'}: every one is incomplete" in said[0]
    assert "starting the run over from step 0" in said[0]
    assert_losses_equal(train_losses(out), train_losses(baseline), rel=1e-6)


def test_bad_config_value_names_key_and_choices(setup, tmp_path):
    out = tmp_path / "bad"
    r = run_cli(train_args(setup, out, "--optim.schedule=cosin"))
    assert r.returncode == 2
    assert "optim.schedule" in r.stderr and "cosine, linear, constant" in r.stderr
    assert not out.exists()  # stopped before anything was created
    r = run_cli(train_args(setup, out, "--task-type", "chats"))
    assert r.returncode == 2 and "chat, instruction, text" in r.stderr


def test_bad_data_line_stops_before_anything_starts(setup, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(setup["train"].read_text().splitlines()[0] + "\n{not json\n")
    out = tmp_path / "run"
    args = train_args(setup, out)
    args[args.index(str(setup["train"]))] = str(bad)
    r = run_cli(args)
    assert r.returncode == 2
    assert f"{bad}:2" in r.stderr
    assert not out.exists()


def test_export_command_from_a_checkpoint(baseline, tmp_path):
    r = run_cli(["export", str(baseline / "checkpoints" / "step-8"), str(tmp_path / "hf")])
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = read_all(tmp_path / "hf"), read_all(baseline / "hf")
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert (tmp_path / "hf" / "tokenizer.json").is_file()
    assert not (tmp_path / "hf" / "hf_source.json").exists()
    check = json.loads((tmp_path / "hf.export_check.json").read_text())
    assert check["passed"] and check["tensors_equal_trained"]


def test_start_that_would_mix_with_older_checkpoints_is_refused(setup, baseline, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(baseline, out)
    r = run_cli(train_args(setup, out, "--resume", "never"))
    assert r.returncode == 2 and "checkpoint.resume=never" in r.stderr and "step-8" in r.stderr
    older = out / "checkpoints" / "step-7"
    r = run_cli(train_args(setup, out, "--resume", str(older)))
    assert r.returncode == 2 and "newer checkpoint (step-8)" in r.stderr
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-7", "step-8"]


def test_epoch_durations_count_micro_batches():
    from longtune.train.config import Duration

    # 5 micro-batches per epoch, 4 per optimizer step: 3 epochs = 15 micro-batches = 4 steps.
    assert T.total_optimizer_steps(Duration.parse("3ep"), 5, 4) == 4
    assert T.total_optimizer_steps(Duration.parse("1ep"), 5, 4) == 2
    assert T.total_optimizer_steps(Duration.parse("2ep"), 6, 1) == 12
    assert T.total_optimizer_steps(Duration.parse("7st"), 5, 4) == 7


def test_metrics_truncation_drops_a_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    recs = [{"kind": "eval", "step": 0}, {"kind": "train", "step": 1}, {"kind": "train", "step": 2}]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"kind": "tra')
    rewrite_metrics(RunDir(tmp_path), lambda rec: T._kept_on_resume(rec, 1, 10))
    assert [json.loads(x) for x in path.read_text().splitlines()] == recs[:2]


def test_a_layout_that_cannot_resume_exactly_is_refused_before_the_model_is_read(
    setup, tmp_path, monkeypatch
):
    """Written at DP=2 on an odd number of sequences, an epoch has one padding slot more than
    at DP=1, so the data position cannot carry over exactly: resuming at DP=1 is refused,
    naming both layouts, before any weight is read."""
    out = tmp_path / "run"
    common = [
        "--model",
        str(setup["model"]),
        "--data",
        str(setup["eval"]),  # packs into an odd number of sequences
        "--context-length",
        "96",
        "--duration",
        "2st",
        "--output-dir",
        str(out),
        f"--data.cache_dir={setup['cache']}",
    ]
    cmd = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    r = subprocess.run(
        [*cmd, "-m", "longtune", "train", *common, "--grad-accum", "1"],
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]

    def read_weights(self):
        raise AssertionError("the model was read before the resume layout was checked")

    monkeypatch.setattr(T.Trainer, "build_model", read_weights)
    with pytest.raises(ValueError, match="cannot resume exactly") as refused:
        finetune(
            model=str(setup["model"]),
            train_data=str(setup["eval"]),
            context_length=96,
            duration="2st",
            output_dir=str(out),
            data__cache_dir=str(setup["cache"]),
            train__grad_accum=2,
        )
    message = str(refused.value)
    assert "data-parallel degree 2" in message and "this run has 1" in message


def test_out_of_memory_in_a_step_is_one_line_and_the_run_resumes(setup, tmp_path):
    """A step that runs out of memory (forced: the allocator's error at step 3) ends the run
    with one line saying where, how much and what to change; status failed / oom; the same
    command then resumes from the newest checkpoint and finishes."""
    from longtune.train.config import load_config
    from longtune.train.result import StepOutOfMemory

    out = tmp_path / "oom"
    cfg = load_config(None, train_args(setup, out, "--checkpoint.every=1")[1:])

    def fault(step, loss_sum):
        if step == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return loss_sum

    with pytest.raises(StepOutOfMemory) as e:
        R.run_training(cfg, _fault=fault)
    message = str(e.value)
    assert "\n" not in message and "in step 3 (96 tokens per sequence" in message
    assert "measured peak" in message and "Tried to allocate 2.00 GiB" in message
    assert "activation_checkpointing=full" in message
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1", "step-2"]
    status = read_status(RunDir(out))
    assert status["state"] == "failed" and status["reason"] == "oom", status
    r = run_cli(train_args(setup, out, "--checkpoint.every=1"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in (out / "train.log").read_text()
    assert sorted(train_losses(out)) == list(range(1, 9))
