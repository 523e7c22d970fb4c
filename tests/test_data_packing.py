"""Packing: property-based layout checks, best-fit quality, datasets, overlength, cache."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from data_fixtures import chat_rows, tiny_tokenizer_dir, write_jsonl
from hypothesis import given, settings
from hypothesis import strategies as st

import longtune.data.tokenize as tokenize_mod
from longtune.data import (
    IGNORE_INDEX,
    build_packed_dataset,
    pack_lengths,
    pack_sequence,
    pad_to_multiple,
    tokenize_files,
)
from longtune.data.validation import expand_paths
from longtune.fsutil import is_longtune_output


@st.composite
def documents(draw):
    capacity = draw(st.integers(2, 64))
    n = draw(st.integers(1, 25))
    docs = []
    for d in range(n):
        length = draw(st.integers(1, capacity))
        mask = draw(st.lists(st.booleans(), min_size=length, max_size=length))
        ids = np.arange(length, dtype=np.uint32) + 1000 * (d + 1)  # unique ids per document
        docs.append((ids, np.asarray(mask, dtype=np.uint8)))
    return capacity, docs


@settings(max_examples=150, deadline=None)
@given(documents(), st.integers(1, 4))
def test_packing_layout_property(case, sp):
    capacity, docs = case
    bins = pack_lengths([len(ids) for ids, _ in docs], capacity)
    placed = sorted(i for b in bins for i in b)
    assert placed == list(range(len(docs)))  # every document exactly once
    for b in bins:
        assert sum(len(docs[i][0]) for i in b) <= capacity
        item = pack_sequence([docs[i] for i in b], capacity, pad_id=7)
        item["num_docs"] = np.asarray(len(b))
        item = pad_to_multiple(item, sp, pad_id=7)
        length = len(item["input_ids"])
        assert length % sp == 0 and length - capacity < sp
        cu = item["cu_seqlens"]
        assert cu.dtype == np.int32 and cu[0] == 0 and cu[-1] == length
        assert np.all(np.diff(cu) > 0)
        n_docs = len(b)
        assert len(cu) - 1 in (n_docs, n_docs + 1)  # one extra segment: the padding
        for k in range(len(cu) - 1):
            s, e = int(cu[k]), int(cu[k + 1])
            np.testing.assert_array_equal(item["position_ids"][s:e], np.arange(e - s))
            assert item["labels"][e - 1] == IGNORE_INDEX  # never predict across a boundary
            if k >= n_docs:  # padding
                assert np.all(item["input_ids"][s:e] == 7)
                assert np.all(item["labels"][s:e] == IGNORE_INDEX)
                continue
            ids, mask = docs[b[k]]
            np.testing.assert_array_equal(item["input_ids"][s:e], ids)
            want = np.where(mask[1:] > 0, ids[1:].astype(np.int64), IGNORE_INDEX)
            np.testing.assert_array_equal(item["labels"][s : e - 1], want)
        # Every label is a token of the same document: ids are unique per document.
        sup = item["labels"] != IGNORE_INDEX
        assert np.all(item["labels"][sup] // 1000 == item["input_ids"][sup] // 1000)
        # SP slices concatenate back to the whole sequence.
        chunk = length // sp
        for key in ("input_ids", "labels", "position_ids"):
            parts = [item[key][r * chunk : (r + 1) * chunk] for r in range(sp)]
            np.testing.assert_array_equal(np.concatenate(parts), item[key])


def test_best_fit_decreasing_beats_concatenation_order():
    lengths = [6, 3, 6, 4, 5, 4, 2]  # total 30, fits 3 bins of 10 only when sorted
    bins = pack_lengths(lengths, 10)
    assert len(bins) == 3
    assert sorted(sum(lengths[i] for i in b) for b in bins) == [10, 10, 10]
    assert pack_lengths(lengths, 10) == bins  # deterministic
    with pytest.raises(ValueError, match=r"lengths must be in \[1, 10\]"):
        pack_lengths([11], 10)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return tiny_tokenizer_dir(tmp_path_factory.mktemp("tok"))


def stores_in(cache: Path) -> list[str]:
    """The token stores of a cache folder (not its marker)."""
    return sorted(p.name for p in cache.iterdir() if not p.name.startswith("."))


def test_chat_dataset_shapes_and_stats(tmp_path, tiny_model):
    path = write_jsonl(tmp_path / "c.jsonl", chat_rows(40, seed=1))
    ds = build_packed_dataset([str(path)], tiny_model, "chat", 512, cache_dir=tmp_path / "c")
    assert ds.stats.documents == 40 and len(ds) == ds.stats.packed_sequences
    total = 0
    for i in range(len(ds)):
        item = ds[i]
        assert (
            item["input_ids"].shape == item["labels"].shape == item["position_ids"].shape == (512,)
        )
        total += int((item["labels"] != IGNORE_INDEX).sum())
        assert len(ds.source(i)) == int(item["num_docs"])
    assert total == ds.stats.supervised_tokens > 0
    assert 0 <= ds.stats.padding_fraction < 0.5


def test_instruction_and_text_masks(tmp_path, tiny_model):
    inst = write_jsonl(tmp_path / "i.jsonl", [{"prompt": "PROMPT", "response": "ANSWER"}])
    ds = build_packed_dataset([str(inst)], tiny_model, "instruction", 64, cache_dir=tmp_path / "c")
    item = ds[0]
    # Byte-level tiny tokenizer: supervised targets spell the response and <|im_end|>.
    targets = item["labels"][item["labels"] != IGNORE_INDEX]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    assert tok.decode(targets.tolist()) == "ANSWER<|im_end|>"
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text("plain text")
    ds = build_packed_dataset([str(folder)], tiny_model, "text", 64, cache_dir=tmp_path / "c")
    item = ds[0]
    n = int(item["cu_seqlens"][1])
    # Every token but the first is a target; the document ends with eos.
    np.testing.assert_array_equal(item["labels"][: n - 1], item["input_ids"][1:n])
    assert item["input_ids"][n - 1] == tok.eos_token_id and item["labels"][n - 1] == IGNORE_INDEX


def test_overlength_truncate_and_drop(tmp_path, tiny_model):
    rows = [
        {"text": "short one"},
        {"text": "x" * 200},  # 201 tokens with eos: over a context of 64
    ]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    kw = dict(cache_dir=tmp_path / "c")
    trunc = build_packed_dataset([str(path)], tiny_model, "text", 64, overlength="truncate", **kw)
    f = trunc.stats.files[0]
    assert (f.examples, f.overlength, f.truncated, f.dropped) == (2, 1, 1, 0)
    assert trunc.stats.documents == 2 and trunc.stats.tokens == 10 + 64
    drop = build_packed_dataset([str(path)], tiny_model, "text", 64, overlength="drop", **kw)
    f = drop.stats.files[0]
    assert (f.overlength, f.truncated, f.dropped) == (1, 0, 1)
    assert drop.stats.documents == 1 and len(drop) == 1


def test_overlength_split_keeps_every_target_once(tmp_path, tiny_model):
    """split: a long text becomes context-length pieces that overlap by one token, each its own
    document; together their targets are exactly the targets of the whole text."""
    from transformers import AutoTokenizer

    text = "".join(chr(ord("a") + i % 26) for i in range(200))  # 201 tokens with eos
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "short one"}, {"text": text}])
    ds = build_packed_dataset(
        [str(path)], tiny_model, "text", 64, overlength="split", cache_dir=tmp_path / "c"
    )
    f = ds.stats.files[0]
    assert (f.overlength, f.split, f.truncated, f.dropped) == (1, 1, 0, 0)
    # 200 targets, 63 per piece: pieces start at 0, 63, 126, 189 (64 + 64 + 64 + 12 tokens).
    assert ds.stats.documents == 1 + 4
    assert ds.stats.tokens == 10 + 3 * 64 + 12
    tok = AutoTokenizer.from_pretrained(tiny_model)
    full = tok(text)["input_ids"] + [tok.eos_token_id]
    assert len(full) == 201
    segments = []
    for i in range(len(ds)):
        item = ds[i]
        cu = item["cu_seqlens"].tolist()
        for a, b in zip(cu[:-1], cu[1:], strict=True):
            segments.append(
                (item["input_ids"][a:b].tolist(), item["labels"][a:b], item["position_ids"][a:b])
            )
    targets = []
    for start in (0, 63, 126, 189):
        piece = full[start : start + 64]
        found = [seg for seg in segments if seg[0] == piece]
        assert len(found) == 1, f"piece at {start} found {len(found)} times"
        ids, labels, positions = found[0]
        assert positions.tolist() == list(range(len(ids)))  # positions restart in each piece
        np.testing.assert_array_equal(labels[:-1], ids[1:])  # targets stay inside the piece
        assert labels[-1] == IGNORE_INDEX
        targets.extend(labels[:-1].tolist())
    # The whole text packed alone: its targets, in order, are the pieces' targets, in order.
    whole = pack_sequence([(np.asarray(full), np.ones(len(full), np.uint8))], 256, 0)["labels"]
    assert targets == whole[: len(full) - 1].tolist() == full[1:]


def test_cache_reused_and_invalidated(tmp_path, tiny_model, monkeypatch):
    path = write_jsonl(tmp_path / "c.jsonl", chat_rows(20, seed=2))
    cache = tmp_path / "cache"
    first = build_packed_dataset([str(path)], tiny_model, "chat", 256, cache_dir=cache)
    loads = []
    real = tokenize_mod.load_tokenizer
    monkeypatch.setattr(tokenize_mod, "load_tokenizer", lambda d: loads.append(d) or real(d))
    # Same file, tokenizer and settings (another context length is a packing setting): reused.
    again = build_packed_dataset([str(path)], tiny_model, "chat", 128, cache_dir=cache)
    assert loads == [] and len(stores_in(cache)) == 1
    assert again.stores[0].path == first.stores[0].path
    # Another loss_on setting, then a changed file: new stores, tokenizer loaded.
    build_packed_dataset(
        [str(path)], tiny_model, "chat", 256, loss_on="last_assistant", cache_dir=cache
    )
    assert len(loads) == 1 and len(stores_in(cache)) == 2
    write_jsonl(path, chat_rows(21, seed=2))
    changed = build_packed_dataset([str(path)], tiny_model, "chat", 256, cache_dir=cache)
    assert len(loads) == 2 and changed.stats.files[0].examples == 21


def test_template_without_end_of_turn_token_and_multibyte_edges(tmp_path):
    """No special end-of-turn token: the span ends with the content, whose last character is
    several byte tokens long; all of them are supervised, nothing after them."""
    model = tiny_tokenizer_dir(tmp_path / "tok")
    (model / "chat_template.jinja").write_text(
        "{% for m in messages %}{{ '### ' + m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '### assistant: ' }}{% endif %}"
    )
    row = {
        "messages": [
            {"role": "user", "content": "数据?"},
            {"role": "assistant", "content": "是数据"},
        ]
    }
    path = write_jsonl(tmp_path / "c.jsonl", [row])
    ds = build_packed_dataset([str(path)], model, "chat", 64, cache_dir=tmp_path / "c")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    labels = ds[0]["labels"]
    assert tok.decode(labels[labels != IGNORE_INDEX].tolist()) == "是数据"


def test_concurrent_store_builds_keep_one_copy(tmp_path, tiny_model):
    """Two ranks tokenizing the same file at once: the second finds the first's store."""
    from longtune.data.tokenize import STORE_FILES, Encoder, build_store, load_tokenizer

    path = write_jsonl(tmp_path / "c.jsonl", chat_rows(5, seed=4))
    encoder = Encoder(load_tokenizer(tiny_model), "chat")
    a = build_store(str(path), encoder, tmp_path / "cache" / "key")
    b = build_store(str(path), encoder, tmp_path / "cache" / "key")
    assert a.path == b.path and np.array_equal(a.ids, b.ids)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["key"]
    assert sorted(p.name for p in a.path.iterdir()) == sorted(STORE_FILES)


@settings(max_examples=200, deadline=None)
@given(
    st.integers(2, 12),
    st.lists(st.tuples(st.integers(1, 60), st.integers(0, 2**60)), min_size=1, max_size=6),
)
def test_split_pieces_cover_every_target_exactly_once(context_length, docs):
    """Property: for any lengths, masks and context, each supervised target of a document is
    the target of exactly one piece (absolute token positions compared)."""
    from pathlib import Path

    from longtune.data.packing import _usable_docs
    from longtune.data.tokenize import TokenStore

    lengths = [n for n, _ in docs]
    masks = [np.array([(bits >> i) & 1 for i in range(n)], np.uint8) for n, bits in docs]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    store = TokenStore(
        file="f",
        ids=np.arange(offsets[-1], dtype=np.uint32),
        mask=np.concatenate(masks),
        offsets=offsets,
        lines=np.arange(1, len(docs) + 1),
        path=Path("."),
        pad_id=0,
    )
    doc, start, length, _ = _usable_docs(store, context_length, "split")
    assert (length <= context_length).all() and (length >= 1).all()
    got = sorted(
        (int(d), int(s) + t)
        for d, s, n in zip(doc, start, length, strict=True)
        for t in range(1, int(n))
        if masks[d][int(s) + t]
    )
    want = sorted((d, t) for d, m in enumerate(masks) for t in range(1, len(m)) if m[t])
    assert got == want


def test_a_cache_inside_the_data_folder_is_never_read_as_data(tmp_path, tiny_model):
    """The documented resume command with ``data.cache_dir`` inside the data folder: the second
    run sees the same files as the first, and reuses their stores."""
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "a.jsonl", chat_rows(3, seed=5))
    write_jsonl(data / "b.json", chat_rows(2, seed=6))
    cache = data / "cache"
    files = expand_paths([str(data)], "chat")
    first = build_packed_dataset([str(data)], tiny_model, "chat", 256, cache_dir=cache)
    assert is_longtune_output(cache) and all(is_longtune_output(s.path) for s in first.stores)
    assert expand_paths([str(data)], "chat") == files
    second = build_packed_dataset([str(data)], tiny_model, "chat", 256, cache_dir=cache)
    assert [s.file for s in second.stores] == files == [str(data / "a.jsonl"), str(data / "b.json")]
    assert [s.path for s in second.stores] == [s.path for s in first.stores]


def test_a_cache_folder_of_the_users_is_not_marked(tmp_path, tiny_model):
    """A cache folder holding other files is not claimed as longtune's; its stores are."""
    cache = tmp_path / "mine"
    cache.mkdir()
    (cache / "notes.txt").write_text("mine\n")
    path = write_jsonl(tmp_path / "c.jsonl", chat_rows(2, seed=7))
    (store,) = tokenize_files([str(path)], tiny_model, "chat", cache_dir=cache)
    assert not is_longtune_output(cache) and is_longtune_output(store.path)


def flip_byte(file: Path, offset_from_end: int) -> None:
    data = bytearray(file.read_bytes())
    data[-offset_from_end] ^= 0x01
    file.write_bytes(bytes(data))


def set_id(file: Path, value: int) -> None:
    ids = np.load(file, mmap_mode="r+")
    ids[len(ids) // 2] = value
    ids.flush()
    del ids


DAMAGES = {
    # in range: the low bit of a byte-level id (every id of a ChatML template's text is < 256)
    "flipped id byte": lambda store: flip_byte(store / "ids.npy", 4 * 7),
    "out-of-range id": lambda store: set_id(store / "ids.npy", 10**6),
    "flipped mask byte": lambda store: flip_byte(store / "mask.npy", 3),
    "cut ids file": lambda store: (store / "ids.npy").write_bytes(
        (store / "ids.npy").read_bytes()[:100]
    ),
    "missing lines file": lambda store: (store / "lines.npy").unlink(),
    "torn meta.json": lambda store: (store / "meta.json").write_text('{"pad_id": '),
    "meta.json without checksums": lambda store: (store / "meta.json").write_text(
        '{"pad_id": 0, "file": "x"}'
    ),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_cache_entry_is_rebuilt_never_used(tmp_path, tiny_model, caplog, damage):
    path = write_jsonl(tmp_path / "c.jsonl", chat_rows(20, seed=8))
    (fresh,) = tokenize_files([str(path)], tiny_model, "chat", cache_dir=tmp_path / "fresh")
    cache = tmp_path / "cache"
    (store,) = tokenize_files([str(path)], tiny_model, "chat", cache_dir=cache)
    store_path = store.path
    del store
    DAMAGES[damage](store_path)
    with caplog.at_level(logging.WARNING, logger="longtune.data.tokenize"):
        (again,) = tokenize_files([str(path)], tiny_model, "chat", cache_dir=cache)
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "\n" not in warning
    assert warning.startswith(
        f"token cache of {path} is damaged, tokenizing it again: {store_path}"
    )
    assert again.path == store_path and stores_in(cache) == [store_path.name]
    for name in ("ids", "mask", "offsets", "lines"):
        np.testing.assert_array_equal(getattr(again, name), getattr(fresh, name))
    # The rebuilt store is whole: read again without a warning.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="longtune.data.tokenize"):
        tokenize_files([str(path)], tiny_model, "chat", cache_dir=cache)
    assert caplog.records == []


def dead_pid() -> int:
    """The pid of a process that has ended (and was reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_temporaries_of_a_killed_tokenization_are_removed_when_a_store_is_written(
    tmp_path, tiny_model
):
    import longtune.data.tokenize as tok

    cache = tmp_path / "cache"
    key = "0123456789abcdef0123456789abcdef"
    names = {
        "dead": f"{key}.tmp-{tok._HOST}-{dead_pid()}-0badcafe",
        "dead, moved aside": f"{key}.old-{tok._HOST}-{dead_pid()}-0badcafe",
        "alive": f"{key}.tmp-{tok._HOST}-{os.getppid()}-0badcafe",
        "another host": f"{key}.tmp-ffffffff-{dead_pid()}-0badcafe",
        "older naming, no pid": f"{key}.tmpq8_x2zlk",
    }
    for name in names.values():
        (cache / name).mkdir(parents=True)
        np.save(cache / name / "ids.npy", np.arange(3))
    path = write_jsonl(tmp_path / "c.jsonl", chat_rows(2, seed=9))
    (store,) = tokenize_files([str(path)], tiny_model, "chat", cache_dir=cache)
    left = {what for what, name in names.items() if (cache / name).exists()}
    assert left == {"alive", "another host", "older naming, no pid"}
    assert stores_in(cache) == sorted([store.path.name, *(names[w] for w in left)])


def test_a_full_disk_under_the_token_cache_is_one_line_naming_it(tmp_path, tiny_model, monkeypatch):
    import errno

    from longtune.fsutil import OutputDirError

    real = tokenize_mod._Column.append

    def full(column, values):
        if column.raw.name == "ids.raw":
            raise OSError(errno.ENOSPC, "No space left on device")  # a write: no file name
        real(column, values)

    monkeypatch.setattr(tokenize_mod._Column, "append", full)
    data = write_jsonl(tmp_path / "c.jsonl", chat_rows(2, seed=7))
    cache = tmp_path / "cache"
    with pytest.raises(OutputDirError) as e:
        tokenize_files([str(data)], tiny_model, "chat", cache_dir=cache)
    assert str(e.value).startswith(f"cannot write the token cache in {cache}")
    assert "No space left on device" in str(e.value)
    assert not [p for p in cache.rglob("*.npy")]  # no half-written store left
    assert not [p for p in cache.rglob("*.raw")]


def test_a_store_written_in_batches_is_the_arrays_np_save_writes(tmp_path, tiny_model, monkeypatch):
    """The store is written batch by batch (memory: one batch, not the file); its files are
    byte for byte ``np.save`` of the whole arrays, and meta.json's CRCs are theirs."""
    import json
    import zlib

    import longtune.data.tokenize as tokenize
    from longtune.data.tokenize import Encoder, build_store, load_tokenizer
    from longtune.data.validation import iter_records

    path = write_jsonl(tmp_path / "c.jsonl", chat_rows(23, seed=5))
    encoder = Encoder(load_tokenizer(tiny_model), "chat")
    monkeypatch.setattr(tokenize, "BATCH_SIZE", 4)  # 6 batches
    monkeypatch.setattr(tokenize, "PROGRESS_EVERY_S", 0.0)  # a progress line per batch
    store = build_store(str(path), encoder, tmp_path / "cache" / "key")

    records = list(iter_records(str(path), "chat"))
    encoded = encoder.encode(records)
    lengths = [len(ids) for ids, _ in encoded]
    whole = {
        "ids": np.concatenate([ids for ids, _ in encoded]).astype(np.uint32),
        "mask": np.concatenate([mask for _, mask in encoded]).astype(np.uint8),
        "offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        "lines": np.asarray([r.line for r in records], dtype=np.int64),
    }
    meta = json.loads((store.path / "meta.json").read_text())
    for name, array in whole.items():
        np.save(tmp_path / f"{name}.npy", array)
        assert (store.path / f"{name}.npy").read_bytes() == (tmp_path / f"{name}.npy").read_bytes()
        described = {"dtype": array.dtype.str, "shape": list(array.shape)}
        assert meta["arrays"][name] == described | {"crc32": zlib.crc32(array)}


def test_an_interrupted_store_write_leaves_nothing(tmp_path, tiny_model, monkeypatch):
    import longtune.data.tokenize as tokenize
    from longtune.data.tokenize import Encoder, build_store, load_tokenizer

    path = write_jsonl(tmp_path / "c.jsonl", chat_rows(12, seed=6))
    encoder = Encoder(load_tokenizer(tiny_model), "chat")
    monkeypatch.setattr(tokenize, "BATCH_SIZE", 4)
    real, calls = encoder.encode, []

    def encode(batch):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(batch)

    monkeypatch.setattr(encoder, "encode", encode)
    with pytest.raises(KeyboardInterrupt):
        build_store(str(path), encoder, tmp_path / "cache" / "key")
    assert list((tmp_path / "cache").iterdir()) == []


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 1), max_size=40), st.integers(1, 9), st.data())
def test_prefix_sums_by_chunks_equal_a_whole_cumsum(bits, chunk, data):
    import longtune.data.packing as packing

    mask = np.asarray(bits, dtype=np.uint8)
    at = np.asarray(data.draw(st.lists(st.integers(0, len(bits)), max_size=30)), dtype=np.int64)
    whole = np.concatenate([[0], np.cumsum(mask, dtype=np.int64)])[at]
    old = packing.PREFIX_CHUNK
    packing.PREFIX_CHUNK = chunk
    try:
        assert np.array_equal(packing._prefix_sums(mask, at), whole)
    finally:
        packing.PREFIX_CHUNK = old
