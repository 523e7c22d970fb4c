"""Per-rank sharded loading (each rank reads only its own rows) = the broadcast path, bit for bit.

Each case builds the model as the trainer does (meta device, ``parallelize`` over the layout,
``to_empty``) twice on every rank, fills one by :func:`load_parallel_model` and the other by
:func:`load_by_broadcast` (rank 0 reads everything and broadcasts), and compares every
parameter's local shard. Sizes are chosen so that dim 0 is not divisible by the world size and
rank boundaries fall inside fused tensors (between q and k, between gate and up).
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

import pytest
import torch
from dist_utils import run_ranks
from helpers import make_hf_checkpoint
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from longtune.model.checks import ModelFolderError
from longtune.model.convert import (
    convert_hf_to_native,
    is_native_dir,
    load_model,
    read_native_meta,
)
from longtune.model.hf import read_hf_source
from longtune.model.llama import Transformer
from longtune.parallel import load as load_mod
from longtune.parallel.dims import ParallelDims
from longtune.parallel.load import load_by_broadcast, load_parallel_model, piece_rows
from longtune.parallel.parallelize import is_fsdp_sharded, parallelize


def _build(path: Path, world: int, sp: int, ac: str = "none", compile: bool = False):
    args = read_native_meta(path)[0] if is_native_dir(path) else read_hf_source(path)[0]
    dims = ParallelDims.build(world, sp, n_heads=args.n_heads, n_kv_heads=args.n_kv_heads)
    with torch.device("meta"):
        model = Transformer(args)
    parallelize(model, dims.build_mesh("cpu"), ac, param_dtype=None, compile=compile)
    model.to_empty(device="cpu")
    if not is_fsdp_sharded(model):
        model.tie_weights()
    return model


def _locals(model) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        t = p.to_local() if hasattr(p, "to_local") else p
        out[name] = t.detach().clone()
    return out


def _compare(rank, world, path, sp, ac="none", compile=False, unseen_on=None):
    """Load both ways on this rank; returns (how, differing names, local shapes)."""
    if unseen_on == rank:
        real = load_mod.weight_files

        def weight_files(p):
            files = real(p)
            files.pop(sorted(f for f in files if f.endswith(".safetensors"))[-1])
            return files

        load_mod.weight_files = weight_files
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda r: records.append(r.getMessage())
    logging.getLogger("longtune.parallel.load").addHandler(handler)
    sharded = _build(path, world, sp, ac, compile)
    how = load_parallel_model(sharded, path)
    reference = _build(path, world, sp, ac, compile)
    load_by_broadcast(reference, path)
    a, b = _locals(sharded), _locals(reference)
    assert a.keys() == b.keys()
    assert all(t.dtype == torch.float32 for t in a.values())  # fp32 master weights
    differ = [n for n in a if not torch.equal(a[n], b[n])]
    tied = sharded.output.weight is sharded.tok_embeddings.weight
    # and what FSDP gathers from the shards is the model load_model reads in one process
    full = get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True))
    want = load_model(path, dtype=torch.float32).state_dict()
    assert full.keys() == want.keys()
    differ += [f"gathered {k}" for k in want if not torch.equal(full[k], want[k])]
    shapes = {n: tuple(t.shape) for n, t in a.items()}
    return how, differ, shapes, tied, records


def _check(results, how="sharded", tied=False):
    for rank, (got_how, differ, _, got_tied, _) in enumerate(results):
        assert got_how == how, rank
        assert not differ, f"rank {rank}: {differ}"
        assert got_tied == tied


def _uneven(shapes_by_rank: list[dict], name: str) -> bool:
    rows = [s[name][0] for s in shapes_by_rank]
    return len(set(rows)) > 1


def test_piece_rows_cuts_at_piece_boundaries():
    # q 8, k 4, v 4 rows; rows 6..13 = q[6:8] + k[0:4] + v[0:2]
    assert list(piece_rows(6, 14, [8, 4, 4])) == [(0, 6, 8), (1, 0, 4), (2, 0, 2)]
    assert list(piece_rows(8, 12, [8, 4, 4])) == [(1, 0, 4)]
    assert list(piece_rows(3, 3, [8, 4, 4])) == []
    assert list(piece_rows(0, 16, [16])) == [(0, 0, 16)]


def test_one_process_reads_whole_tensors(tmp_path):
    """No process group, no FSDP: every tensor read whole; equal to load_model's."""
    ckpt = make_hf_checkpoint(tmp_path / "m", vocab_size=130, tie_word_embeddings=True)
    with torch.device("meta"):
        model = Transformer(read_hf_source(ckpt)[0])
    model.to_empty(device="cpu")
    model.tie_weights()
    assert load_parallel_model(model, ckpt) == "sharded"
    want = load_model(ckpt, dtype=torch.float32).state_dict()
    got = model.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert model.output.weight is model.tok_embeddings.weight


# name -> (world, sp, checkpoint overrides, extra options)
CASES = {
    # 4 heads / 1 KV head: wqkv is 6 head-rows of 8, so ranks cut inside q and between q and k;
    # vocab 130 and w13's 198 rows are not divisible by 4.
    "dp4": (4, 1, dict(vocab_size=130, intermediate_size=99, num_key_value_heads=1), {}),
    # selective checkpointing and compile wrappers change parameter names
    "dp2_sp2": (
        4,
        2,
        dict(vocab_size=130, intermediate_size=99),
        dict(ac="selective", compile=True),
    ),
    # SmolLM2's head shape: wqkv 120 rows over 3 ranks cut q|k inside rank 1; w13 200 and
    # vocab 131 are not divisible by 3.
    "sp3_9_3": (
        3,
        3,
        dict(
            vocab_size=131,
            hidden_size=72,
            intermediate_size=100,
            num_attention_heads=9,
            num_key_value_heads=3,
        ),
        {},
    ),
    "tied": (2, 1, dict(vocab_size=131, tie_word_embeddings=True), {}),
    "bf16_source": (2, 1, dict(vocab_size=131), dict(dtype=torch.bfloat16)),
    "sharded_source": (3, 1, dict(vocab_size=131), dict(max_shard_size="20KB")),
}


@pytest.mark.parametrize("case", list(CASES))
def test_sharded_load_equals_broadcast(tmp_path, case):
    world, sp, overrides, options = CASES[case]
    ckpt_opts = {k: v for k, v in options.items() if k in ("dtype", "max_shard_size")}
    run_opts = {k: v for k, v in options.items() if k in ("ac", "compile")}
    ckpt = make_hf_checkpoint(tmp_path / "m", **ckpt_opts, **overrides)
    if case == "sharded_source":
        assert (
            len(list(ckpt.glob("*.safetensors"))) > 2
            and (ckpt / "model.safetensors.index.json").is_file()
        )
    if case == "bf16_source":
        assert next(iter(load_file(ckpt / "model.safetensors").values())).dtype == torch.bfloat16
    if run_opts.get("compile"):
        importlib.import_module("torch._dynamo")  # once here, not in every forked rank: seconds

    results = run_ranks(
        world, _compare, ckpt, sp, run_opts.get("ac", "none"), run_opts.get("compile", False)
    )
    _check(results, tied=overrides.get("tie_word_embeddings", False))
    shapes = [r[2] for r in results]
    assert _uneven(shapes, "tok_embeddings.weight")
    if case == "sp3_9_3":
        wqkv = next(n for n in shapes[0] if n.endswith("layers.0.attention.wqkv.weight"))
        assert [s[wqkv][0] for s in shapes] == [40, 40, 40]  # rank 1 holds q[40:72] + k[0:8]


def test_native_folder(tmp_path):
    ckpt = make_hf_checkpoint(tmp_path / "m", vocab_size=131, intermediate_size=99)
    native = convert_hf_to_native(ckpt, tmp_path / "native", max_shard_bytes=60_000)
    assert len(list(native.glob("*.safetensors"))) > 1
    _check(run_ranks(3, _compare, native, 1))


def test_a_rank_that_does_not_see_a_file_falls_back_to_broadcast(tmp_path):
    ckpt = make_hf_checkpoint(tmp_path / "m", vocab_size=131, max_shard_size="40KB")
    results = run_ranks(2, _compare, ckpt, 1, "none", False, 1)
    _check(results, how="broadcast")
    lines = results[0][4]
    assert len(lines) == 1, lines
    assert lines[0].startswith("rank 1 does not see ") and ".safetensors" in lines[0]
    assert results[1][4] == []


def _load_expecting_error(rank, world, path):
    model = _build(path, world, 1)
    try:
        load_parallel_model(model, path)
    except ModelFolderError as e:
        return str(e)
    return None


def test_a_nan_in_one_ranks_rows_stops_every_rank(tmp_path):
    ckpt = make_hf_checkpoint(tmp_path / "m", vocab_size=130)
    file = ckpt / "model.safetensors"
    tensors = load_file(file)
    tensors["model.embed_tokens.weight"][-1, 0] = float("nan")  # rows of rank 1 only
    save_file(tensors, file, metadata={"format": "pt"})
    errors = run_ranks(2, _load_expecting_error, ckpt)
    assert all(e is not None and "model.embed_tokens.weight holds 1 NaN/Inf" in e for e in errors)
    assert errors[0].startswith("rank 1: ")


def test_every_rank_seeing_the_files_is_no_gap(tmp_path):
    ckpt = make_hf_checkpoint(tmp_path / "m")
    assert run_ranks(2, lambda r, w, p: load_mod.files_unseen_by_a_rank(p), ckpt) == [None, None]
