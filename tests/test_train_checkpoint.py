"""Checkpoints: exact save/load, crash safety (simulated and real SIGKILL), pruning, FSDP2."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException

from longtune.checkpoint import (
    CheckpointTensors,
    checkpoint_info,
    find_latest_checkpoint,
    load_checkpoint,
    manifest,
    save_checkpoint,
    store,
)
from longtune.train.schedule import build_lr_scheduler
from longtune.train.state import TrainState, capture_rng_state, restore_rng_state


class Box:
    """A registered state holding plain values (what the trainer registers, in miniature)."""

    def __init__(self, values=None):
        self.values = dict(values or {})

    def state_dict(self):
        return dict(self.values)

    def load_state_dict(self, state):
        self.values = dict(state)


def states(sched=None, own_rank=0, **extra):
    """Registered states: plain values, the trainer's RNG (a TrainState) and the schedule."""
    out = {"extra": Box(extra), "train": TrainState(rank=own_rank)}
    if sched is not None:
        out["schedule"] = sched
    return out


def load(path, model, opt=None, sched=None, rank=0):
    """Load a checkpoint with the test's registered states; returns its plain values."""
    registered = states(sched, rank)
    load_checkpoint(path, model=model, optimizer=opt, states=registered)
    return registered["extra"].values


def make_run(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    sched = build_lr_scheduler(opt, "cosine", 2, 20, 0.1)
    return model, opt, sched


def train_steps(model, opt, sched, n: int) -> None:
    for _ in range(n):
        loss = model(torch.randn(5, 8)).pow(2).mean()
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()


def assert_same_state(a_model, a_opt, b_model, b_opt) -> None:
    for (name, pa), pb in zip(
        a_model.state_dict().items(), b_model.state_dict().values(), strict=True
    ):
        assert torch.equal(pa, pb), name
    sa, sb = a_opt.state_dict(), b_opt.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for key, state in sa["state"].items():
        for name, value in state.items():
            assert torch.equal(value, sb["state"][key][name]), (key, name)


def test_save_load_restores_everything_exactly(tmp_path):
    model, opt, sched = make_run(0)
    train_steps(model, opt, sched, 3)
    random.seed(1)
    np.random.seed(2)
    path = save_checkpoint(
        tmp_path / "checkpoints",
        3,
        model=model,
        optimizer=opt,
        states=states(
            sched,
            step=3,
            tokens_seen=1234,
            loader={"epoch": 0, "index": torch.tensor([5, 6])},
        ),
        keep_last=2,
    )
    assert path == tmp_path / "checkpoints" / "step-3"
    assert checkpoint_info(path)["step"] == 3
    # What an uninterrupted run draws next.
    expected_draws = (random.random(), np.random.rand(), torch.rand(1))
    train_steps(model, opt, sched, 2)

    model2, opt2, sched2 = make_run(seed=99)  # different init
    random.seed(7)
    extra = load(path, model2, opt2, sched2)
    assert extra["step"] == 3 and extra["tokens_seen"] == 1234
    assert torch.equal(extra["loader"]["index"], torch.tensor([5, 6]))
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected_draws
    assert sched2.last_epoch == 3 and sched2.get_last_lr() == pytest.approx([1e-2 * ckpt_factor(3)])

    # Continuing from the checkpoint reproduces the uninterrupted run bit for bit.
    model3, opt3, sched3 = make_run(seed=5)
    load(path, model3, opt3, sched3)
    model_ref, opt_ref, sched_ref = make_run(0)
    train_steps(model_ref, opt_ref, sched_ref, 3)
    assert_same_state(model_ref, opt_ref, model3, opt3)
    torch.manual_seed(11)
    train_steps(model3, opt3, sched3, 2)
    torch.manual_seed(11)
    train_steps(model_ref, opt_ref, sched_ref, 2)
    assert_same_state(model_ref, opt_ref, model3, opt3)


def ckpt_factor(step: int) -> float:
    from longtune.train.schedule import lr_factor

    return lr_factor(step, schedule="cosine", warmup_steps=2, total_steps=20, min_lr_ratio=0.1)


def test_rng_state_round_trip_through_torch_save(tmp_path):
    state = capture_rng_state()
    torch.save(state, tmp_path / "rng.pt")
    draws = (random.random(), np.random.randn(3).tolist(), torch.randn(3))
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    again = (random.random(), np.random.randn(3).tolist(), torch.randn(3))
    assert draws[0] == again[0] and draws[1] == again[1] and torch.equal(draws[2], again[2])


def test_model_only_checkpoint(tmp_path):
    model, opt, sched = make_run(0)
    train_steps(model, opt, sched, 1)
    path = save_checkpoint(
        tmp_path / "checkpoints", 1, model=model, optimizer=None, states={}, keep_last=1
    )
    model2, _, _ = make_run(3)
    load_checkpoint(path, model=model2, optimizer=None)
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)


def save_steps(run_dir, steps, keep_last=2):
    model, opt, sched = make_run(0)
    for step in steps:
        train_steps(model, opt, sched, 1)
        save_checkpoint(
            run_dir / "checkpoints",
            step,
            model=model,
            optimizer=opt,
            states=states(sched, step=step),
            keep_last=keep_last,
        )
    return model, opt, sched


def test_keep_last_pruning_and_stale_tmp_removal(tmp_path):
    root = tmp_path / "checkpoints"
    root.mkdir()
    (root / "step-9.tmp-12345").mkdir()  # left by a killed run
    (root / "step-9.tmp-12345" / "__0_0.distcp").write_bytes(b"partial")
    (root / "step-2.trash-777").mkdir()
    save_steps(tmp_path, [1, 2, 3, 4, 5], keep_last=3)
    assert sorted(p.name for p in root.iterdir()) == ["step-3", "step-4", "step-5"]
    assert find_latest_checkpoint(root) == root / "step-5"


def test_existing_complete_step_is_not_overwritten(tmp_path, caplog):
    model, opt, sched = save_steps(tmp_path, [1])
    before = (tmp_path / "checkpoints" / "step-1" / "COMPLETE").read_bytes()
    save_checkpoint(
        tmp_path / "checkpoints", 1, model=model, optimizer=opt, states=states(sched), keep_last=2
    )
    assert "already exists and is complete" in caplog.text
    assert (tmp_path / "checkpoints" / "step-1" / "COMPLETE").read_bytes() == before


@pytest.mark.parametrize(
    "damage",
    [
        "no_marker",
        "bad_marker",
        "truncated_shard",
        "corrupt_metadata",
        "missing_rank_file",
        "garbage_rank_file",
    ],
)
def test_find_latest_skips_incomplete_or_corrupted(tmp_path, damage, caplog):
    save_steps(tmp_path, [1, 2])
    newest = tmp_path / "checkpoints" / "step-2"
    if damage == "no_marker":
        (newest / "COMPLETE").unlink()
    elif damage == "bad_marker":
        (newest / "COMPLETE").write_text('{"step": 2, "fil')
    elif damage == "truncated_shard":
        shard = next(newest.glob("*.distcp"))
        shard.write_bytes(shard.read_bytes()[:-10])
    elif damage == "corrupt_metadata":
        meta = newest / ".metadata"
        meta.write_bytes(b"\0" * meta.stat().st_size)
    elif damage == "missing_rank_file":
        (newest / "rank-0.pt").unlink()
    else:
        rank_file = newest / "rank-0.pt"
        rank_file.write_bytes(os.urandom(rank_file.stat().st_size))
    # A tmp dir of a save in progress (or killed) is never a candidate.
    (tmp_path / "checkpoints" / "step-3.tmp-1").mkdir()
    assert find_latest_checkpoint(tmp_path / "checkpoints") == tmp_path / "checkpoints" / "step-1"
    assert "step-2" in caplog.text
    with pytest.raises(ValueError, match="step-2 is not a usable checkpoint"):
        load_checkpoint(newest, model=make_run()[0], optimizer=None)


def test_find_latest_on_empty_run_dir(tmp_path):
    assert find_latest_checkpoint(tmp_path) is None
    assert find_latest_checkpoint(tmp_path / "missing") is None


class SimulatedCrash(BaseException):
    pass


def test_crash_at_every_io_point_keeps_a_loadable_checkpoint(tmp_path, monkeypatch):
    """Abort the save at the n-th I/O operation for every n; the newest complete checkpoint
    must always be the previous one (or the new one, once committed), and must load."""
    model, opt, sched = save_steps(tmp_path, [1])
    expected = {1: [p.detach().clone() for p in model.parameters()]}
    targets = [
        (store, "write_durable"),
        (manifest, "write_durable"),
        (store, "fsync_dir"),
        (manifest, "fsync_dir"),
        (store.os, "rename"),
        (store.shutil, "rmtree"),
        (store.dcp, "save"),
        (store.torch, "save"),
    ]
    originals = {(mod, name): getattr(mod, name) for mod, name in targets}
    step, crash_at, crashed_points, last_good = 2, 1, 0, 1
    while True:
        calls = [0]

        def make(orig, calls=calls, crash_at=crash_at):
            def wrapper(*args, **kwargs):
                calls[0] += 1
                if calls[0] == crash_at:
                    raise SimulatedCrash
                return orig(*args, **kwargs)

            return wrapper

        for (mod, name), orig in originals.items():
            monkeypatch.setattr(mod, name, make(orig))
        train_steps(model, opt, sched, 1)
        expected[step] = [p.detach().clone() for p in model.parameters()]
        finished = True
        try:
            save_checkpoint(
                tmp_path / "checkpoints",
                step,
                model=model,
                optimizer=opt,
                states=states(sched, step=step),
                keep_last=1,
            )
        except (SimulatedCrash, CheckpointException):  # DCP wraps errors raised inside it
            finished = False
        monkeypatch.undo()
        latest = find_latest_checkpoint(tmp_path / "checkpoints")
        assert latest is not None
        got_step = checkpoint_info(latest)["step"]
        # Either the previous checkpoint, or the new one if the crash came after its commit.
        assert got_step in (last_good, step)
        last_good = got_step
        model2, opt2, sched2 = make_run(4)
        extra = load(latest, model2, opt2, sched2)
        assert extra["step"] == got_step
        for a, b in zip(expected[got_step], model2.parameters(), strict=True):
            assert torch.equal(a, b)
        if finished and calls[0] < crash_at:
            break  # the save completed before reaching the crash point: all points covered
        crashed_points += 1
        crash_at += 1
        step += 1
    assert crashed_points >= 8


def _save_forever(run_dir: str, ready) -> None:
    """Child process: resume from the newest checkpoint, then train and save until killed."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 256), nn.Linear(256, 128))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    step = 0
    root = Path(run_dir) / "checkpoints"
    latest = find_latest_checkpoint(root)
    if latest is not None:
        step = load(latest, model, opt)["step"]
    ready.send(step)
    while True:
        step += 1
        model(torch.randn(4, 128)).sum().backward()
        opt.step()
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(float(step))
        save_checkpoint(
            root, step, model=model, optimizer=opt, states=states(step=step), keep_last=2
        )


@pytest.mark.slow
def test_sigkill_while_saving_never_leaves_a_bad_latest(tmp_path):
    """SIGKILL a process that saves in a loop at random moments, restart it, repeat: the newest
    complete checkpoint always loads and holds the state of its step."""
    ctx = multiprocessing.get_context("fork")  # no re-import of torch: each round is cheap
    run_dir = str(tmp_path / "run")
    rng = random.Random(0)
    steps_seen = []
    for _ in range(12):
        receiver, sender = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_save_forever, args=(run_dir, sender), daemon=True)
        proc.start()
        resumed_from = receiver.recv()
        assert resumed_from == (steps_seen[-1] if steps_seen else 0)
        proc.join(timeout=rng.uniform(0.0, 0.25))
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        latest = find_latest_checkpoint(Path(run_dir) / "checkpoints")
        if latest is None:
            continue
        model = nn.Sequential(nn.Linear(128, 256), nn.Linear(256, 128))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        step = load(latest, model, opt)["step"]
        assert latest.name == f"step-{step}"
        assert all(torch.all(p == step) for p in model.parameters())
        assert opt.state_dict()["state"][0]["exp_avg"].abs().sum() > 0
        steps_seen.append(step)
    assert len(steps_seen) >= 6, steps_seen
    assert steps_seen == sorted(steps_seen)  # each restart resumed and went on


def _fsdp_worker(rank: int, world: int, init_file: str, run_dir: str, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 6))
        for layer in (model[0], model[2]):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        sched = build_lr_scheduler(opt, "linear", 1, 10, 0.0)
        torch.manual_seed(100 + rank)  # different data per rank
        train_steps(model, opt, sched, 2)
        before_params = {k: v.to_local().clone() for k, v in model.state_dict().items()}
        before_opt = {
            (k, n): v.to_local().clone() if hasattr(v, "to_local") else v.clone()
            for k, s in opt.state_dict()["state"].items()
            for n, v in s.items()
        }
        full = {k: v.full_tensor() for k, v in model.state_dict().items()}
        path = save_checkpoint(
            Path(run_dir) / "checkpoints",
            2,
            model=model,
            optimizer=opt,
            states=states(sched, rank, step=2, rank=rank),
            keep_last=2,
        )
        expected_draw = torch.rand(3)
        train_steps(model, opt, sched, 3)  # move away from the saved state
        extra = load(path, model, opt, sched, rank)
        assert extra == {"step": 2, "rank": rank}
        assert torch.equal(torch.rand(3), expected_draw)
        assert sched.last_epoch == 2
        for k, v in model.state_dict().items():
            assert torch.equal(v.to_local(), before_params[k]), k
        for k, s in opt.state_dict()["state"].items():
            for n, v in s.items():
                local = v.to_local() if hasattr(v, "to_local") else v
                assert torch.equal(local, before_opt[(k, n)]), (k, n)
        if rank == 0:
            torch.save(full, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp2_two_ranks_save_load_and_reshard_to_one(tmp_path):
    import torch.multiprocessing as mp

    run_dir, out = tmp_path / "run", tmp_path / "full.pt"
    # fork: the workers need not re-import torch (the parent has no process group).
    mp.start_processes(
        _fsdp_worker,
        args=(2, str(tmp_path / "init"), str(run_dir), str(out)),
        nprocs=2,
        join=True,
        start_method="fork",
    )
    latest = find_latest_checkpoint(run_dir / "checkpoints")
    assert latest is not None and checkpoint_info(latest)["world_size"] == 2
    assert {p.name for p in latest.glob("rank-*.pt")} == {"rank-0.pt", "rank-1.pt"}
    # Load the 2-rank sharded checkpoint into one unsharded process (DCP reshards).
    model, opt, sched = make_run(7)
    model[2] = nn.Linear(16, 6)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = build_lr_scheduler(opt, "linear", 1, 10, 0.0)
    extra = load(latest, model, opt, sched)
    assert extra["rank"] == 0
    full = torch.load(out, weights_only=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, full[k]), k
    assert json.loads((latest / "COMPLETE").read_text())["step"] == 2
    # An export reads each tensor whole, assembled from both ranks' shards, as DCP does.
    on_disk = CheckpointTensors(latest)
    assert set(on_disk) == set(full)
    for k in full:
        assert torch.equal(on_disk[k], full[k]), k
        assert torch.equal(on_disk._read_with_dcp(k), full[k]), k


def test_pruning_never_removes_the_checkpoint_just_written(tmp_path):
    # step-8 is left by a run restarted from an earlier step (e.g. step-8 failed its CRC check):
    # saving step-4 with keep_last=1 keeps step-4, and leaves step-8 alone.
    save_steps(tmp_path, [8], keep_last=1)
    save_steps(tmp_path, [4], keep_last=1)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step-4", "step-8"]


def test_a_manifest_that_cannot_be_written_fails_in_one_line_and_leaves_nothing(
    tmp_path, monkeypatch
):
    import errno

    from longtune.fsutil import OutputDirError

    real = manifest.write_durable

    def full(path, data):
        if path.name == manifest.MARKER:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, data)

    save_steps(tmp_path, [1])
    monkeypatch.setattr(manifest, "write_durable", full)
    with pytest.raises(OutputDirError, match="checkpoints: No space left on device; free space"):
        save_steps(tmp_path, [2])
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-1"]


def test_a_checkpoint_of_the_earlier_rank_file_layout_is_refused_in_one_line(tmp_path):
    """Rank files that hold ``extra`` / ``scheduler`` / ``rng`` at the top (the layout before
    the registered states) are refused with what to do, not a KeyError."""
    save_steps(tmp_path, [1])
    path = tmp_path / "checkpoints" / "step-1"
    rank_file = path / "rank-0.pt"
    payload = torch.load(rank_file, weights_only=True)
    old = {k: payload[k] for k in ("step", "rank", "world_size")}
    old |= {"scheduler": None, "rng": capture_rng_state(), "extra": {"step": 1}}
    torch.save(old, rank_file)
    marker = json.loads((path / "COMPLETE").read_text())  # keep the manifest consistent
    marker["files"]["rank-0.pt"] = {
        "size": rank_file.stat().st_size,
        "crc32": manifest.crc32(rank_file),
    }
    (path / "COMPLETE").write_text(json.dumps(marker))
    with pytest.raises(ValueError, match="earlier version of longtune .*`longtune export"):
        load(path, make_run()[0])
    load_checkpoint(path, model=make_run()[0], optimizer=None)  # its weights still export


def test_rng_states_are_restored_only_on_the_rank_that_saved_them(tmp_path):
    saved = TrainState(rank=1)
    values = saved.state_dict()
    draw = torch.rand(1)
    other = TrainState(rank=0)
    other.load_state_dict(values)  # rank 1's RNG is not rank 0's: left alone
    assert not torch.equal(torch.rand(1), draw)
    same = TrainState(rank=1)
    same.load_state_dict(values)
    assert torch.equal(torch.rand(1), draw) and same.step == 0
