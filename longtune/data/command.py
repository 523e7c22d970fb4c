"""``longtune validate``: check data files and report what training would make of them.

:func:`check_data` does the work and returns a :class:`DataReport` (errors with file and line,
per-file token statistics, and optionally a few examples rendered with their loss mask, which
the web UI shows before a launch); :func:`print_report` prints it as ``longtune validate`` does;
:func:`validate_command` is the two together.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

from longtune.data.formats import check_format
from longtune.data.packing import OVERLENGTH, DatasetStats, PackedDataset
from longtune.data.tokenize import LOSS_ON, load_tokenizer, tokenize_files
from longtune.data.validation import (
    DataValidationError,
    expand_paths,
    parse_columns,
    validate_files,
)

#: Longest example shown whole in a preview; longer ones keep their head and tail.
PREVIEW_MAX_TOKENS = 1500
PREVIEW_HEAD_TOKENS = 300


@dataclass
class Segment:
    """A run of consecutive tokens of a previewed example."""

    text: str
    """The tokens decoded (special tokens kept), empty for an elision."""
    target: bool
    """True when these tokens carry loss (the model learns to produce them)."""
    skipped: int = 0
    """For an elision marker: how many tokens are not shown."""


@dataclass
class PreviewExample:
    """One training document (or context-length piece of one) as the trainer sees it."""

    source: str
    """``file:line`` of the example."""
    tokens: int
    target_tokens: int
    segments: list[Segment]


@dataclass
class DataReport:
    """What :func:`check_data` found."""

    errors: list[str] = field(default_factory=list)
    """One line per problem; ``file:line: rule: detail`` for data errors (``file: rule: detail``
    for a problem of the whole file)."""
    stage: str | None = None
    """Where checking stopped: ``settings``, ``lines`` (line validation; nothing tokenized) or
    ``template`` (found while rendering); None when the data is usable."""
    stats: DatasetStats | None = None
    examples: list[PreviewExample] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


def check_data(
    data: list[str],
    model: str,
    task_type: str = "chat",
    context_length: int = 8192,
    overlength: str = "truncate",
    loss_on: str = "all_assistant",
    all_errors: bool = False,
    cache_dir: str | None = None,
    preview: int = 0,
    data_format: str = "auto",
    columns: dict[str, str] | None = None,
) -> DataReport:
    """Validate training data, then tokenize and pack it and collect statistics.

    Args:
        data: data files or folders (any format of :mod:`longtune.data.formats`).
        model: HF model folder whose tokenizer and chat template are used.
        task_type: ``chat``, ``instruction`` or ``text``.
        context_length: tokens per packed sequence.
        overlength: what to do with examples longer than the context: ``truncate``, ``drop``
            or ``split`` (into context-length pieces).
        loss_on: supervise ``all_assistant`` turns or the ``last_assistant`` turn only.
        all_errors: list every invalid line instead of stopping at the first.
        cache_dir: token store folder (default ``~/.cache/longtune/tokens``).
        preview: how many of the first usable examples to render with their loss mask.
        data_format: ``auto`` (each file's own) or a format to read every file as.
        columns: ``data.columns``: canonical name -> the file's column name.

    Returns:
        The report: errors (and the stage they stopped at), or statistics and previews.

    Raises:
        ValueError: no document is usable after the overlength policy (as ``longtune validate``
            has always reported it: as a command error).
    """
    if overlength not in OVERLENGTH:
        return DataReport([f"overlength={overlength!r} is not one of {OVERLENGTH}"], "settings")
    if loss_on not in LOSS_ON:
        return DataReport([f"loss_on={loss_on!r} is not one of {LOSS_ON}"], "settings")
    read = {"data_format": data_format, "columns": columns}
    try:
        check_format(data_format, task_type)
    except ValueError as e:
        return DataReport([str(e)], "settings")
    errors = validate_files(data, task_type, all_errors=all_errors, **read)
    if errors:
        return DataReport([str(e) for e in errors], "lines")
    files = expand_paths(data, task_type, data_format)
    tokenizer = load_tokenizer(model) if preview > 0 else None
    try:
        stores = tokenize_files(files, model, task_type, loss_on, cache_dir, tokenizer, **read)
    except DataValidationError as e:  # template-level problems found while rendering
        return DataReport([str(e)], "template")
    ds = PackedDataset(stores, context_length, stores[0].pad_id, overlength)
    examples = [_preview(ds, d, tokenizer) for d in range(min(preview, len(ds.doc_length)))]
    return DataReport(stats=ds.stats, examples=examples)


def _preview(ds: PackedDataset, d: int, tokenizer: Any) -> PreviewExample:
    """Usable document ``d`` of ``ds`` as runs of target / context tokens."""
    ids, mask = ds.document(d)
    # Token t is a target when mask[t] is set and a token precedes it (labels are shifted).
    target = [bool(m) and t > 0 for t, m in enumerate(mask)]
    shown = [(0, len(ids))]
    if len(ids) > PREVIEW_MAX_TOKENS:
        tail = PREVIEW_MAX_TOKENS - PREVIEW_HEAD_TOKENS
        shown = [(0, PREVIEW_HEAD_TOKENS), (len(ids) - tail, len(ids))]
    segments: list[Segment] = []
    for n, (lo, hi) in enumerate(shown):
        if n:
            segments.append(Segment("", False, skipped=lo - shown[n - 1][1]))
        start = lo
        for t in range(lo + 1, hi + 1):
            if t == hi or target[t] != target[start]:
                text = tokenizer.decode(ids[start:t].tolist(), skip_special_tokens=False)
                segments.append(Segment(text, target[start]))
                start = t
    store = ds.stores[ds.doc_store[d]]
    return PreviewExample(
        source=store.where(int(ds.doc_index[d])),
        tokens=len(ids),
        target_tokens=sum(target),
        segments=segments,
    )


def print_report(report: DataReport) -> int:
    """Print a report as ``longtune validate`` does: errors to stderr, statistics to stdout.

    Args:
        report: from :func:`check_data`.

    Returns:
        The command's exit code: 0 when the data is valid and usable, 2 otherwise (bad input,
        as for ``longtune train``).
    """
    for e in report.errors:
        print(f"error: {e}", file=sys.stderr)
    if report.stage == "lines" and len(report.errors) > 1:  # one error stays one line
        print(f"{len(report.errors)} errors; nothing was tokenized", file=sys.stderr)
    if not report.ok or report.stats is None:
        return 2
    s = report.stats
    action = {
        "truncate": "truncated to the context",
        "drop": "dropped",
        "split": "split into context-length pieces",
    }[s.overlength]
    for f in s.files:
        print(f"{f.file}")
        print(f"  examples            {f.examples}")
        print(
            f"  tokens              min {f.token_min}  median {f.token_median:g}  "
            f"p95 {f.token_p95:g}  max {f.token_max}  (kept total {f.tokens})"
        )
        print(f"  supervised tokens   {f.supervised_tokens}")
        print(
            f"  over {s.context_length:<14} {f.overlength} ({s.overlength}: "
            f"{ {'truncate': f.truncated, 'drop': f.dropped, 'split': f.split}[s.overlength] } "
            f"{action})"
        )
        if f.dropped_unsupervised:
            print(f"  dropped             {f.dropped_unsupervised} with no supervised token left")
        print(f"  packed sequences    {f.packed_sequences}")
        print(f"  padding fraction    {f.padding_fraction:.4f}")
    print(
        f"total: {s.documents} documents, {s.tokens} tokens ({s.supervised_tokens} supervised) "
        f"in {s.packed_sequences} packed sequences of {s.context_length}; "
        f"padding fraction {s.padding_fraction:.4f}"
    )
    return 0


def validate_command(
    data: list[str],
    model: str,
    task_type: str = "chat",
    context_length: int = 8192,
    overlength: str = "truncate",
    loss_on: str = "all_assistant",
    all_errors: bool = False,
    cache_dir: str | None = None,
    data_format: str = "auto",
    columns: str = "",
) -> int:
    """Validate training data, then tokenize and pack it and print per-file statistics.

    Args:
        data: data files or folders (any format of :mod:`longtune.data.formats`).
        model: HF model folder whose tokenizer and chat template are used.
        task_type: ``chat``, ``instruction`` or ``text``.
        context_length: tokens per packed sequence.
        overlength: ``truncate``, ``drop`` or ``split`` examples longer than the context.
        loss_on: supervise ``all_assistant`` turns or the ``last_assistant`` turn only.
        all_errors: list every invalid line instead of stopping at the first.
        cache_dir: token store folder (default ``~/.cache/longtune/tokens``).
        data_format: ``auto`` or a format to read every file as (``data.format``).
        columns: ``data.columns`` as ``NAME=COLUMN[,NAME=COLUMN...]``.

    Returns:
        0 when the data is valid and usable; 2 when it is not (an invalid line, a file that
        cannot be used, a template that refuses an example, or no usable document: the code
        ``longtune train`` gives bad data too).
    """
    try:
        mapping = parse_columns(columns)
    except ValueError as e:
        return print_report(DataReport([f"--columns: {e}"], "settings"))
    report = check_data(
        data,
        model,
        task_type,
        context_length,
        overlength,
        loss_on,
        all_errors,
        cache_dir,
        data_format=data_format,
        columns=mapping,
    )
    return print_report(report)
