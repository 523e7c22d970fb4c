"""``longtune validate``: check data files and print what training would make of them."""

from __future__ import annotations

import sys

from longtune.data.packing import OVERLENGTH, PackedDataset
from longtune.data.tokenize import LOSS_ON, tokenize_files
from longtune.data.validation import DataValidationError, expand_paths, validate_files


def validate_command(
    data: list[str],
    model: str,
    task_type: str = "chat",
    context_length: int = 8192,
    overlength: str = "truncate",
    loss_on: str = "all_assistant",
    all_errors: bool = False,
    cache_dir: str | None = None,
) -> int:
    """Validate training data, then tokenize and pack it and print per-file statistics.

    Args:
        data: data files or folders (JSONL; ``.txt`` files for ``text``).
        model: HF model folder whose tokenizer and chat template are used.
        task_type: ``chat``, ``instruction`` or ``text``.
        context_length: tokens per packed sequence.
        overlength: what to do with examples longer than the context: ``truncate``, ``drop``
            or ``split`` (into context-length pieces).
        loss_on: supervise ``all_assistant`` turns or the ``last_assistant`` turn only.
        all_errors: list every invalid line instead of stopping at the first.
        cache_dir: token store folder (default ``~/.cache/longtune/tokens``).

    Returns:
        0 when the data is valid and usable, 1 otherwise.
    """
    if overlength not in OVERLENGTH:
        print(f"error: overlength={overlength!r} is not one of {OVERLENGTH}", file=sys.stderr)
        return 1
    if loss_on not in LOSS_ON:
        print(f"error: loss_on={loss_on!r} is not one of {LOSS_ON}", file=sys.stderr)
        return 1
    errors = validate_files(data, task_type, all_errors=all_errors)
    for e in errors:
        print(f"error: {e}", file=sys.stderr)
    if errors:
        print(f"{len(errors)} error(s); nothing was tokenized", file=sys.stderr)
        return 1
    files = expand_paths(data, task_type)
    try:
        stores = tokenize_files(files, model, task_type, loss_on, cache_dir)
    except DataValidationError as e:  # template-level problems found while rendering
        print(f"error: {e}", file=sys.stderr)
        return 1
    ds = PackedDataset(stores, context_length, stores[0].pad_id, overlength)
    action = {
        "truncate": "truncated to the context",
        "drop": "dropped",
        "split": "split into context-length pieces",
    }[overlength]
    for f in ds.stats.files:
        print(f"{f.file}")
        print(f"  examples            {f.examples}")
        print(
            f"  tokens              min {f.token_min}  median {f.token_median:g}  "
            f"p95 {f.token_p95:g}  max {f.token_max}  (kept total {f.tokens})"
        )
        print(f"  supervised tokens   {f.supervised_tokens}")
        print(
            f"  over {context_length:<14} {f.overlength} ({overlength}: "
            f"{ {'truncate': f.truncated, 'drop': f.dropped, 'split': f.split}[overlength] } "
            f"{action})"
        )
        if f.dropped_unsupervised:
            print(f"  dropped             {f.dropped_unsupervised} with no supervised token left")
        print(f"  packed sequences    {f.packed_sequences}")
        print(f"  padding fraction    {f.padding_fraction:.4f}")
    s = ds.stats
    print(
        f"total: {s.documents} documents, {s.tokens} tokens ({s.supervised_tokens} supervised) "
        f"in {s.packed_sequences} packed sequences of {context_length}; "
        f"padding fraction {s.padding_fraction:.4f}"
    )
    return 0
