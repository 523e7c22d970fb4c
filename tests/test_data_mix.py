"""Mixing datasets by weight (``data.mix``): the proportions hold over an epoch, the order is the
seed's, and a loader stopped mid-epoch resumes the same order."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from data_fixtures import chat_rows, tiny_tokenizer_dir, write_jsonl
from helpers import make_hf_checkpoint

from longtune.data import PackedLoader, build_packed_dataset
from longtune.data.mix import MixedDataset, mixture_shares


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """Two packed datasets of 48 and 24 sequences (one conversation per sequence)."""
    root = tmp_path_factory.mktemp("mix")
    tok = tiny_tokenizer_dir(root / "tok")
    a = write_jsonl(root / "a.jsonl", chat_rows(48, seed=1, max_words=8))
    b = write_jsonl(root / "b.jsonl", chat_rows(24, seed=2, max_words=8))
    datasets = [
        build_packed_dataset([str(p)], tok, "chat", 48, cache_dir=root / "cache") for p in (a, b)
    ]
    return datasets, [str(a), str(b)]


def loader(mixed: MixedDataset, seed: int = 7) -> PackedLoader:
    return PackedLoader(
        mixed, micro_batch_size=2, dp_rank=0, dp_size=1, sp_rank=0, sp_size=1, seed=seed
    )


def test_shares_are_exact_to_one_sequence():
    assert mixture_shares(100, [3, 1]) == [75, 25]
    assert mixture_shares(10, [1, 1, 1]) == [4, 3, 3]
    assert sum(mixture_shares(1001, [0.3, 2.5, 7])) == 1001


def test_three_to_one_over_an_epoch_and_each_datasets_stream(two):
    datasets, names = two
    sizes = [len(d) for d in datasets]
    mixed = MixedDataset(datasets, [3, 1], names)
    n = len(mixed)
    assert n == sum(sizes)
    first = mixed.starts[1]
    for epoch in range(3):
        order = mixed.epoch_order(7, epoch)
        from_a = int((order < first).sum())
        assert abs(from_a / n - 0.75) <= 0.02, (epoch, from_a, n)
        assert len(order) == n
    # Each dataset's sequences come in passes, every one before any repeats: over any run of
    # epochs a sequence is drawn as often as any other, give or take one.
    for d, (lo, hi) in enumerate([(0, first), (first, n)]):
        epochs = -(-sizes[d] // mixed.shares[d])  # enough epochs to show all of it
        drawn = np.concatenate([mixed.epoch_order(7, e) for e in range(epochs)])
        counts = Counter(int(k) for k in drawn if lo <= k < hi)
        assert len(counts) == sizes[d], (d, len(counts), sizes[d])
        assert max(counts.values()) - min(counts.values()) <= 1, (d, counts)
    assert mixed.shares[0] > sizes[0] > mixed.shares[1]  # a repeats within an epoch; b does not
    # Another seed, another order; the same seed, the same.
    assert not np.array_equal(mixed.epoch_order(8, 0), mixed.epoch_order(7, 0))
    assert np.array_equal(
        mixed.epoch_order(7, 1), MixedDataset(datasets, [3, 1], names).epoch_order(7, 1)
    )


def test_a_loader_stopped_mid_epoch_resumes_the_same_order(two):
    datasets, names = two
    whole = loader(MixedDataset(datasets, [3, 1], names))
    expected = [next(whole)["sample_ids"] for _ in range(2 * len(whole) + 5)]

    first = loader(MixedDataset(datasets, [3, 1], names))
    seen = [next(first)["sample_ids"] for _ in range(len(first) + 7)]  # into the second epoch
    state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint keeps it
    again = loader(MixedDataset(datasets, [3, 1], names))  # a new process
    again.load_state_dict(state)
    seen += [next(again)["sample_ids"] for _ in range(len(expected) - len(seen))]
    assert seen == expected


def test_a_run_mixing_two_files_trains_and_says_the_shares(tmp_path):
    from longtune import finetune

    model = make_hf_checkpoint(tmp_path / "model")
    a = write_jsonl(tmp_path / "a.jsonl", chat_rows(12, seed=3, max_words=8))
    b = write_jsonl(tmp_path / "b.jsonl", chat_rows(6, seed=4, max_words=8))
    run = finetune(
        model=str(model),
        train_data=[str(a), str(b)],
        context_length=96,
        duration="2st",
        output_dir=str(tmp_path / "run"),
        data__cache_dir=str(tmp_path / "cache"),
        data__mix=[3, 1],
    )
    assert run.status == "succeeded", run.error
    log = (tmp_path / "run" / "train.log").read_text().splitlines()
    line = next(x for x in log if "data mixture" in x)
    assert "a.jsonl: weight 3" in line and "b.jsonl: weight 1" in line
