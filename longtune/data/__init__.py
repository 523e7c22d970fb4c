"""The training-data path: read (every file format), validate, tokenize (cached), pack, mix,
load per rank.

Public API (the trainer and the CLI use only these names):

- :func:`validate_files`, :class:`DataValidationError` — structure checks, no tokenizer.
- :func:`build_packed_dataset` → :class:`PackedDataset` — tokenized, packed sequences.
- :class:`MixedDataset` — packed datasets sampled by weight (``data.mix``).
- :class:`PackedLoader` — deterministic, resumable micro-batches for one DP × SP rank.
- :func:`data_size` — bytes of a data file or ``datasets`` folder.
- :func:`check_data` → :class:`DataReport` (errors, statistics, loss-mask previews),
  :func:`print_report`, and :func:`validate_command` (the two: ``longtune validate``).
"""

from longtune.data.command import DataReport, check_data, print_report, validate_command
from longtune.data.formats import data_size
from longtune.data.loader import PackedLoader, pad_to_multiple
from longtune.data.mix import MixedDataset
from longtune.data.packing import (
    IGNORE_INDEX,
    DatasetStats,
    FileStats,
    PackedDataset,
    build_packed_dataset,
    overlength_summary,
    pack_lengths,
    pack_sequence,
)
from longtune.data.tokenize import Encoder, tokenize_files
from longtune.data.validation import DataValidationError, Record, iter_records, validate_files

__all__ = [
    "IGNORE_INDEX",
    "DataReport",
    "DataValidationError",
    "DatasetStats",
    "Encoder",
    "FileStats",
    "MixedDataset",
    "PackedDataset",
    "PackedLoader",
    "Record",
    "build_packed_dataset",
    "check_data",
    "data_size",
    "iter_records",
    "overlength_summary",
    "pack_lengths",
    "pack_sequence",
    "pad_to_multiple",
    "print_report",
    "tokenize_files",
    "validate_command",
    "validate_files",
]
