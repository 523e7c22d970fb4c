"""Checkpoints are verified before they are trusted, and loading one never runs code from it.

Corruption (flipped bits, XOR-ed bytes) in any file of the manifest falls back to the previous
complete checkpoint with a warning; a crafted DCP ``.metadata`` or shard value is refused
without being executed.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import random
import struct
import zipfile
import zlib
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from test_train_checkpoint import load, make_run, save_steps, states, train_steps
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from longtune.checkpoint import (
    UnsafeCheckpointError,
    find_latest_checkpoint,
    load_checkpoint,
    manifest,
    read_rank_states,
    save_checkpoint,
)
from longtune.checkpoint.dcp_safe import read_metadata


def tensor_data_ranges(step_dir: Path, shard: Path) -> list[tuple[int, int]]:
    """(offset, length) in ``shard`` of the raw float data of every tensor DCP stored there.

    DCP writes each tensor as a small ``torch.save`` zip (stored, not compressed); the raw data
    is the member under ``data/``.
    """
    md = read_metadata(step_dir)
    blob = shard.read_bytes()
    ranges = []
    for index, info in md.storage_data.items():
        is_tensor = isinstance(md.state_dict_metadata[index.fqn], TensorStorageMetadata)
        if info.relative_path != shard.name or not is_tensor:
            continue
        item = zipfile.ZipFile(io.BytesIO(blob[info.offset : info.offset + info.length]))
        for member in item.infolist():
            if "/data/" in member.filename and member.file_size >= 4:
                header = blob[info.offset + member.header_offset :][:30]
                name_len, extra_len = struct.unpack("<HH", header[26:30])
                start = info.offset + member.header_offset + 30 + name_len + extra_len
                ranges.append((start, member.file_size))
    return ranges


def flip_float_bits(step_dir: Path, n: int, seed: int) -> Path:
    """Flip ``n`` random bits inside the float data of the tensors of the first shard."""
    shard = sorted(step_dir.glob("*.distcp"))[0]
    ranges = tensor_data_ranges(step_dir, shard)
    data = bytearray(shard.read_bytes())
    rng = random.Random(seed)
    for _ in range(n):
        start, length = rng.choice(ranges)
        data[start + rng.randrange(length)] ^= 1 << rng.randrange(8)
    shard.write_bytes(bytes(data))
    return shard


def test_manifest_has_a_crc_for_every_file(tmp_path):
    save_steps(tmp_path, [1])
    step = tmp_path / "checkpoints" / "step-1"
    files = json.loads((step / "COMPLETE").read_text())["files"]
    on_disk = sorted(p.name for p in step.iterdir() if p.name != "COMPLETE")
    assert sorted(files) == on_disk and any(n.endswith(".distcp") for n in on_disk)
    for name, info in files.items():
        assert info["crc32"] == zlib.crc32((step / name).read_bytes()), name


def test_flipped_float_bits_in_a_shard_fall_back_to_the_previous_checkpoint(tmp_path, caplog):
    trained, _, _ = save_steps(tmp_path, [1, 2])
    newest = tmp_path / "checkpoints" / "step-2"
    flip_float_bits(newest, 100, seed=0)
    # The damage is the silent kind: plain DCP loads it without complaint, with other weights.
    state = {"model": make_run(5)[0].state_dict()}
    dcp.load(state, storage_reader=dcp.FileSystemReader(newest), no_dist=True)
    differ = [k for k, v in trained.state_dict().items() if not torch.equal(v, state["model"][k])]
    assert differ
    assert find_latest_checkpoint(tmp_path / "checkpoints") == tmp_path / "checkpoints" / "step-1"
    assert "step-2" in caplog.text and "CRC32 mismatch" in caplog.text
    with pytest.raises(ValueError, match="step-2 is not a usable checkpoint.*CRC32"):
        load_checkpoint(newest, model=make_run(5)[0], optimizer=None)


def test_xored_bytes_fall_back_without_a_crash(tmp_path, caplog):
    model, opt, sched = save_steps(tmp_path, [1, 2])
    newest = tmp_path / "checkpoints" / "step-2"
    rng = random.Random(1)
    for name in (".metadata", sorted(p.name for p in newest.glob("*.distcp"))[0], "rank-0.pt"):
        file = newest / name
        data = bytearray(file.read_bytes())
        for _ in range(400 if name.endswith(".distcp") else 40):
            data[rng.randrange(len(data))] ^= rng.randrange(1, 256)
        file.write_bytes(bytes(data))
    latest = find_latest_checkpoint(tmp_path / "checkpoints")
    assert latest == tmp_path / "checkpoints" / "step-1"
    extra = load(latest, model, opt, sched)
    assert extra["step"] == 1


def test_a_verified_checkpoint_is_read_again_once_a_file_changes(tmp_path):
    save_steps(tmp_path, [1])
    step = tmp_path / "checkpoints" / "step-1"
    assert find_latest_checkpoint(tmp_path / "checkpoints") == step  # verified (and remembered)
    flip_float_bits(step, 1, seed=3)
    assert find_latest_checkpoint(tmp_path / "checkpoints") is None


# ------------------------------------------------------------------------------ crafted files


class CreatesAFile:
    """What an attacker pickles: unpickling it calls ``open(path, "w")``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def rewrite_manifest(step: Path) -> None:
    """Make the manifest match the files again, as an attacker who crafts one would."""
    marker = step / "COMPLETE"
    record = json.loads(marker.read_text())
    for name in record["files"]:
        data = (step / name).read_bytes()
        record["files"][name] = {"size": len(data), "crc32": zlib.crc32(data)}
    marker.write_text(json.dumps(record))


def plant_malicious_metadata(step: Path, victim: Path) -> None:
    (step / ".metadata").write_bytes(pickle.dumps(CreatesAFile(str(victim))))
    rewrite_manifest(step)


def test_malicious_metadata_is_refused_without_running(tmp_path):
    save_steps(tmp_path, [1, 2])
    victim = tmp_path / "pwned"
    plant_malicious_metadata(tmp_path / "checkpoints" / "step-2", victim)
    with pytest.raises(
        UnsafeCheckpointError, match=r"step-2/\.metadata refers to io\.open.*crafted"
    ):
        find_latest_checkpoint(tmp_path / "checkpoints")
    model, opt, sched = make_run(0)
    with pytest.raises(UnsafeCheckpointError):
        load(tmp_path / "checkpoints" / "step-2", model, opt, sched)
    assert not victim.exists()
    # The same pickle through plain pickle would have created the file: the test is real.
    pickle.loads((tmp_path / "checkpoints" / "step-2" / ".metadata").read_bytes()).close()
    assert victim.exists()


def test_malicious_value_inside_a_shard_is_refused_without_running(tmp_path):
    """DCP stores non-tensor values (optimizer settings) as pickles in the shards."""
    model, opt, sched = make_run(0)
    train_steps(model, opt, sched, 1)
    victim = tmp_path / "pwned"
    opt.param_groups[0]["differentiable"] = CreatesAFile(str(victim))
    path = save_checkpoint(
        tmp_path / "checkpoints", 1, model=model, optimizer=opt, states=states(sched), keep_last=1
    )
    assert not victim.exists()
    assert find_latest_checkpoint(tmp_path / "checkpoints") == path  # files intact, metadata clean
    model2, opt2, sched2 = make_run(1)
    with pytest.raises(UnsafeCheckpointError, match="differentiable' is not plain data") as e:
        load(path, model2, opt2, sched2)
    assert not victim.exists(), e.value


def test_checkpoint_of_a_different_model_is_refused_by_name(tmp_path):
    save_steps(tmp_path, [1])
    other = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    with pytest.raises(
        ValueError, match=r"is for a different model \(0\.bias has shape \[16\] there, \[32\] here"
    ):
        load_checkpoint(tmp_path / "checkpoints" / "step-1", model=other, optimizer=None)


def test_a_manifest_without_checksums_is_not_trusted(tmp_path, caplog):
    save_steps(tmp_path, [1, 2])
    newest = tmp_path / "checkpoints" / "step-2"
    marker = json.loads((newest / "COMPLETE").read_text())
    for info in marker["files"].values():
        info.pop("crc32")
    (newest / "COMPLETE").write_text(json.dumps(marker))
    manifest._VERIFIED.clear()
    assert find_latest_checkpoint(tmp_path / "checkpoints") == tmp_path / "checkpoints" / "step-1"
    assert "malformed COMPLETE marker" in caplog.text


def test_crc_cost_is_one_read(tmp_path, monkeypatch):
    """The verification reads each file once: record the bytes read."""
    save_steps(tmp_path, [1])
    step = tmp_path / "checkpoints" / "step-1"
    manifest._VERIFIED.clear()
    read = []
    real = manifest.crc32
    monkeypatch.setattr(manifest, "crc32", lambda p: read.append(os.path.getsize(p)) or real(p))
    find_latest_checkpoint(tmp_path / "checkpoints")
    find_latest_checkpoint(tmp_path / "checkpoints")  # remembered: not read again
    total = sum(p.stat().st_size for p in step.iterdir() if p.name != "COMPLETE")
    assert sum(read) == total


def test_only_rank_0_reads_the_shards(tmp_path, monkeypatch):
    """Rank 0 picks the checkpoint (the others follow it): N ranks do not read it N times."""
    save_steps(tmp_path, [1])
    step = tmp_path / "checkpoints" / "step-1"
    read = []
    real = manifest.crc32
    monkeypatch.setattr(manifest, "crc32", lambda p: read.append(p.name) or real(p))
    for rank in ("1", "0"):
        manifest._VERIFIED.clear()
        read.clear()
        monkeypatch.setenv("RANK", rank)
        assert find_latest_checkpoint(tmp_path / "checkpoints") == step
        shards = [n for n in read if n.endswith(".distcp")]
        assert (shards == []) if rank == "1" else (len(shards) == 1), (rank, read)
        assert ".metadata" in read and "rank-0.pt" in read


def test_a_crafted_rank_file_is_refused_in_one_line_without_running(tmp_path):
    save_steps(tmp_path, [1])
    step = tmp_path / "checkpoints" / "step-1"
    victim = tmp_path / "pwned"
    torch.save({"states": {"train": CreatesAFile(str(victim))}}, step / "rank-0.pt")
    rewrite_manifest(step)
    with pytest.raises(UnsafeCheckpointError, match=r"rank-0\.pt is not plain data") as e:
        read_rank_states(step)
    assert "\n" not in str(e.value) and not victim.exists()
