"""The loader: determinism, DP coverage, SP replication and slicing, exact resume; in one
process and across gloo process groups (dp x sp layouts)."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch
from data_fixtures import chat_rows, tiny_tokenizer_dir, write_jsonl

from longtune.data import IGNORE_INDEX, PackedLoader, build_packed_dataset, pad_to_multiple

CONTEXT = 64


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    model = tiny_tokenizer_dir(root / "tok")
    path = write_jsonl(root / "c.jsonl", chat_rows(60, seed=3, max_words=4))
    cache = root / "cache"
    ds = build_packed_dataset([str(path)], model, "chat", CONTEXT, cache_dir=cache)
    return {"paths": [str(path)], "model": str(model), "cache": str(cache), "ds": ds}


def make_loader(ds, **kw) -> PackedLoader:
    args = dict(micro_batch_size=2, dp_rank=0, dp_size=1, sp_rank=0, sp_size=1, seed=0)
    args.update(kw)
    return PackedLoader(ds, **args)


def take(loader: PackedLoader, n: int) -> list[dict]:
    return [next(loader) for _ in range(n)]


def same_batches(a: list[dict], b: list[dict]) -> bool:
    for x, y in zip(a, b, strict=True):
        assert x["sample_ids"] == y["sample_ids"] and x["epoch"] == y["epoch"]
        for key in ("input_ids", "labels", "position_ids", "cu_seqlens"):
            assert torch.equal(x[key], y[key]), key
    return True


def test_batch_contents_match_dataset(data):
    ds = data["ds"]
    assert len(ds) >= 8
    loader = make_loader(ds, micro_batch_size=3)
    batch = next(loader)
    assert batch["input_ids"].shape == (3, CONTEXT) and batch["input_ids"].dtype == torch.long
    cu = batch["cu_seqlens"]
    assert cu.dtype == torch.int32 and cu[0] == 0 and cu[-1] == 3 * CONTEXT
    items = [ds[i] for i in batch["sample_ids"]]
    want_cu = np.concatenate(
        [[0]] + [it["cu_seqlens"][1:] + b * CONTEXT for b, it in enumerate(items)]
    )
    assert cu.tolist() == want_cu.tolist()
    assert batch["max_seqlen"] == int(np.diff(want_cu).max())
    assert batch["num_supervised"] == sum(int((it["labels"] != IGNORE_INDEX).sum()) for it in items)
    assert (batch["labels"] != IGNORE_INDEX).sum() == batch["num_supervised"]


def test_deterministic_per_seed_and_epoch(data):
    ds = data["ds"]
    a, b = take(make_loader(ds, seed=5), 12), take(make_loader(ds, seed=5), 12)
    assert same_batches(a, b)
    c = take(make_loader(ds, seed=6), 12)
    assert [x["sample_ids"] for x in a] != [x["sample_ids"] for x in c]
    steps = make_loader(ds).steps_per_epoch
    two = take(make_loader(ds), 2 * steps)
    assert [x["epoch"] for x in two] == [0] * steps + [1] * steps
    assert [x["sample_ids"] for x in two[:steps]] != [x["sample_ids"] for x in two[steps:]]


@pytest.mark.parametrize(("dp", "batch", "drop_last"), [(2, 2, False), (3, 1, False), (3, 2, True)])
def test_dp_ranks_cover_epoch_once(data, dp, batch, drop_last):
    ds = data["ds"]
    n = len(ds)
    loaders = [
        make_loader(ds, dp_rank=r, dp_size=dp, micro_batch_size=batch, drop_last=drop_last)
        for r in range(dp)
    ]
    steps = len(loaders[0])
    per_rank = [sum((x["sample_ids"] for x in take(ld, steps)), []) for ld in loaders]
    counts = Counter(sum(per_rank, []))
    if drop_last:
        assert steps == n // (dp * batch)
        assert sum(counts.values()) == len(counts) == steps * dp * batch  # disjoint
    else:
        assert set(counts) == set(range(n))  # everything once ...
        extra = steps * dp * batch - n  # ... plus the padding repeats
        assert sum(c - 1 for c in counts.values()) == extra < dp * batch
    assert all(ld.epoch == 1 and ld.step == 0 for ld in loaders)


@pytest.mark.parametrize("stop", [3, "epoch_end", "next_epoch"])
def test_resume_exact(data, stop):
    ds = data["ds"]
    steps = make_loader(ds).steps_per_epoch
    k = {"epoch_end": steps, "next_epoch": steps + 2}.get(stop, stop)
    full = take(make_loader(ds, seed=11), k + steps)
    first = make_loader(ds, seed=11)
    take(first, k)
    state = json.loads(json.dumps(first.state_dict()))  # plain JSON survives
    resumed = make_loader(ds, seed=11)
    resumed.load_state_dict(state)
    assert same_batches(take(resumed, steps), full[k:])
    with pytest.raises(ValueError, match="seed=11 but this loader has 12"):
        make_loader(ds, seed=12).load_state_dict(state)


def test_sp_slices_concatenate_single_process(data):
    ds = data["ds"]
    for sp in (2, 3, 4):
        batches = [next(make_loader(ds, sp_rank=r, sp_size=sp)) for r in range(sp)]
        padded = [pad_to_multiple(ds[i], sp, ds.pad_id) for i in batches[0]["sample_ids"]]
        for key in ("input_ids", "labels", "position_ids"):
            whole = torch.cat([b[key] for b in batches], dim=1)
            assert torch.equal(whole, torch.from_numpy(np.stack([p[key] for p in padded])))
        assert all(torch.equal(b["cu_seqlens"], batches[0]["cu_seqlens"]) for b in batches)
        assert batches[0]["cu_seqlens"][-1] == 2 * len(padded[0]["input_ids"])


def test_bad_arguments(data):
    with pytest.raises(ValueError, match="sp_rank=2 must be in"):
        make_loader(data["ds"], sp_rank=2, sp_size=2)
    with pytest.raises(ValueError, match="cannot fill one step"):
        make_loader(data["ds"], dp_size=1, micro_batch_size=10_000, drop_last=True)


# ---------------------------------------------------------------- multi-process (gloo) -----


LAYOUTS = [(2, 2), (1, 3), (4, 1)]  # (dp, sp); ranks beyond dp * sp sit a layout out
WORLD = 4


def _worker(rank: int, data: dict, init: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    try:
        # Cache hit: each rank maps the token store the parent built; no tokenizer is loaded.
        ds = build_packed_dataset(
            data["paths"], data["model"], "chat", CONTEXT, cache_dir=data["cache"]
        )
        for dp, sp in LAYOUTS:
            mine = run_rank(ds, rank, dp, sp) if rank < dp * sp else None
            gathered = [None] * WORLD
            dist.all_gather_object(gathered, mine)
            if rank == 0:
                steps = PackedLoader(ds, **loader_args(0, dp, sp)).steps_per_epoch
                check_layout(gathered[: dp * sp], ds, dp, sp, steps)
    finally:
        dist.destroy_process_group()


def loader_args(rank: int, dp: int, sp: int) -> dict:
    dp_rank, sp_rank = divmod(rank, sp)
    return dict(
        micro_batch_size=2, dp_rank=dp_rank, dp_size=dp, sp_rank=sp_rank, sp_size=sp, seed=7
    )


def run_rank(ds, rank: int, dp: int, sp: int) -> list[dict]:
    """This rank's batches for one epoch and a half, checking resume from mid-epoch."""
    loader = PackedLoader(ds, **loader_args(rank, dp, sp))
    steps = len(loader)
    first = take(loader, steps // 2 + 1)
    state = loader.state_dict()
    rest = take(loader, steps)  # crosses the epoch boundary
    resumed = PackedLoader(ds, **loader_args(rank, dp, sp))
    resumed.load_state_dict(state)
    assert same_batches(take(resumed, steps), rest)
    return [
        {k: (v.tolist() if torch.is_tensor(v) else v) for k, v in b.items()} for b in first + rest
    ]


def check_layout(gathered: list, ds, dp: int, sp: int, steps: int) -> None:
    """SP ranks: same sequences, slices concatenating to the whole; DP ranks: one epoch once."""
    for d in range(dp):
        group = gathered[d * sp : (d + 1) * sp]
        for t in range(len(group[0])):
            batches = [g[t] for g in group]
            for key in ("sample_ids", "cu_seqlens", "epoch", "num_supervised", "max_seqlen"):
                assert all(b[key] == batches[0][key] for b in batches), key
            padded = [pad_to_multiple(ds[i], sp, ds.pad_id) for i in batches[0]["sample_ids"]]
            for key in ("input_ids", "labels", "position_ids"):
                whole = np.concatenate([np.asarray(b[key]) for b in batches], axis=1)
                np.testing.assert_array_equal(whole, np.stack([p[key] for p in padded]))
    epoch0 = Counter()
    for d in range(dp):
        for b in gathered[d * sp]:
            if b["epoch"] == 0:
                epoch0.update(b["sample_ids"])
    assert set(epoch0) == set(range(len(ds)))
    assert sum(epoch0.values()) == steps * dp * 2 and sum(epoch0.values()) - len(ds) < dp * 2


@pytest.mark.slow
def test_multiprocess_dp_sp_layouts(data, tmp_path):
    """4 gloo processes (spawn); layouts dp2 x sp2, dp1 x sp3 (L padded 64 -> 66), dp4 x sp1."""
    import torch.multiprocessing as mp

    args = {k: data[k] for k in ("paths", "model", "cache")}
    mp.spawn(_worker, args=(args, f"file://{tmp_path}/store"), nprocs=WORLD, join=True)


class _First:
    """The first ``m`` sequences of a packed dataset (what the loader needs of one)."""

    def __init__(self, ds, m: int) -> None:
        self.ds, self.m, self.pad_id = ds, m, ds.pad_id

    def __len__(self) -> int:
        return self.m

    def __getitem__(self, i: int) -> dict:
        return self.ds[i]


def test_resume_at_another_data_parallel_degree(data):
    """A position saved at dp=2 continues at dp=1 (and back) with the same sequences in the same
    order, where the layouts fill an epoch alike; otherwise the error names both degrees."""
    ds = _First(data["ds"], 8)
    dp2 = [make_loader(ds, dp_rank=r, dp_size=2, micro_batch_size=1, seed=5) for r in range(2)]
    for ld in dp2:
        take(ld, 3)
    one = make_loader(ds, micro_batch_size=1, seed=5)
    one.load_state_dict(json.loads(json.dumps(dp2[0].state_dict())))
    assert (one.epoch, one.step) == (0, 6)
    # The rest of the epoch at dp=2 (step 3, rank 0 then rank 1) and two steps of the next one
    # are what dp=1 reads next.
    want = [
        b["sample_ids"][0] for pair in zip(*(take(ld, 3) for ld in dp2), strict=True) for b in pair
    ]
    assert [b["sample_ids"][0] for b in take(one, 6)] == want

    back = make_loader(ds, dp_rank=1, dp_size=2, micro_batch_size=1, seed=5)
    single = make_loader(ds, micro_batch_size=1, seed=5)
    take(single, 4)
    back.load_state_dict(single.state_dict())
    assert (back.epoch, back.step) == (0, 2)
    take(single, 3)  # 7 consumed: not a whole number of dp=2 steps
    with pytest.raises(ValueError) as info:
        back.load_state_dict(single.state_dict())
    msg = str(info.value)
    assert "data-parallel degree 1" in msg and "this run has 2" in msg
    assert "7 sequences of epoch 0 are consumed" in msg and "parallel.dp=1" in msg
    # 7 sequences fill 8 slots an epoch at dp=2 (one repeat), 7 at dp=1: not the same run.
    odd = _First(data["ds"], 7)
    state = make_loader(odd, dp_size=2, micro_batch_size=1, seed=5).state_dict()
    with pytest.raises(ValueError, match="fills 8 slots at the old layout and 7 at the new"):
        make_loader(odd, micro_batch_size=1, seed=5).load_state_dict(state)
