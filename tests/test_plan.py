"""The planner: the traced step on fake tensors against the same step on real tensors, the
extrapolation from 3 and 4 blocks against a whole-model trace, and ``longtune plan``."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from longtune.model.args import ModelArgs
from longtune.model.llama import Transformer
from longtune.parallel.parallelize import apply_activation_checkpointing
from longtune.plan.hardware import MODEL_PRESETS
from longtune.plan.trace import (
    Layout,
    _first_rows_supervised,
    extrapolate,
    make_optimizer_state,
    trace_step,
    tracked_step,
)

SMOL = ModelArgs.from_hf_config(MODEL_PRESETS["smollm2-135m"])


def _real_step(args: ModelArgs, ac: str, context: int):  # noqa: ANN202
    """The same step on real tensors (one process, float32, no FSDP: as the trainer on CPU),
    counted the same way (every chunk of the loss run)."""
    torch.manual_seed(0)
    model = Transformer(args)
    apply_activation_checkpointing(model, ac)
    opt = torch.optim.AdamW(model.parameters(), fused=True)
    make_optimizer_state(opt, list(model.parameters()))
    ids = torch.zeros(1, context, dtype=torch.long)
    pos, labels = torch.arange(context)[None], torch.zeros(1, context, dtype=torch.long)
    with _first_rows_supervised(None):
        return tracked_step(model, opt, ids, pos, labels)


@pytest.mark.parametrize("ac", ["none", "selective", "full"])
def test_the_fake_trace_counts_what_the_real_step_holds(ac):
    """Fake tensors, the same code: the peak and the FLOPs are the real step's, counted the
    same way (the trace runs 3 of the loss's 16 chunks and counts the rest's FLOPs)."""
    from longtune.model.loss import chunk_rows

    args = dataclasses.replace(SMOL, n_layers=2, vocab_size=16384)
    assert 1024 // chunk_rows(1024, args.dim, args.vocab_size) == 16
    traced = trace_step(args, Layout(ac=ac), world=1, context=1024, n_layers=2, param_dtype=None)
    real = _real_step(args, ac, 1024)
    assert (traced.peak, traced.flops) == (real.peak, real.flops)


@pytest.mark.parametrize(
    "world, layout",
    [(1, Layout(ac="selective")), (4, Layout(sp=1, ac="full")), (3, Layout(sp=3, ac="none"))],
)
def test_two_and_three_blocks_extrapolate_to_the_whole_model(world, layout):
    """Traces of 3 and 4 blocks, extrapolated, give the whole model's traced peak (within 2%)."""
    args = dataclasses.replace(SMOL, n_layers=8, vocab_size=4096)
    dtype = None if world == 1 else torch.bfloat16
    kw = dict(world=world, context=1536, param_dtype=dtype)
    three = trace_step(args, layout, n_layers=3, **kw)
    four = trace_step(args, layout, n_layers=4, **kw)
    whole = trace_step(args, layout, n_layers=8, **kw)
    predicted, _, _ = extrapolate(three, four, 8)
    assert abs(predicted - whole.peak) <= 0.02 * whole.peak, (predicted, whole.peak)


def test_plan_command_lists_layouts_and_a_bad_model_is_one_line(tmp_path):
    run = [sys.executable, "-m", "longtune", "plan"]
    r = subprocess.run(
        [*run, "smollm2-135m", "--context", "4096", "--gpus-per-node", "3", "--ac", "selective",
         "--tiled-mlp", "false", "--micro-batch", "1", "--json"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(r.stdout)
    assert {row["layout"]["sp"] for row in rows} <= {1, 3} and rows[0]["fits"]
    assert all(row["device_bytes"] > row["tensor_peak"] > 0 for row in rows)
    r = subprocess.run([*run, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "neither a model folder" in lines[0], r.stderr


def test_a_run_that_cannot_fit_is_refused_before_any_weight_is_read(tmp_path):
    """An absurd context length: one line with the planner's figures, before the run folder or
    the data is touched (and well under a minute)."""
    import time

    from helpers import make_hf_checkpoint

    model = make_hf_checkpoint(tmp_path / "model")
    data = tmp_path / "train.jsonl"
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    data.write_text(json.dumps({"messages": turns}) + "\n")
    out = tmp_path / "run"
    t0 = time.monotonic()
    r = subprocess.run(
        [sys.executable, "-m", "longtune", "train", "--model", str(model), "--data", str(data),
         "--context-length", "1000000000", "--output-dir", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 2 and time.monotonic() - t0 < 60
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "every layout keeps at least" in lines[0], r.stderr
    assert "this device has" in lines[0] and not out.exists()


def test_ctrl_c_during_a_command_is_one_line_and_code_130(monkeypatch, capsys):
    """Ctrl-C while `longtune plan` traces (seconds to minutes): one line, exit code 130, no
    traceback (the same for every command but train, which checkpoints first)."""
    import longtune.plan.command as command
    from longtune.cli import main

    def interrupted(**_):  # noqa: ANN003, ANN202
        raise KeyboardInterrupt

    monkeypatch.setattr(command, "run", interrupted)
    with pytest.raises(SystemExit) as done:
        main(["plan", "llama-3.1-8b"])
    assert done.value.code == 130
    assert capsys.readouterr().err.strip().splitlines() == ["longtune plan: interrupted"]


def _stat(pid: int) -> tuple[str, int] | None:
    """A process's state letter and parent pid, from ``/proc`` (None: it is gone)."""
    try:
        state, ppid = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[:2]
    except (OSError, ValueError):
        return None
    return state, int(ppid)


def _trace_workers(parent: int) -> list[int]:
    """The live (not zombie) trace workers a process spawned (``spawn_main`` in their command
    line; multiprocessing's resource tracker is left out)."""
    found = []
    for proc in Path("/proc").iterdir():
        st = _stat(int(proc.name)) if proc.name.isdigit() else None
        if st is None or st[1] != parent or st[0] == "Z":
            continue
        try:
            if b"spawn_main" in (proc / "cmdline").read_bytes():
                found.append(int(proc.name))
        except OSError:
            continue
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and PR_SET_PDEATHSIG")
def test_a_killed_plan_takes_its_trace_workers_with_it():
    """``longtune plan`` killed outright (SIGKILL: no handler of its runs) leaves no trace
    worker tracing on as an orphan (two did, for 30 minutes, before the workers asked the
    kernel for a signal at their parent's death)."""
    import time

    from longtune.plan import planner

    if planner.TRACE_WORKERS < 2:
        pytest.skip("one CPU: traces run in the planning process")
    cmd = [sys.executable, "-m", "longtune", "plan", "llama-3.1-8b", "--context", "65536"]
    proc = subprocess.Popen(
        [*cmd, "--sp", "1", "--ac", "full", "--micro-batch", "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while len(workers := _trace_workers(proc.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(workers) == 2, "the plan started no trace workers"
        time.sleep(1.0)  # past their initializer
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 10
    while (left := [w for w in workers if _alive(w)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in left:  # not left running by this test either
        os.kill(pid, signal.SIGKILL)
    assert not left, f"trace workers {left} outlived the plan"


def test_trace_workers_started_in_a_thread_outlive_it():
    """The death signal the workers ask for is their starting thread's: a pool started by a
    thread that then ends (``longtune.plan`` called from a worker thread) must stay usable, so
    workers started outside the main thread do not ask for it."""
    import threading

    from longtune.plan import planner

    planner.stop_workers()
    pids = []
    thread = threading.Thread(
        target=lambda: pids.append(planner._pool().submit(os.getpid).result())
    )
    thread.start()
    thread.join()
    try:
        assert pids and planner._pool().submit(os.getpid).result(timeout=60) > 0
    finally:
        planner.stop_workers()


def _alive(pid: int) -> bool:
    """A process exists and is not a zombie (an orphan is re-parented, so not by its parent)."""
    st = _stat(pid)
    return st is not None and st[0] != "Z"


def test_fsdp_cpu_offload_moves_shards_gradients_and_optimizer_state_to_the_host():
    """With parallel.cpu_offload the host holds every parameter shard, its gradient and its two
    AdamW moments (16 bytes per float32 parameter of this rank's shard); the device keeps the
    rest, so its peak falls by at least the shards' and moments' bytes. The gradient shards the
    trace tells apart from the backward's other tensors are this rank's gradients."""
    from longtune.plan.hardware import DEVICES
    from longtune.plan.planner import predict

    args = dataclasses.replace(SMOL, n_layers=3, vocab_size=4096)
    world = 4
    kw = dict(world=world, context=1024, param_dtype=torch.bfloat16)
    trace = trace_step(args, Layout(ac="full"), n_layers=3, **kw)
    grads = trace.segments["optimizer"][1].get("gradients", 0)
    shard_bytes = args.num_params() * 4 / world
    assert abs(grads - shard_bytes) <= 0.01 * shard_bytes, (grads, shard_bytes)

    plan_kw = dict(context=1024, device=DEVICES["h100-80"], nodes=1, gpus_per_node=world)
    plain = predict(args, Layout(ac="full"), param_dtype=torch.bfloat16, **plan_kw)
    offloaded = predict(
        args, Layout(ac="full", cpu_offload=True), param_dtype=torch.bfloat16, **plan_kw
    )
    assert abs(offloaded.host_bytes - 4 * shard_bytes) <= 0.01 * shard_bytes
    assert plain.tensor_peak - offloaded.tensor_peak >= 3 * shard_bytes * 0.99
    assert offloaded.host_bytes and "cpu_offload_staging" in offloaded.terms
    assert offloaded.step_s > plain.step_s  # the AdamW step runs on the host


def test_activation_offload_is_chosen_on_cuda_only_when_nothing_else_fits():
    """model.offload_activations=auto: the planner takes offload (on CUDA, with checkpointing)
    once no layout without it fits, and never on CPU; the chosen layout says so."""
    from longtune.plan import check
    from longtune.plan.hardware import DEVICES

    args = dataclasses.replace(SMOL, n_layers=5, vocab_size=4096)
    kw = dict(world=1, sp=1, micro_batch=1, context=4096, ac="full", tiled_mlp="true",
              compute_dtype=torch.bfloat16, lora=None, enforce=True, offload="auto")  # fmt: skip
    original = check.this_device
    try:
        for device_type in ("cuda", "cpu"):
            card = dataclasses.replace(DEVICES["h100-80"], cuda=device_type == "cuda")
            plain = check.predict(
                args, Layout(ac="full", tiled_mlp=True), context=4096, device=card, nodes=1,
                gpus_per_node=1, param_dtype=torch.bfloat16,
            )  # fmt: skip
            budget = plain.device_bytes - 2**20  # just too small without offload
            check.this_device = lambda *_, c=card, b=budget: dataclasses.replace(c, memory=b)
            if device_type == "cuda":
                planned = check.check_run(args, device_type=device_type, **kw)
                assert planned.offload and planned.summary["predicted_host_gb"] > 0
                assert "offload" in planned.summary["layout"]
            else:
                with pytest.raises(check.PlanRefusal, match="memory planner predicts"):
                    check.check_run(args, device_type=device_type, **kw)
    finally:
        check.this_device = original


def test_longest_fits_and_the_next_length_does_not():
    """`longest`'s answer fits the device and one tolerance step longer does not (a device
    sized so that the answer is a few hundred units)."""
    from longtune.plan.hardware import DEVICES
    from longtune.plan.planner import longest, predict

    args = dataclasses.replace(SMOL, n_layers=2, vocab_size=4096)
    layout = Layout(ac="full")
    kw = dict(nodes=1, gpus_per_node=1, param_dtype=torch.bfloat16)
    card = dataclasses.replace(DEVICES["h100-80"], memory=3 * 2**30)
    n, p = longest(args, layout, device=card, granularity=256, tolerance=1 / 64, **kw)
    assert p is not None and p.fits and p.layout == layout and n > 50 * 256
    step = max(256, int(n / 64) // 256 * 256 + 256)
    beyond = predict(args, layout, context=n + step, device=card, **kw)
    assert not beyond.fits
    small = dataclasses.replace(card, memory=2**20)
    assert longest(args, layout, device=small, **kw) == (0, None)


def test_sp_auto_takes_the_fastest_degree_that_fits_and_refuses_when_none_does():
    """parallel.sp=auto on 3 ranks: with room to spare the fastest layout (SP 1: three
    sequences at once, no exchanges); with memory for nothing at SP 1 (every lever on), SP 3;
    with memory for nothing at all, one line naming the closest layout."""
    from longtune.plan import check
    from longtune.plan.hardware import DEVICES
    from longtune.plan.planner import predict

    args = dataclasses.replace(SMOL, n_layers=2, vocab_size=4096)
    card = dataclasses.replace(DEVICES["h100-80"], cuda=False)
    context, world = 3072, 3
    kw = dict(world=world, sp="auto", micro_batch=1, context=context, ac="auto",
              tiled_mlp="auto", compute_dtype=torch.bfloat16, lora=None, enforce=True)  # fmt: skip

    def peak(sp: int, ac: str, tiled: bool) -> int:
        return predict(
            args, Layout(sp, ac, tiled), context=context, device=card, nodes=1,
            gpus_per_node=world, param_dtype=torch.bfloat16,
        ).device_bytes  # fmt: skip

    least_sp1, least_sp3 = peak(1, "full", True), peak(3, "full", True)
    assert least_sp3 < least_sp1 - 2**20
    original = check.this_device
    try:
        answers = {}
        for name, memory in (("roomy", 64 * 2**30), ("tight", least_sp1 - 2**19)):
            check.this_device = lambda *_, m=memory: dataclasses.replace(card, memory=m)
            answers[name] = check.check_run(args, device_type="cpu", **kw)
        assert (answers["roomy"].sp, answers["roomy"].ac) == (1, "none")
        assert answers["tight"].sp == 3 and answers["tight"].summary["layout"].startswith("sp=3")
        assert answers["tight"].summary["predicted_peak_gb"] * 2**30 <= least_sp1
        check.this_device = lambda *_: dataclasses.replace(card, memory=least_sp3 - 2**19)
        with pytest.raises(check.PlanRefusal) as refused:
            check.check_run(args, device_type="cpu", **kw)
        line = str(refused.value)
        assert "\n" not in line and line.startswith("parallel.sp=auto: no layout on 3 rank(s)")
        assert "sp=3 ac=full mbs=1 tiled_mlp" in line
    finally:
        check.this_device = original


def test_sp_auto_in_the_preflight_sets_the_runs_layout(tmp_path):
    """`train --parallel.sp=auto`: the preflight's layout (what the trainer builds its mesh from)
    takes the planner's degree (SP 1 on a roomy CPU: fastest), world / dp when parallel.dp is
    set, and a dp that does not divide the world is one line."""
    from helpers import make_hf_checkpoint

    from longtune.train.config import ConfigError, load_config
    from longtune.train.preflight import preflight

    model = make_hf_checkpoint(tmp_path / "model")  # 4 query heads, 2 KV heads
    data = tmp_path / "train.jsonl"
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    data.write_text(json.dumps({"messages": turns}) + "\n")

    def checked(*flags: str):  # noqa: ANN202
        cfg = load_config(None, [f"--model.path={model}", f"--data.train={data}",
                                 "--data.context_length=256", f"--output.dir={tmp_path / 'run'}",
                                 "--parallel.sp=auto", *flags])  # fmt: skip
        return preflight(cfg, world_size=4)

    auto = checked()
    assert (auto.dims.sp, auto.dims.dp) == (1, 4)
    assert auto.plan.sp == 1 and auto.plan.record()["layout"].startswith("sp=1 ")
    held = checked("--parallel.dp=1")
    assert (held.dims.sp, held.dims.dp) == (4, 1) and held.plan.record()["sp"] == 4
    with pytest.raises(ConfigError) as e:
        checked("--parallel.dp=3")
    assert "parallel.dp=3 does not divide the world size 4" in str(e.value)
    assert "\n" not in str(e.value) and not (tmp_path / "run").exists()


def test_the_offloads_must_fit_the_hosts_memory_too():
    """A layout whose offloads need more than the GPU's share of its node's host memory (less
    the headroom) does not fit, and says so; without a host size it is not checked; `longest`
    stops where the host runs out."""
    from longtune.plan import check
    from longtune.plan.hardware import DEVICES, HOST_HEADROOM
    from longtune.plan.planner import longest, plan, predict

    args = dataclasses.replace(SMOL, n_layers=3, vocab_size=4096)
    layout = Layout(ac="full", offload=True, cpu_offload=True)
    kw = dict(nodes=1, gpus_per_node=4, param_dtype=torch.bfloat16)
    unchecked = dataclasses.replace(DEVICES["h100-80"], host_memory=0)
    free = predict(args, layout, context=2048, device=unchecked, **kw)
    assert free.fits and free.host_limit == 0 and free.host_bytes > 0
    node = int(free.host_bytes * 4 / (1 - HOST_HEADROOM)) - 4 * 2**20  # just too small
    small = dataclasses.replace(unchecked, host_memory=node)
    short = predict(args, layout, context=2048, device=small, **kw)
    assert not short.fits and short.margin_bytes > 0 and short.host_bytes > short.host_limit
    assert check._shortfall(short).endswith(f"leaves {short.host_limit / 2**30:.1f} GiB per rank")
    n, p = longest(args, layout, device=small, granularity=256, **kw)
    assert p is not None and p.fits and p.host_bytes <= p.host_limit and 0 < n < 2048
    # Short of host memory only, a layout rules out none that offloads less.
    fixed = {"sp": 1, "ac": "full", "micro_batch": 1, "cpu_offload": True, "tiled_mlp": False}
    found = plan(args, context=2048, device=small, fixed=fixed, **kw)
    assert {x.layout.offload for x in found} == {False, True}
