"""Packing tokenized documents into fixed-length sequences with document boundaries.

Documents are assigned to sequences of ``context_length`` tokens by best-fit decreasing
(longest first, each into the fullest sequence that still has room). A packed sequence holds
its documents back to back, then padding: ``cu_seqlens`` marks where every document starts
(the padding is one more segment), ``position_ids`` restart at 0 for each segment, and
``labels`` are shifted here, once: ``labels[t]`` is the target for position ``t`` (the next
token of the same document when that token is supervised), ``-100`` otherwise — in particular
at the last token of every document and everywhere in the padding.
"""

from __future__ import annotations

import bisect
import logging
import mmap
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from longtune.data.tokenize import TokenStore, tokenize_files
from longtune.data.validation import expand_paths, ignored_keys_summary, validate_files

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
OVERLENGTH = ("truncate", "drop", "split")


def pack_lengths(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Assign items to bins of ``capacity`` by best-fit decreasing.

    Deterministic: ties in length keep input order.

    Args:
        lengths: item sizes, each in ``[1, capacity]``.
        capacity: bin size.

    Returns:
        Bins as lists of item indices (in placement order), fullest-first creation order.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and (lengths.min() < 1 or lengths.max() > capacity):
        raise ValueError(
            f"lengths must be in [1, {capacity}], got min {lengths.min()} max {lengths.max()}"
        )
    order = np.argsort(-lengths, kind="stable")
    bins: list[list[int]] = []
    # Bins that still have room, sorted by (remaining room, bin index).
    free_room: list[int] = []
    free_bin: list[int] = []
    for i in order.tolist():
        n = int(lengths[i])
        j = bisect.bisect_left(free_room, n)
        if j < len(free_room):
            room, b = free_room.pop(j), free_bin.pop(j)
            bins[b].append(i)
            room -= n
        else:
            b = len(bins)
            bins.append([i])
            room = capacity - n
        if room > 0:
            k = bisect.bisect_left(free_room, room)
            free_room.insert(k, room)
            free_bin.insert(k, b)
    return bins


def pack_sequence(
    docs: Sequence[tuple[np.ndarray, np.ndarray]], length: int, pad_id: int
) -> dict[str, np.ndarray]:
    """Lay out documents back to back in one sequence of ``length`` tokens.

    Args:
        docs: per document (token ids, target mask); total length at most ``length``.
        length: the sequence length; the rest is padding (its own segment).
        pad_id: token id used for padding.

    Returns:
        ``input_ids``, ``labels`` (int64, shifted once), ``position_ids`` (int64, restarting at
        0 for each segment) and ``cu_seqlens`` (int32, ``[n_segments + 1]``, 0 ... ``length``).
    """
    input_ids = np.full(length, pad_id, dtype=np.int64)
    labels = np.full(length, IGNORE_INDEX, dtype=np.int64)
    position_ids = np.empty(length, dtype=np.int64)
    cu = [0]
    for ids, mask in docs:
        s, n = cu[-1], len(ids)
        if s + n > length:
            raise ValueError(f"documents total more than length={length} tokens")
        input_ids[s : s + n] = ids
        target = np.asarray(ids[1:], dtype=np.int64)
        labels[s : s + n - 1] = np.where(np.asarray(mask[1:]) > 0, target, IGNORE_INDEX)
        position_ids[s : s + n] = np.arange(n)
        cu.append(s + n)
    if cu[-1] < length:
        position_ids[cu[-1] :] = np.arange(length - cu[-1])
        cu.append(length)
    return {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": position_ids,
        "cu_seqlens": np.asarray(cu, dtype=np.int32),
    }


@dataclass
class FileStats:
    """Statistics of one data file after tokenization and the overlength policy."""

    file: str
    examples: int
    token_min: int
    token_median: float
    token_p95: float
    token_max: int
    tokens: int
    supervised_tokens: int
    overlength: int
    truncated: int
    dropped: int
    dropped_unsupervised: int
    split: int = 0
    """Examples cut into several context-length pieces (``overlength="split"``)."""
    packed_sequences: int = 0
    padding_fraction: float = 0.0


@dataclass
class DatasetStats:
    """Statistics of a packed dataset: totals plus one :class:`FileStats` per file."""

    files: list[FileStats]
    documents: int
    tokens: int
    supervised_tokens: int
    packed_sequences: int
    padding_fraction: float
    context_length: int
    overlength: str
    extra: dict = field(default_factory=dict)


def _usable_docs(
    store: TokenStore, context_length: int, overlength: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, FileStats]:
    """Pieces of documents kept from one store: (document index, start, length) each.

    ``truncate`` keeps the first ``context_length`` tokens of a document, ``drop`` drops a
    longer one, ``split`` cuts it into pieces of at most ``context_length`` tokens that overlap
    by one token (each its own document: positions restart, nothing attends across the cut).
    The overlap keeps every target: the last token of a piece has no label inside it, so it is
    the first token of the next piece, whose first label is that token's target. A piece
    ``k`` starts at ``k * (context_length - 1)``; a document of ``n`` tokens (``n - 1``
    targets) gives ``ceil((n - 1) / (context_length - 1))`` pieces. Pieces with no supervised
    target are dropped.
    """
    lengths = store.lengths
    over = lengths > context_length
    if overlength == "split":
        stride = context_length - 1
        pieces = np.maximum(1, -(-(lengths - 1) // stride))
        doc = np.repeat(np.arange(len(lengths)), pieces)
        index_in_doc = np.arange(int(pieces.sum())) - np.repeat(np.cumsum(pieces) - pieces, pieces)
        start = index_in_doc * stride
        length = np.minimum(lengths[doc] - start, context_length)
    else:
        doc = np.arange(len(lengths))
        start = np.zeros(len(lengths), dtype=np.int64)
        length = np.minimum(lengths, context_length)
    keep = np.ones(len(doc), dtype=bool)
    if overlength == "drop":
        keep &= ~over
    # Supervised targets per piece: mask[1:] over the piece's tokens.
    first = store.offsets[:-1][doc] + start
    ends = _prefix_sums(store.mask, np.concatenate([first + length, first + np.minimum(length, 1)]))
    sup = ends[: len(first)] - ends[len(first) :]  # one pass over the mask
    unsupervised = keep & (sup == 0)
    keep &= ~unsupervised
    stats = FileStats(
        file=store.file,
        examples=store.num_docs,
        token_min=int(lengths.min()),
        token_median=float(np.median(lengths)),
        token_p95=float(np.percentile(lengths, 95)),
        token_max=int(lengths.max()),
        tokens=int(length[keep].sum()),
        supervised_tokens=int(sup[keep].sum()),
        overlength=int(over.sum()),
        truncated=int((over & keep).sum()) if overlength == "truncate" else 0,
        dropped=int(over.sum()) if overlength == "drop" else 0,
        dropped_unsupervised=int(unsupervised.sum()),
        split=int(over.sum()) if overlength == "split" else 0,
    )
    return doc[keep], start[keep], length[keep], stats


PREFIX_CHUNK = 1 << 22
"""Tokens of a mask summed at a time by :func:`_prefix_sums` (its memory: 8 bytes each)."""


def _prefix_sums(mask: np.ndarray, at: np.ndarray) -> np.ndarray:
    """``mask[:i].sum()`` for every ``i`` of ``at`` (each in ``[0, len(mask)]``), one chunk of
    the mask at a time: memory in the chunk and ``at``, not in the mask's length. The chunks of
    a memory-mapped mask are read with plain reads (:func:`_chunk`)."""
    order = np.argsort(at, kind="stable")
    where = at[order]
    out = np.empty(len(at), dtype=np.int64)
    total, done = 0, 0
    for lo in range(0, len(mask), PREFIX_CHUNK):
        hi = min(len(mask), lo + PREFIX_CHUNK)
        chunk = _chunk(mask, lo, hi)
        upto = int(np.searchsorted(where, hi, side="left"))  # indices in [lo, hi)
        if upto > done:
            csum = np.cumsum(chunk, dtype=np.int64)
            rel = where[done:upto] - lo
            out[order[done:upto]] = total + np.where(rel > 0, csum[np.maximum(rel - 1, 0)], 0)
            total += int(csum[-1])
            done = upto
        else:
            total += int(np.sum(chunk, dtype=np.int64))
    out[order[done:]] = total  # indices == len(mask)
    return out


def _chunk(array: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """``array[lo:hi]``; of a memory-mapped ``.npy`` file, read with a plain read: pages touched
    through a map stay in the process's resident memory (as file pages) for as long as the map
    lives, and a whole mask read that way would add its size to the peak."""
    # Only the map itself: a slice of it keeps the map's offset, not its own.
    if isinstance(array, np.memmap) and array.filename and isinstance(array.base, mmap.mmap):
        return np.fromfile(
            array.filename,
            dtype=array.dtype,
            count=hi - lo,
            offset=array.offset + lo * array.itemsize,
        )
    return np.asarray(array[lo:hi])


def overlength_summary(stats: DatasetStats) -> str:
    """One line of what the overlength policy and packing did (what ``longtune validate`` shows
    per file), for the training log.

    Args:
        stats: a packed dataset's statistics.

    Returns:
        e.g. ``"48 examples in 1 file(s): 3 over the 96-token context (3 truncated, 0 dropped,
        0 split), 0 dropped with no supervised token; 24 packed sequences, 12.3% padding"``.
    """
    files = stats.files
    over = sum(f.overlength for f in files)
    truncated, dropped, split = (
        sum(getattr(f, k) for f in files) for k in ("truncated", "dropped", "split")
    )
    return (
        f"{sum(f.examples for f in files)} examples in {len(files)} file(s): {over} over the "
        f"{stats.context_length}-token context ({truncated} truncated, {dropped} dropped, "
        f"{split} split; overlength={stats.overlength}), "
        f"{sum(f.dropped_unsupervised for f in files)} dropped with no supervised token; "
        f"{stats.packed_sequences} packed sequences, {100 * stats.padding_fraction:.1f}% padding"
    )


def _nothing_usable(files: list[FileStats], context_length: int, overlength: str) -> str:
    """Why no document is usable, and the setting that would keep them (one line)."""
    examples = sum(f.examples for f in files)
    over = sum(f.overlength for f in files)
    unsupervised = sum(f.dropped_unsupervised for f in files)
    longest = max((f.token_max for f in files), default=0)
    keep = (
        "overlength=split keeps them as context-length pieces (every target kept), or raise "
        f"context_length to {longest} (the longest example)"
    )
    if over and overlength == "drop":
        why = (
            f"overlength=drop dropped the {over} of {examples} example(s) longer than the "
            f"{context_length}-token context"
        )
        keep = f"overlength=truncate keeps their first {context_length} tokens, " + keep
    elif over and overlength == "truncate":
        why = (
            f"truncating the {over} of {examples} example(s) longer than the {context_length}-"
            "token context to their first tokens cut off every supervised (assistant) token"
        )
        unsupervised -= over  # counted in both
    else:
        return (
            f"no usable document: none of the {examples} example(s) has a supervised token "
            f"(context_length={context_length}, overlength={overlength}); check loss_on "
            "and the chat template"
        )
    others = f"; {unsupervised} other(s) had no supervised token" if unsupervised else ""
    return f"no usable document: {why}{others}; {keep}"


class PackedDataset:
    """Packed sequences over cached token stores; ``ds[i]`` builds sequence ``i``.

    Args:
        stores: the token stores (one per data file).
        context_length: tokens per packed sequence.
        pad_id: token id for padding.
        overlength: ``truncate`` (keep the first ``context_length`` tokens), ``drop``, or
            ``split`` (cut into context-length pieces).
    """

    def __init__(
        self,
        stores: list[TokenStore],
        context_length: int,
        pad_id: int,
        overlength: str = "truncate",
    ) -> None:
        if overlength not in OVERLENGTH:
            raise ValueError(f"overlength={overlength!r} is not one of {OVERLENGTH}")
        if context_length < 2:
            raise ValueError(f"context_length={context_length} must be at least 2")
        self.stores = stores
        self.context_length = context_length
        self.pad_id = pad_id
        self.overlength = overlength
        store_idx, doc_idx, starts, lengths, file_stats = [], [], [], [], []
        for s, store in enumerate(stores):
            docs, start, lens, stats = _usable_docs(store, context_length, overlength)
            # Per-file packing, for the per-file statistics only.
            n_seq = len(pack_lengths(lens, context_length)) if len(lens) else 0
            stats.packed_sequences = n_seq
            stats.padding_fraction = float(1.0 - lens.sum() / max(n_seq * context_length, 1))
            file_stats.append(stats)
            store_idx.append(np.full(len(docs), s, dtype=np.int64))
            doc_idx.append(docs)
            starts.append(start)
            lengths.append(lens)
        self.doc_store = np.concatenate(store_idx) if stores else np.zeros(0, np.int64)
        self.doc_index = np.concatenate(doc_idx) if stores else np.zeros(0, np.int64)
        self.doc_start = np.concatenate(starts) if stores else np.zeros(0, np.int64)
        self.doc_length = np.concatenate(lengths) if stores else np.zeros(0, np.int64)
        if len(self.doc_length) == 0:
            raise ValueError(_nothing_usable(file_stats, context_length, overlength))
        self.bins = pack_lengths(self.doc_length, context_length)
        total = int(self.doc_length.sum())
        self.stats = DatasetStats(
            files=file_stats,
            documents=len(self.doc_length),
            tokens=total,
            supervised_tokens=sum(f.supervised_tokens for f in file_stats),
            packed_sequences=len(self.bins),
            padding_fraction=1.0 - total / (len(self.bins) * context_length),
            context_length=context_length,
            overlength=overlength,
        )

    def __len__(self) -> int:
        return len(self.bins)

    def document(self, d: int) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and target mask of usable document (or piece) ``d``."""
        store = self.stores[self.doc_store[d]]
        start = int(store.offsets[self.doc_index[d]]) + int(self.doc_start[d])
        n = int(self.doc_length[d])
        return store.ids[start : start + n], store.mask[start : start + n]

    def source(self, i: int) -> list[str]:
        """``file:line`` of every document in packed sequence ``i`` (for error messages)."""
        out = []
        for d in self.bins[i]:
            store = self.stores[self.doc_store[d]]
            out.append(store.where(int(self.doc_index[d])))
        return out

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        """Packed sequence ``i``: ``input_ids``, ``labels``, ``position_ids``, ``cu_seqlens``,
        ``num_docs`` (segments after the first ``num_docs`` are padding)."""
        if not 0 <= i < len(self.bins):
            raise IndexError(f"sequence {i} out of range for {len(self.bins)} packed sequences")
        docs = [self.document(d) for d in self.bins[i]]
        item = pack_sequence(docs, self.context_length, self.pad_id)
        item["num_docs"] = np.asarray(len(docs))
        return item


def build_packed_dataset(
    paths: list[str],
    tokenizer_dir: str | os.PathLike,
    task_type: str,
    context_length: int,
    *,
    loss_on: str = "all_assistant",
    overlength: str = "truncate",
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    data_format: str = "auto",
    columns: Mapping[str, str] | None = None,
    tokenize_processes: int = 0,
) -> PackedDataset:
    """Validate, tokenize (cached) and pack data files.

    Validation runs first and raises before the tokenizer is loaded.

    Args:
        paths: data files or folders.
        tokenizer_dir: HF folder with the tokenizer files and chat template.
        task_type: ``chat``, ``instruction`` or ``text``.
        context_length: tokens per packed sequence.
        loss_on: ``all_assistant`` or ``last_assistant``.
        overlength: ``truncate`` or ``drop`` examples longer than ``context_length``.
        seed: unused by packing (best-fit decreasing is deterministic); the loader shuffles.
        cache_dir: token store folder (default ``~/.cache/longtune/tokens``).
        data_format: ``data.format`` (``auto``: each file's own).
        columns: ``data.columns`` (canonical name -> the file's column).
        tokenize_processes: processes to tokenize a file in (0: auto).

    Returns:
        The packed dataset.

    Raises:
        DataValidationError: the first broken rule (file, line, rule).
    """
    del seed
    if overlength not in OVERLENGTH:
        raise ValueError(f"overlength={overlength!r} is not one of {OVERLENGTH}")
    ignored: Counter = Counter()
    errors = validate_files(
        paths, task_type, data_format=data_format, columns=columns, ignored=ignored
    )
    if errors:
        raise errors[0]
    if ignored:
        logger.info("data keys not read (ignored): %s", ignored_keys_summary(ignored))
    files = expand_paths(paths, task_type, data_format)
    stores = tokenize_files(
        files,
        tokenizer_dir,
        task_type,
        loss_on,
        cache_dir,
        data_format=data_format,
        columns=columns,
        processes=tokenize_processes,
    )
    return PackedDataset(stores, context_length, stores[0].pad_id, overlength)
