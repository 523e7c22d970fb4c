"""Reading data files of every format into rows: the one place that knows files.

A *row* is one example as the file holds it (a JSON object, a parquet or Arrow row as a dict),
before its shape is read (:mod:`longtune.data.validation` does that). Where a row is found is
its position: the 1-based **line** of a JSONL file (and line 1 of a ``.txt`` file), or the
0-based **row** index of a JSON array, a parquet file, an Arrow file or a ``datasets`` folder
(``dataset[N]``). Errors say which: ``data.jsonl:17: rule: ...`` or
``data.parquet: row 17: rule: ...``.

Formats (``data.format``; ``auto`` detects each file's, the others force one):

- ``jsonl``: one JSON object per line, ``.jsonl`` (and ``.json`` whose first non-space byte is
  not ``[``).
- ``json``: a ``.json`` file holding one JSON array of objects (first non-space byte ``[``),
  read element by element, never whole.
- JSON of both kinds may be compressed: gzip (``.jsonl.gz``, ``.json.gz``) or zstandard
  (``.jsonl.zst``, ``.json.zst``); the compression is read from the file's first bytes.
- ``parquet``: ``.parquet``, read batch by batch (``ParquetFile.iter_batches``).
- ``arrow``: a folder written by ``datasets``' ``save_to_disk`` (``dataset_info.json``,
  ``state.json`` and ``*.arrow``; one dataset, never loose Arrow files) or one ``.arrow`` file,
  read through ``datasets`` (``load_from_disk``, ``Dataset.from_file``: memory-mapped) batch by
  batch. A ``DatasetDict`` folder (``dataset_dict.json``) is refused: name one split's folder.
- ``text``: a ``.txt`` file is one document (``task_type=text`` only).

In parquet and Arrow data a missing value is stored as null (a column, or a field of a struct,
that only some rows have): a null is read as an absent key, at every depth.
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import io
import json
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

FORMATS = ("auto", "jsonl", "json", "parquet", "arrow", "text")
"""The values of ``data.format``."""
JSON_SUFFIXES = (".jsonl", ".json")
COMPRESSED_SUFFIXES = (".gz", ".zst")
SUFFIXES = {
    "jsonl": tuple(s + c for s in JSON_SUFFIXES for c in ("", *COMPRESSED_SUFFIXES)),
    "parquet": (".parquet",),
    "arrow": (".arrow",),
    "text": (".txt",),
}
SUFFIXES["json"] = SUFFIXES["jsonl"]
ROW_KINDS = ("json", "parquet", "arrow", "datasets")
"""Kinds of file whose examples are counted in rows from 0 (the others: lines from 1)."""
MAX_EXAMPLE_BYTES = 8 * 2**20
"""Largest example (a JSONL line, a ``.txt`` file, a row's text): 8 MiB, about two million
tokens."""
BATCH_ROWS = 256
"""Rows per parquet / Arrow batch read: bounds the memory of a reader."""
_CHUNK = 1 << 20
_CUT_TAIL = 8
"""A JSON error this close to the end of the text read so far may be a value the chunk's end
cut (``tr`` of ``true``, ``-`` of a number): read on before calling it an error."""
_ZSTD_SLICE = 1 << 10
"""Compressed bytes decompressed at a time: zstandard's output has no size limit per call (a
1 KiB slice of a 10,000:1 file holds about 10 MiB)."""
_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


class DataValidationError(ValueError):
    """One broken rule in one example of one data file.

    Reads ``file:line: rule: detail`` (JSONL, text), ``file: row N: rule: detail`` (JSON
    arrays, parquet, Arrow, ``datasets`` folders; N counts from 0) or ``file: rule: detail`` for
    a whole-file problem.

    Attributes:
        file: the file (as given or expanded from a folder).
        line: 1-based line number, or the 0-based row index when ``row``; 0 (and not ``row``)
            for a whole-file problem.
        rule: short rule name, e.g. ``"invalid-json"`` or ``"roles-not-alternating"``.
        detail: what was found and how to fix it.
        row: True when ``line`` is a row index.
    """

    def __init__(self, file: str, line: int, rule: str, detail: str, row: bool = False) -> None:
        self.file = str(file)
        self.line = line
        self.rule = rule
        self.detail = detail
        self.row = row
        super().__init__(f"{where(self.file, line, row)}: {rule}: {detail}")

    def __reduce__(self) -> tuple:  # raised in a tokenizing process, re-raised in this one
        return (type(self), (self.file, self.line, self.rule, self.detail, self.row))


def where(file: str, line: int, row: bool = False) -> str:
    """``file:line``, ``file: row N`` or ``file`` (line 0: the whole file)."""
    if row:
        return f"{file}: row {line}"
    return f"{file}:{line}" if line > 0 else file


def too_large(file: str, line: int, size: int, row: bool = False) -> DataValidationError:
    return DataValidationError(
        file,
        line,
        "example-too-large",
        f"{size / 2**20:.1f} MiB in one example; at most {MAX_EXAMPLE_BYTES // 2**20} MiB "
        "(about two million tokens) — split it into several examples",
        row,
    )


def is_dataset_folder(path: str | Path) -> bool:
    """A folder written by ``datasets``' ``Dataset.save_to_disk``."""
    p = Path(path)
    return (p / "state.json").is_file() and (p / "dataset_info.json").is_file()


def is_dataset_dict_folder(path: str | Path) -> bool:
    """A folder written by ``datasets``' ``DatasetDict.save_to_disk`` (one folder per split)."""
    return (Path(path) / "dataset_dict.json").is_file()


def dataset_dict_error(path: str | Path) -> DataValidationError:
    splits = sorted(p.name for p in Path(path).iterdir() if is_dataset_folder(p))
    example = f", e.g. {Path(path) / splits[0]}" if splits else ""
    return DataValidationError(
        str(path),
        0,
        "dataset-dict",
        f"a DatasetDict folder with splits {splits}; name the folder of one split{example}",
    )


def check_format(data_format: str, task_type: str) -> None:
    """Raise ``ValueError`` for a ``data.format`` that is not one of :data:`FORMATS`, or
    ``text`` (plain-text documents) for a task type other than ``text``."""
    if data_format not in FORMATS:
        raise ValueError(f"data.format={data_format!r} is not one of {', '.join(FORMATS)}")
    if data_format == "text" and task_type != "text":
        raise ValueError(
            f"data.format='text' reads .txt files as documents, which only task_type 'text' "
            f"trains on (task_type is {task_type!r})"
        )


def folder_suffixes(data_format: str, task_type: str) -> tuple[str, ...]:
    """The file names a data folder yields for ``data.format`` (``auto``: every format's;
    ``.txt`` only for ``task_type=text``)."""
    if data_format != "auto":
        return SUFFIXES[data_format]
    text = SUFFIXES["text"] if task_type == "text" else ()
    return SUFFIXES["jsonl"] + SUFFIXES["parquet"] + SUFFIXES["arrow"] + text


def has_suffix(name: str, suffixes: tuple[str, ...]) -> bool:
    return any(name.endswith(s) for s in suffixes)


def check_file_name(file: str, data_format: str, task_type: str) -> None:
    """Refuse a file named explicitly whose suffix no format reads (``auto`` only: a forced
    ``data.format`` reads whatever the file is called).

    Raises:
        DataValidationError: ``unsupported-file-type``, naming the suffixes read.
    """
    if data_format != "auto" or Path(file).is_dir():
        return
    suffixes = folder_suffixes("auto", task_type)
    if not has_suffix(Path(file).name, suffixes):
        raise DataValidationError(
            file,
            0,
            "unsupported-file-type",
            f"suffix {''.join(Path(file).suffixes[-2:])!r} is not one of {suffixes} for task "
            f"type {task_type!r}; set data.format to read it as one of {FORMATS[1:]}",
        )


def file_kind(file: str, data_format: str = "auto") -> str:
    """How to read ``file``: ``jsonl``, ``json`` (an array), ``parquet``, ``arrow`` (a file),
    ``datasets`` (a ``save_to_disk`` folder) or ``text``.

    ``auto`` decides from the name, and for ``.json`` from the first non-space byte (``[``: an
    array); a forced ``data.format`` is taken as it is (``arrow`` for a folder: ``datasets``).
    """
    if Path(file).is_dir():
        return "datasets"
    if data_format != "auto":
        return data_format
    name = Path(file).name
    for kind in ("parquet", "arrow", "text"):
        if has_suffix(name, SUFFIXES[kind]):
            return kind
    if has_suffix(name, tuple(".json" + c for c in ("", *COMPRESSED_SUFFIXES))):
        return "json" if _first_byte(file) == b"[" else "jsonl"
    return "jsonl"


def is_compressed(file: str) -> bool:
    """The file starts with gzip's or zstandard's magic bytes."""
    with open(file, "rb") as f:
        magic = f.read(4)
    return magic.startswith(_GZIP_MAGIC) or magic == _ZSTD_MAGIC


def data_size(path: str) -> int:
    """Bytes of a data file, or of every file in a ``datasets`` folder."""
    p = Path(path)
    if p.is_dir():
        return sum(f.stat().st_size for f in sorted(p.rglob("*")) if f.is_file())
    return p.stat().st_size


def fingerprint(path: str) -> str:
    """SHA-256 of a data file's content; of a ``datasets`` folder, of each file's relative name
    and content, in sorted order."""
    p = Path(path)
    if not p.is_dir():
        with open(p, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    digest = hashlib.sha256()
    for f in sorted(q for q in p.rglob("*") if q.is_file()):
        digest.update(f.relative_to(p).as_posix().encode() + b"\0")
        with open(f, "rb") as fh:
            digest.update(hashlib.file_digest(fh, "sha256").digest())
    return digest.hexdigest()


def read_rows(file: str, kind: str) -> Iterator[tuple[int, Any]]:
    """The rows of a file as ``(position, value)``: the decoded JSON value (or dict of a row),
    or the :class:`DataValidationError` of a row that cannot be decoded (bad JSON, bad UTF-8).

    Args:
        file: the data file or ``datasets`` folder.
        kind: from :func:`file_kind`.

    Yields:
        ``(line, value)`` for ``jsonl`` and ``text`` (the whole ``.txt`` file as one string),
        ``(row, value)`` for the other kinds.

    Raises:
        DataValidationError: a problem that ends the reading: a line or JSON element over
            :data:`MAX_EXAMPLE_BYTES`, a damaged compressed stream, an unreadable parquet or
            Arrow file.
    """
    readers = {
        "jsonl": _jsonl_rows,
        "json": _json_array_rows,
        "parquet": _parquet_rows,
        "arrow": _arrow_rows,
        "datasets": _arrow_rows,
        "text": _text_rows,
    }
    yield from readers[kind](file)


# ---------------------------------------------------------------------------------------------
# JSON: lines, arrays, compressed
# ---------------------------------------------------------------------------------------------


def _open(file: str) -> BinaryIO:
    """``file`` opened for binary reading, decompressed when its first bytes say gzip or
    zstandard."""
    with open(file, "rb") as f:
        magic = f.read(4)
    if magic.startswith(_GZIP_MAGIC):
        return gzip.open(file, "rb")  # type: ignore[return-value]
    if magic == _ZSTD_MAGIC:
        return io.BufferedReader(_ZstdFrames(file), _CHUNK)
    return open(file, "rb")


class _ZstdFrames(io.RawIOBase):
    """A zstandard file decompressed frame after frame, that raises ``EOFError`` when the file
    ends inside a frame (``zstandard``'s own stream reader ends quietly there: a file cut short
    would read as a shorter dataset)."""

    def __init__(self, file: str) -> None:
        import zstandard

        self._new = zstandard.ZstdDecompressor().decompressobj
        self._f = open(file, "rb")  # noqa: SIM115 (closed by close())
        self._d = self._new()
        self._ended = True  # at a frame boundary: where the file may end
        self._out, self._pos = b"", 0
        self._in = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while self._pos == len(self._out):
            if not self._in:
                self._in = self._f.read(_CHUNK)
                if not self._in:
                    if not self._ended:
                        raise EOFError("the file ends inside a zstandard frame")
                    return 0
            piece, self._in = self._in[:_ZSTD_SLICE], self._in[_ZSTD_SLICE:]
            out = [self._d.decompress(piece)]
            while self._d.eof:  # a frame ended in this piece: the rest starts the next one
                rest = self._d.unused_data
                self._d = self._new()
                self._ended = True
                if not rest:
                    break
                out.append(self._d.decompress(rest))
            else:
                self._ended = False
            self._out, self._pos = b"".join(out), 0
        n = min(len(buffer), len(self._out) - self._pos)
        buffer[:n] = self._out[self._pos : self._pos + n]
        self._pos += n
        return n

    def close(self) -> None:
        self._f.close()
        super().close()


def _damaged(file: str, e: Exception) -> DataValidationError:
    return DataValidationError(
        file,
        0,
        "damaged-file",
        f"the compressed data cannot be read to its end ({type(e).__name__}: {e}); "
        "was the file cut short? compress it again",
    )


def _decompression_errors() -> tuple[type[Exception], ...]:
    errors: tuple[type[Exception], ...] = (gzip.BadGzipFile, EOFError, zlib.error)
    try:
        import zstandard
    except ImportError:
        return errors
    return (*errors, zstandard.ZstdError)


def _first_byte(file: str) -> bytes:
    """The first non-space byte of a (possibly compressed) file; empty for an empty file."""
    try:
        with _open(file) as f:
            while chunk := f.read(4096):
                stripped = chunk.lstrip(b" \t\r\n\xef\xbb\xbf")
                if stripped:
                    return stripped[:1]
    except _decompression_errors() as e:
        raise _damaged(file, e) from None
    return b""


def lines(f: BinaryIO, file: str) -> Iterator[tuple[int, bytes]]:
    """``(line number, line)`` of a binary file, never holding more than one allowed line.

    Raises:
        DataValidationError: ``example-too-large`` for a line over :data:`MAX_EXAMPLE_BYTES`.
    """
    line_no = 0
    while raw := f.readline(MAX_EXAMPLE_BYTES + 1):
        line_no += 1
        if len(raw) > MAX_EXAMPLE_BYTES and not raw.endswith(b"\n"):
            size = len(raw)
            while not raw.endswith(b"\n") and (raw := f.readline(1 << 20)):
                size += len(raw)
            raise too_large(file, line_no, size)
        yield line_no, raw


def _jsonl_rows(file: str) -> Iterator[tuple[int, Any]]:
    try:
        with _open(file) as f:
            for line_no, raw in lines(f, file):
                if raw.strip():
                    yield line_no, _parse_line(file, line_no, raw)
    except _decompression_errors() as e:
        raise _damaged(file, e) from None


def _parse_line(file: str, line_no: int, raw: bytes) -> Any:
    """The JSON value of one line, or the error that names why it has none."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return DataValidationError(
            file, line_no, "invalid-utf8", f"column {e.start + 1} is not UTF-8 ({e.reason})"
        )
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        end = len(line.rstrip())
        if e.pos >= end or e.msg.startswith("Unterminated"):
            detail = (
                f"the line ends at column {end} before its JSON value is complete "
                "(was the file cut short?)"
            )
        else:
            detail = f"{e.msg} at column {e.colno}"
        return DataValidationError(file, line_no, "invalid-json", detail)
    except RecursionError:
        return _too_deep(file, line_no, row=False)


def _too_deep(file: str, line: int, row: bool) -> DataValidationError:
    return DataValidationError(
        file,
        line,
        "too-deeply-nested",
        "the JSON nests objects/lists too deeply to read; an example is a flat list of messages",
        row,
    )


class _ArrayText:
    """The text of a JSON array file, decoded chunk by chunk: what is left of it is
    ``text[pos:]``, with more read on demand."""

    def __init__(self, f: BinaryIO, file: str) -> None:
        self.f, self.file = f, file
        self.decoder = codecs.getincrementaldecoder("utf-8")()
        self.text, self.pos, self.eof = "", 0, False

    def more(self, row: int) -> bool:
        """Read the next chunk; False at the end of the file."""
        if self.eof:
            return False
        chunk = self.f.read(_CHUNK)
        self.eof = not chunk
        try:
            new = self.decoder.decode(chunk, final=self.eof)
        except UnicodeDecodeError as e:
            raise DataValidationError(
                self.file, row, "invalid-utf8", f"not UTF-8 ({e.reason})", row=True
            ) from None
        self.text = self.text[self.pos :] + new
        self.pos = 0
        return bool(chunk)

    def peek(self, row: int) -> str:
        """The next non-space character (consumed up to it), or ``""`` at the end."""
        while True:
            while self.pos < len(self.text) and self.text[self.pos] in " \t\r\n\ufeff":
                self.pos += 1
            if self.pos < len(self.text):
                return self.text[self.pos]
            if not self.more(row):
                return ""


def _json_array_rows(file: str) -> Iterator[tuple[int, Any]]:
    try:
        with _open(file) as f:
            yield from _array_elements(_ArrayText(f, file), file)
    except _decompression_errors() as e:
        raise _damaged(file, e) from None


def _array_elements(src: _ArrayText, file: str) -> Iterator[tuple[int, Any]]:
    """Each element of a JSON array, decoded one at a time (at most one example's text and
    one chunk held)."""
    decoder = json.JSONDecoder()
    if src.peek(0) != "[":
        raise DataValidationError(
            file,
            0,
            "invalid-json",
            "a JSON array file must start with '['; for one object per line use .jsonl "
            "(or data.format=jsonl)",
        )
    src.pos += 1
    row = 0
    if src.peek(row) == "]":
        src.pos += 1
    else:
        while True:
            src.peek(row)
            error: json.JSONDecodeError | None = None
            try:
                value, end = decoder.raw_decode(src.text, src.pos)
                complete = end < len(src.text) or src.eof
            except json.JSONDecodeError as e:
                if len(src.text) - e.pos > _CUT_TAIL and not e.msg.startswith("Unterminated"):
                    # Broken inside what has been read, not cut by the chunk's end: say where.
                    raise DataValidationError(
                        file, row, "invalid-json", _array_error(e, src), row=True
                    ) from None
                complete, error = False, e
            except RecursionError:
                raise _too_deep(file, row, row=True) from None
            if not complete:  # the element goes on in the next chunk, or is broken
                if len(src.text) - src.pos > MAX_EXAMPLE_BYTES:
                    raise too_large(file, row, len(src.text) - src.pos, row=True)
                if src.more(row):
                    continue
                if error is not None:
                    raise DataValidationError(
                        file, row, "invalid-json", _array_error(error, src), row=True
                    )
            yield row, value
            src.pos = end
            row += 1
            after = src.peek(row)
            if after == "]":
                src.pos += 1
                break
            if after != ",":
                found = repr(after) if after else "the end of the file"
                raise DataValidationError(
                    file,
                    row,
                    "invalid-json",
                    f"expected ',' or ']' after row {row - 1}, found {found} "
                    "(was the file cut short?)",
                    row=True,
                )
            src.pos += 1
    if src.peek(row):
        raise DataValidationError(
            file, 0, "invalid-json", "text after the closing ']' of the array"
        )


def _array_error(e: json.JSONDecodeError, src: _ArrayText) -> str:
    if e.pos >= len(src.text.rstrip()) or e.msg.startswith("Unterminated"):
        return "the file ends before this element is complete (was the file cut short?)"
    return f"{e.msg} (character {e.pos - src.pos + 1} of the element)"


# ---------------------------------------------------------------------------------------------
# Columnar: parquet, Arrow, datasets
# ---------------------------------------------------------------------------------------------


def _row(file: str, row: int, value: Any) -> Any:
    """A columnar row without its nulls, or the ``example-too-large`` error of a row whose text
    is over :data:`MAX_EXAMPLE_BYTES` (the row is read; its tokenization would not be)."""
    value = _without_nulls(value)
    size = _text_size(value)
    return too_large(file, row, size, row=True) if size > MAX_EXAMPLE_BYTES else value


def _text_size(value: Any) -> int:
    """Characters of every string (and bytes) in a row, at every depth."""
    if isinstance(value, str | bytes):
        return len(value)
    if isinstance(value, dict):
        return sum(_text_size(v) for v in value.values())
    if isinstance(value, list):
        return sum(_text_size(v) for v in value)
    return 0


def _without_nulls(value: Any) -> Any:
    """A row with its null values dropped, at every depth (a missing key in columnar data)."""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def _unreadable(file: str, what: str, e: Exception) -> DataValidationError:
    reason = " ".join(str(e).split())
    return DataValidationError(
        file, 0, "unreadable-file", f"not a readable {what} ({type(e).__name__}: {reason})"
    )


def _parquet_rows(file: str) -> Iterator[tuple[int, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    row = 0
    try:
        batches = pq.ParquetFile(file).iter_batches(batch_size=BATCH_ROWS)
        for batch in batches:
            for value in batch.to_pylist():
                yield row, _row(file, row, value)
                row += 1
    except (pa.ArrowException, OSError) as e:
        raise _unreadable(file, "parquet file", e) from None


def _arrow_rows(file: str) -> Iterator[tuple[int, Any]]:
    import datasets
    import pyarrow as pa

    datasets.disable_progress_bars()  # a progress bar per folder opened is noise here
    row = 0
    try:
        if Path(file).is_dir():
            ds = datasets.load_from_disk(file)
            if isinstance(ds, datasets.DatasetDict):
                raise dataset_dict_error(file)
        else:
            ds = datasets.Dataset.from_file(file)
        for batch in ds.iter(batch_size=BATCH_ROWS):
            names = list(batch)
            for values in zip(*(batch[n] for n in names), strict=True):
                yield row, _row(file, row, dict(zip(names, values, strict=True)))
                row += 1
    except (pa.ArrowException, OSError, ValueError, KeyError) as e:
        if isinstance(e, DataValidationError):
            raise
        what = "datasets folder (save_to_disk)" if Path(file).is_dir() else "Arrow file"
        raise _unreadable(file, what, e) from None


# ---------------------------------------------------------------------------------------------
# Plain text
# ---------------------------------------------------------------------------------------------


def _text_rows(file: str) -> Iterator[tuple[int, Any]]:
    size = Path(file).stat().st_size
    if size > MAX_EXAMPLE_BYTES:
        raise too_large(file, 1, size)
    raw = Path(file).read_bytes()
    try:
        yield 1, raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        yield (
            1,
            DataValidationError(
                file,
                line,
                "invalid-utf8",
                f"byte {e.start} is not UTF-8 ({e.reason}); re-encode as UTF-8",
            ),
        )
