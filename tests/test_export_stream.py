"""The export streams one tensor at a time and writes what a whole-state export wrote, byte for
byte; from a checkpoint on disk it reads one tensor at a time too."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import make_hf_checkpoint, write_meta_style_checkpoint
from safetensors import safe_open
from safetensors.torch import save_file
from test_model import read_all

import longtune
from longtune.checkpoint import CheckpointTensors, save_checkpoint
from longtune.model.hf import (
    hf_state_dict,
    native_tensor_names,
    parse_dtype,
    read_hf_source,
    write_safetensors,
)


def whole_state_export(model, source, out):
    """The export as it was before streaming: every HF tensor made up front, each file written
    whole by ``save_file`` in the source's layout."""
    _, src = read_hf_source(source)
    tensors = hf_state_dict(model.state_dict(), model.args, "lm_head.weight" in src.weight_map)
    out.mkdir()
    by_file: dict[str, dict[str, torch.Tensor]] = {}
    for key, fname in src.weight_map.items():
        t = tensors[key].to(parse_dtype(src.dtypes[key])).clone().contiguous()
        by_file.setdefault(fname, {})[key] = t
    for fname, shard in by_file.items():
        save_file(shard, out / fname, metadata={"format": "pt"})
    return out


def test_write_safetensors_is_save_file_byte_for_byte(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "b.weight": torch.randn(3, 5, generator=g).bfloat16(),
        "a.weight": torch.randn(7, generator=g),
        "model.layers.10.x": torch.randn(2, 2, generator=g).half(),
        "model.layers.2.x": torch.randn(4, 1, generator=g).double(),
        "scalar": torch.tensor(1.5),
        "empty": torch.zeros(0, 3).bfloat16(),
        "Zähler": torch.ones(2),
    }
    save_file(tensors, tmp_path / "ref.safetensors", metadata={"format": "pt"})
    specs = {k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()}
    taken = []

    def take(key):
        taken.append(key)
        return tensors[key].float()  # cast back to its dtype by the writer

    nbytes = write_safetensors(tmp_path / "ours.safetensors", specs, take, tmp_path)
    assert (tmp_path / "ours.safetensors").read_bytes() == (
        tmp_path / "ref.safetensors"
    ).read_bytes()
    assert sorted(taken) == sorted(tensors)  # each made once
    assert nbytes == sum(t.numel() * t.element_size() for t in tensors.values())


@pytest.mark.parametrize("kind", ["meta-bf16-sharded", "tied-fp32"])
def test_streamed_export_is_the_whole_state_export_byte_for_byte(tmp_path, kind):
    if kind == "meta-bf16-sharded":
        source = write_meta_style_checkpoint(tmp_path / "src")
    else:
        source = make_hf_checkpoint(tmp_path / "src", tie_word_embeddings=True)
    model = longtune.load_model(source)
    ours = longtune.save_model(model, tmp_path / "ours")
    ref = whole_state_export(model, source, tmp_path / "ref")
    files = sorted(p.name for p in ref.iterdir())
    assert files == sorted(p.name for p in ours.glob("*.safetensors"))
    for name in files:
        assert (ours / name).read_bytes() == (ref / name).read_bytes(), name


def test_max_shard_bytes_writes_a_fresh_layout_of_small_files(tmp_path):
    source = write_meta_style_checkpoint(tmp_path / "src")
    model = longtune.load_model(source)
    limit = 40_000
    out = longtune.save_model(model, tmp_path / "small", max_shard_bytes=limit)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    for name in files:
        with safe_open(out / name, framework="pt") as f:
            sizes = [f.get_slice(k).get_shape() for k in f.keys()]
        nbytes = sum(torch.Size(s).numel() * 2 for s in sizes)  # bf16
        assert nbytes <= limit or len(sizes) == 1, (name, nbytes)
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in read_all(source).values()
    )
    a, b = read_all(source), read_all(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_an_export_from_a_checkpoint_on_disk_reads_one_tensor_at_a_time(tmp_path, monkeypatch):
    source = make_hf_checkpoint(tmp_path / "src", tie_word_embeddings=True)
    model = longtune.load_model(source)
    ckpt = save_checkpoint(
        tmp_path / "ckpts", 1, model=model, optimizer=None, states={}, keep_last=1
    )
    on_disk = CheckpointTensors(ckpt)
    state = model.state_dict()
    assert set(on_disk) <= set(state)
    for name in on_disk:
        assert torch.equal(on_disk[name], state[name]), name

    held, peak, reads = set(), [0], []
    real = CheckpointTensors.__getitem__

    def counting(self, name):
        reads.append(name)
        held.add(name)
        peak[0] = max(peak[0], len(held))
        return real(self, name)

    monkeypatch.setattr(CheckpointTensors, "__getitem__", counting)
    import longtune.model.hf as hf

    real_take = hf._Pieces.take

    def take(self, key):
        part = real_take(self, key)
        held.intersection_update(self.held)  # what the writer still keeps
        return part

    monkeypatch.setattr(hf._Pieces, "take", take)
    out = longtune.save_model(None, tmp_path / "out", source=source, state_dict=on_disk)
    ref = longtune.save_model(model, tmp_path / "ref")
    assert (out / "model.safetensors").read_bytes() == (ref / "model.safetensors").read_bytes()
    # Each tensor read once; held: at most a fused one (q/k/v or gate/up, whose pieces are
    # not next to each other in the file's name order) and the one being written.
    assert sorted(reads) == sorted(native_tensor_names(model.args)) and peak[0] == 2


def test_the_check_finds_one_changed_value_in_any_piece(tmp_path):
    """The self-check reads back by blocks of rows; a change in one value of one piece of a
    fused tensor (here a row of k inside wqkv, in a block past the first) is found."""
    from longtune.export.check import _mismatched_tensors

    source = write_meta_style_checkpoint(tmp_path / "src")
    model = longtune.load_model(source)
    out = longtune.save_model(model, tmp_path / "out")
    state = dict(model.state_dict())
    assert _mismatched_tensors(state, model.args, out) == []
    name = "layers.1.attention.wqkv.weight"
    changed = state[name].clone()
    row = model.args.q_size + model.args.kv_size - 1  # the last row of k
    changed[row, -1] += 1
    state[name] = changed
    found = _mismatched_tensors(state, model.args, out, block=changed[0].numel() * 2)
    assert found == [name]


def test_longtune_export_max_shard_gb(tmp_path, cli_server):
    from longtune.model.convert import convert_hf_to_native

    source = write_meta_style_checkpoint(tmp_path / "src")
    native = convert_hf_to_native(source, tmp_path / "native")
    ok = cli_server.run(["export", str(native), "small", "--max-shard-gb", "0.00004"], tmp_path)
    assert ok.rc == 0, ok.stderr
    files = json.loads((tmp_path / "small" / "model.safetensors.index.json").read_text())
    assert len(set(files["weight_map"].values())) > 2
    a, b = read_all(source), read_all(tmp_path / "small")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    bad = cli_server.run(["export", str(native), "x", "--max-shard-gb", "0"], tmp_path)
    assert "--max-shard-gb '0' is invalid" in bad.error_line()
    assert not (tmp_path / "x").exists()
