"""Tokenization with the model's own chat template, the loss mask, and a cached token store.

A document is stored as its token ids and a *target mask*: ``mask[t] == 1`` when token ``t``
is a token the model must learn to produce (assistant content and its end-of-turn token for
chat data, every token for text). Labels are derived from it exactly once, when a packed
sequence is built (:mod:`longtune.data.packing`): ``labels[t] = ids[t + 1] if mask[t + 1]``.

The assistant spans come from the rendered text, not from guessing token patterns: for each
supervised assistant turn ``i`` the template is rendered for ``messages[:i]`` with the
generation prompt; everything the model would write after that prompt — up to the end of the
message content and the special end-of-turn token right after it (``<|eot_id|>``,
``<|im_end|>``) — is supervised. An assistant turn that calls tools is supervised to the end of
the rendering of ``messages[:i + 1]`` (less trailing whitespace), so the calls are learnt in the
form the template writes them; a template that does not write the example's tools or calls is
refused (``tools-unsupported``) rather than trained on a conversation without them. Tokens
are marked from the fast tokenizer's character-to-token map, so the ids are exactly
``apply_chat_template``'s.

The token store of one data file is a folder of ``.npy`` arrays read with ``numpy`` memory
mapping; its name hashes the file content, the tokenizer files and the settings, so a second
run with nothing changed loads it instead of tokenizing. Its ``meta.json`` records each array's
dtype, shape and CRC32, checked every time the store is opened: a damaged store (a flipped
byte, a missing or cut file) is tokenized again, with one warning naming it, and never used.

The cache folder and each store carry the ``.longtune-output`` marker (kind ``cache``), so a
cache kept inside a data folder is skipped when that folder is expanded. A store is written to
a temporary sibling (``KEY.tmp-HOST-PID-XXXXXXXX``) and renamed into place; the temporaries of
a tokenization that was killed (a process of this host that no longer exists) are removed when
the next store is written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
import sys
import time
import uuid
import zlib
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from jinja2 import TemplateError

from longtune.data.formats import ROW_KINDS, data_size, file_kind, fingerprint, is_compressed, where
from longtune.data.validation import MAX_EXAMPLE_BYTES, DataValidationError, Record, iter_records
from longtune.fsutil import (
    OUTPUT_MARKER,
    OutputDirError,
    atomic_write_text,
    describe_os_error,
    is_longtune_output,
    pid_alive,
)
from longtune.model.checks import check_model_dir

logger = logging.getLogger(__name__)

LOSS_ON = ("all_assistant", "last_assistant")
STORE_VERSION = 2
"""Part of every store key: stores of another version are never opened (2: checksummed)."""
STORE_ARRAYS = ("ids", "mask", "offsets", "lines")
STORE_FILES = tuple(f"{name}.npy" for name in STORE_ARRAYS) + ("meta.json", OUTPUT_MARKER)
#: Files of a store being written (its arrays' raw bytes before they become ``.npy`` files).
_PARTIAL_FILES = tuple(f"{name}.raw" for name in STORE_ARRAYS)
"""Every file a store folder holds: what removing a store may delete, and nothing else."""
CACHE_KIND = "cache"
"""The ``kind`` in the marker of the cache folder and of each store."""
# The cache may be shared by several machines (a home folder on NFS): a temporary names its
# host, so a process is looked up only on the host that started it.
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
_CACHE_ENTRY = re.compile(r"[0-9a-f]{32}(\..+)?")
_TEMPORARY = re.compile(r"[0-9a-f]{32}\.(tmp|old)-([0-9a-f]{8})-(\d+)-[0-9a-f]{8}")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "added_tokens.json",
)
BATCH_SIZE = 512
WORKERS_MIN_BYTES = 64 * 2**20
"""Smallest data file that ``data.tokenize_processes=0`` (auto) tokenizes in several processes
(a smaller one is done before the processes would have started)."""
MAX_AUTO_WORKERS = 8
BATCH_CHARS = MAX_EXAMPLE_BYTES
"""Characters per tokenizer call (one example may reach it alone): bounds the memory used."""


def load_tokenizer(tokenizer_dir: str | os.PathLike) -> Any:
    """Load the fast tokenizer of an HF folder (``AutoTokenizer.from_pretrained``).

    Args:
        tokenizer_dir: an HF model or tokenizer folder.

    Returns:
        The tokenizer.

    Raises:
        ModelFolderError: no such local folder, or no tokenizer files in it.
        ValueError: the tokenizer is not a fast (Rust) tokenizer, which offsets need.
    """
    from transformers import AutoTokenizer

    # A missing folder would otherwise be looked up on the Hub.
    check_model_dir(tokenizer_dir, config=False, tokenizer=True)
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    if not tok.is_fast:
        raise ValueError(
            f"{tokenizer_dir}: the tokenizer is not a fast tokenizer ({type(tok).__name__}); "
            "add a tokenizer.json to the folder"
        )
    return tok


def tokenizer_fingerprint(tokenizer_dir: str | os.PathLike) -> str:
    """Hash of the tokenizer files of an HF folder (what the token store depends on)."""
    h = hashlib.sha256()
    for name in TOKENIZER_FILES:
        path = Path(tokenizer_dir) / name
        if path.is_file():
            h.update(name.encode())
            h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


def file_fingerprint(file: str | os.PathLike) -> str:
    """SHA-256 of a data file's content (of a ``datasets`` folder's files)."""
    return fingerprint(os.fspath(file))


class Encoder:
    """Turns validated records into (token ids, target mask) with the model's chat template.

    Args:
        tokenizer: an HF fast tokenizer (with a chat template for ``chat``/``instruction``).
        task_type: ``chat``, ``instruction`` or ``text``.
        loss_on: ``all_assistant`` (every assistant turn) or ``last_assistant`` (the last only).
    """

    def __init__(self, tokenizer: Any, task_type: str, loss_on: str = "all_assistant") -> None:
        if loss_on not in LOSS_ON:
            raise ValueError(f"loss_on={loss_on!r} is not one of {LOSS_ON}")
        if task_type != "text" and not tokenizer.chat_template:
            raise ValueError(
                f"task_type={task_type!r} needs a chat template, but the tokenizer has none; "
                "add chat_template.jinja to the model folder or use task_type='text'"
            )
        self.tokenizer = tokenizer
        self.task_type = task_type
        self.loss_on = loss_on
        # Longest first, so e.g. "<|eot_id|>" is not shadowed by a shorter token it contains.
        specials = {str(t) for t in tokenizer.added_tokens_encoder}
        self.special_tokens = sorted(specials, key=len, reverse=True)

    def _render(
        self, messages: list[dict[str, Any]], generation_prompt: bool, record: Record
    ) -> str:
        # Tools only when the example declares them: the call stays the one every text-only
        # example has always had.
        kwargs = {"tools": record.tools} if record.tools else {}
        try:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=generation_prompt, **kwargs
            )
        except TemplateError as e:  # the template's own raise_exception(), or a broken template
            raise record.error(
                "chat-template-error",
                f"the model's chat template refused this conversation: {e}",
            ) from None

    def render(self, record: Record) -> tuple[str, list[tuple[int, int]]]:
        """Render one chat record and find the character spans to supervise.

        A text-only assistant turn is supervised from the end of the generation prompt to the
        end of its content and the special token right after it. An assistant turn with
        ``tool_calls`` is supervised from the end of the generation prompt to the end of the
        turn: the rendering of ``messages[:i + 1]``, trailing whitespace removed (so its calls
        are supervised in whatever form the template writes them).

        Args:
            record: a validated chat or instruction record.

        Returns:
            The rendered text and the ``[start, end)`` character spans of supervised text.

        Raises:
            DataValidationError: the template raises on the conversation, or does not render it
                verbatim (drops a tool message or a tool, is not prefix-stable), named with the
                record's file and line.
        """
        messages = record.messages
        assert messages is not None
        full = self._render(messages, False, record)
        for i, m in enumerate(messages):
            if m["role"] == "tool" and m["content"].strip() not in full:
                raise record.error(
                    "tool-role-unsupported",
                    f"the chat template dropped messages[{i}] (role 'tool'); "
                    "remove tool messages or use a model whose template renders them",
                )
        for name in _tool_names(record):
            if name not in full:
                raise _tools_unsupported(
                    record, f"tool {name!r} is not in the rendered conversation"
                )
        # A template may write the calls and ignore the tool list (whose names the calls repeat).
        if record.tools and full == self._render(messages, False, replace(record, tools=None)):
            raise _tools_unsupported(record, "'tools' leaves the rendered conversation unchanged")
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if self.loss_on == "last_assistant":
            turns = turns[-1:]
        spans = []
        for i in turns:
            prompt = self._render(messages[:i], True, record)
            if not full.startswith(prompt):
                raise _not_prefix_stable(record, f"messages[:{i}] with the generation prompt")
            if "tool_calls" in messages[i]:
                spans.append(self._tool_call_span(record, i, full, len(prompt)))
                continue
            content = messages[i]["content"].strip()
            start = full.find(content, len(prompt))
            if start < 0:
                raise record.error(
                    "template-drops-content",
                    f"the content of messages[{i}] is not in the rendered conversation",
                )
            end = start + len(content)
            for token in self.special_tokens:
                if full.startswith(token, end):
                    end += len(token)
                    break
            spans.append((len(prompt), end))
        return full, spans

    def _tool_call_span(self, record: Record, i: int, full: str, start: int) -> tuple[int, int]:
        """``[start, end)`` of assistant turn ``i`` with tool calls: to the end of the rendering
        of ``messages[:i + 1]``, less trailing whitespace (ChatML's ``<|im_end|>`` is supervised,
        not the newline after it, as for a text turn)."""
        assert record.messages is not None
        turn = self._render(record.messages[: i + 1], False, record)
        if not full.startswith(turn):
            raise _not_prefix_stable(record, f"messages[:{i + 1}]")
        end = len(turn.rstrip())
        for call in record.messages[i]["tool_calls"]:
            name = call["function"]["name"]
            if name not in full[start:end]:
                raise _tools_unsupported(
                    record, f"tool {name!r} is not in the rendered messages[{i}]"
                )
        return start, end

    def encode(self, records: list[Record]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Tokenize a batch of records with one batched fast-tokenizer call.

        Args:
            records: validated records of this encoder's task type.

        Returns:
            Per record: token ids (uint32) and target mask (uint8), same length.
        """
        tok = self.tokenizer
        if self.task_type == "text":
            enc = tok([r.text for r in records], add_special_tokens=True)
            out = []
            for ids in enc["input_ids"]:
                if tok.eos_token_id is not None and (not ids or ids[-1] != tok.eos_token_id):
                    ids = ids + [tok.eos_token_id]
                arr = np.asarray(ids, dtype=np.uint32)
                out.append((arr, np.ones(len(arr), dtype=np.uint8)))
            return out
        rendered = [self.render(r) for r in records]
        # The Rust tokenizer directly (no special tokens added: the template wrote them), in
        # one parallel batch; spans become token ranges through char_to_token.
        encodings = tok.backend_tokenizer.encode_batch(
            [text for text, _ in rendered], add_special_tokens=False
        )
        out = []
        for enc, (_, spans) in zip(encodings, rendered, strict=True):
            mask = np.zeros(len(enc.ids), dtype=np.uint8)
            for s, e in spans:
                first, last = enc.char_to_token(s), enc.char_to_token(e - 1)
                if first is None or last is None:  # a span edge on a char no token covers
                    off = np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2)
                    mask |= ((off[:, 0] < e) & (off[:, 1] > s)).astype(np.uint8)
                    continue
                # Several tokens can share one character (bytes of a multi-byte character):
                # take every token that overlaps the span.
                while first > 0 and enc.token_to_chars(first - 1)[1] > s:
                    first -= 1
                while last + 1 < len(enc.ids) and enc.token_to_chars(last + 1)[0] < e:
                    last += 1
                mask[first : last + 1] = 1
            out.append((np.asarray(enc.ids, dtype=np.uint32), mask))
        return out


@dataclass
class TokenStore:
    """The tokenized documents of one data file, memory-mapped.

    Attributes:
        file: the data file.
        ids: all token ids, documents back to back (uint32).
        mask: target mask, aligned with ``ids`` (uint8).
        offsets: document ``d`` is ``ids[offsets[d]:offsets[d + 1]]`` (int64, ``[n_docs + 1]``).
        lines: source line of each document (int64).
        path: the store folder.
        pad_id: the tokenizer's pad token id (its eos id when it has no pad token).
        rows: ``lines`` are 0-based rows (JSON arrays, parquet, Arrow), not 1-based lines.
    """

    file: str
    ids: np.ndarray
    mask: np.ndarray
    offsets: np.ndarray
    lines: np.ndarray
    path: Path
    pad_id: int
    rows: bool = False

    def where(self, d: int) -> str:
        """``file:line`` or ``file: row N`` of document ``d``."""
        return where(self.file, int(self.lines[d]), self.rows)

    @property
    def num_docs(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @classmethod
    def open(cls, file: str, path: Path, verify: bool = True) -> TokenStore:
        """Memory-map an existing store folder, checking it against its ``meta.json``.

        Args:
            file: the data file the store was made from.
            path: the store folder.
            verify: check every array's dtype, shape and CRC32 (one read of the store);
                False only for a store this process has just written.

        Returns:
            The store.

        Raises:
            DamagedStoreError: a file is missing or unreadable, or an array is not what was
                written.
        """
        try:
            meta = json.loads((path / "meta.json").read_text())
            arrays = {
                name: np.load(path / f"{name}.npy", mmap_mode="r", allow_pickle=False)
                for name in STORE_ARRAYS
            }
            pad_id = int(meta["pad_id"])
            recorded = dict(meta["arrays"])
        except (OSError, ValueError, KeyError, TypeError) as e:  # missing, cut or torn files
            reason = " ".join(str(e).split())  # one line, whatever numpy's message holds
            raise DamagedStoreError(f"{path}: unreadable ({type(e).__name__}: {reason})") from None
        if verify:
            for name in arrays:
                if recorded.get(name) != _describe_npy(path / f"{name}.npy"):
                    raise DamagedStoreError(
                        f"{path}: {name}.npy does not match the dtype, shape and CRC32 written "
                        "in meta.json"
                    )
        rows = bool(meta.get("rows", False))
        return cls(file=file, path=path, pad_id=pad_id, rows=rows, **arrays)


class DamagedStoreError(ValueError):
    """A token store whose files are not what was written (tokenize the file again)."""


def _describe_npy(path: Path) -> dict[str, Any]:
    """What ``meta.json`` records of a store array — dtype, shape and CRC32 of its bytes — read
    from its ``.npy`` file in chunks with plain reads (through a memory map, every page read
    would stay the process's resident memory while the store is open: the whole store)."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read_header = (
            np.lib.format.read_array_header_1_0
            if version == (1, 0)
            else np.lib.format.read_array_header_2_0
        )
        shape, _, dtype = read_header(f)
        crc = 0
        while chunk := f.read(64 << 20):
            crc = zlib.crc32(chunk, crc)
    return {"dtype": dtype.str, "shape": list(shape), "crc32": crc}


def _tool_names(record: Record) -> list[str]:
    """Names of the tools a chat record declares and calls, each once, in order."""
    names = [t["function"]["name"] for t in record.tools or ()]
    for m in record.messages or ():
        names += [c["function"]["name"] for c in m.get("tool_calls", ())]
    return list(dict.fromkeys(names))


def _tools_unsupported(record: Record, why: str) -> DataValidationError:
    return record.error(
        "tools-unsupported",
        f"the model's chat template does not render tools ({why}); remove 'tools'/'tool_calls' "
        "or use a model whose template supports them",
    )


def _not_prefix_stable(record: Record, what: str) -> DataValidationError:
    return record.error(
        "template-not-prefix-stable",
        f"the rendering of {what} is not a prefix of the whole conversation; this template "
        "cannot be masked per turn",
    )


def _chars(record: Record) -> int:
    if record.text is not None:
        return len(record.text)
    n = sum(len(m.get("content") or "") for m in record.messages or ())
    if record.tools or any("tool_calls" in m for m in record.messages or ()):
        n += len(json.dumps([record.tools, [m.get("tool_calls") for m in record.messages or ()]]))
    return n


def _batches(records: Iterator[Record], size: int) -> Iterator[list[Record]]:
    """Batches of at most ``size`` records and, past the first record, ``BATCH_CHARS`` characters
    (the tokenizer's memory grows with the characters of one call)."""
    batch: list[Record] = []
    chars = 0
    for r in records:
        n = _chars(r)
        if batch and (len(batch) == size or chars + n > BATCH_CHARS):
            yield batch
            batch, chars = [], 0
        batch.append(r)
        chars += n
    if batch:
        yield batch


def store_key(
    file: str,
    tokenizer_dir: str | os.PathLike,
    task_type: str,
    loss_on: str,
    data_format: str = "auto",
    columns: Mapping[str, str] | None = None,
) -> str:
    """Cache key of a token store: file content, tokenizer files, settings, store version
    (``data.format`` and ``data.columns`` only when set, so the keys of stores written before
    they existed hold)."""
    settings: dict[str, Any] = {
        "file": file_fingerprint(file),
        "tokenizer": tokenizer_fingerprint(tokenizer_dir),
        "task_type": task_type,
        "loss_on": loss_on if task_type != "text" else None,
        "version": STORE_VERSION,
    }
    if data_format != "auto":
        settings["format"] = data_format
    if columns:
        settings["columns"] = dict(sorted(columns.items()))
    settings_text = json.dumps(settings, sort_keys=True)
    return hashlib.sha256(settings_text.encode()).hexdigest()[:32]


def _marker_text() -> str:
    return json.dumps({"written_by": "longtune", "kind": CACHE_KIND, "time": time.time()}) + "\n"


def _temporary(path: Path, what: str) -> Path:
    """A new name beside the store ``path``: ``KEY.WHAT-HOST-PID-XXXXXXXX``."""
    return path.with_name(f"{path.name}.{what}-{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _remove_store_folder(folder: Path) -> None:
    """Remove a store folder (or a temporary one): only the files a store holds, then the
    folder if that left it empty; a file longtune did not write keeps it in place."""
    for name in STORE_FILES + _PARTIAL_FILES:
        (folder / name).unlink(missing_ok=True)
    try:
        folder.rmdir()
    except OSError:  # not empty: someone else's file is in it
        pass


def _remove_stale_temporaries(cache: Path) -> None:
    """Remove the temporary stores (``KEY.tmp-HOST-PID-…``, ``KEY.old-HOST-PID-…``) that a
    killed tokenization left in ``cache``: only those names, only of this host's processes that
    no longer exist."""
    for entry in cache.iterdir():
        match = _TEMPORARY.fullmatch(entry.name)
        if match and match.group(2) == _HOST and not pid_alive(int(match.group(3))):
            _remove_store_folder(entry)


def _mark_cache(cache: Path) -> None:
    """Give the cache folder the ``.longtune-output`` marker, unless it has one or holds
    something else than stores (a folder of the user's is never marked as longtune's)."""
    if is_longtune_output(cache):
        return
    names = [p.name for p in cache.iterdir() if p.name != OUTPUT_MARKER]
    if all(_CACHE_ENTRY.fullmatch(name) for name in names):
        atomic_write_text(cache / OUTPUT_MARKER, _marker_text())


def _prepare_cache(cache: Path) -> None:
    """Before stores are written into ``cache``: create it, mark it, clean its stale
    temporaries."""
    cache.mkdir(parents=True, exist_ok=True)
    _mark_cache(cache)
    _remove_stale_temporaries(cache)


def build_store(
    file: str,
    encoder: Encoder,
    path: Path,
    data_format: str = "auto",
    columns: Mapping[str, str] | None = None,
    workers: _Workers | None = None,
) -> TokenStore:
    """Tokenize one (already validated) file into a store folder at ``path``, atomically.

    Args:
        file: the data file.
        encoder: the encoder for its task type.
        path: the store folder to create (written to a temporary sibling, then renamed).
        data_format: ``data.format`` (``auto``: from the file).
        columns: ``data.columns``.
        workers: processes to render and tokenize in (None: this process).

    Returns:
        The memory-mapped store.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path, "tmp")
    tmp.mkdir()
    try:
        # The marker first: a data folder holding the cache skips even a half-written store.
        (tmp / OUTPUT_MARKER).write_text(_marker_text())
        _write_store(file, encoder, tmp, data_format, columns, workers)
    except OSError as exc:
        _remove_store_folder(tmp)
        if exc.filename is not None and not str(exc.filename).startswith(str(tmp)):
            raise  # reading the data, not writing the store
        # A full disk, a read-only cache: one line naming the cache folder.
        exc.filename = str(path.parent)
        raise OutputDirError(describe_os_error(exc, "the token cache")) from None
    except BaseException:  # a bad example, an interrupt: leave no half-written store behind
        _remove_store_folder(tmp)
        raise
    # Ranks of one job may build the same store at once: the first rename wins, the others
    # find a complete store in place and drop their copy.
    try:
        os.rename(tmp, path)
    except OSError:
        if not (path / "meta.json").is_file():
            raise
        _remove_store_folder(tmp)
        return TokenStore.open(file, path)
    return TokenStore.open(file, path, verify=False)


def _discard_damaged(path: Path) -> None:
    """Move a damaged store out of the way (atomically, so a concurrent reader sees it whole or
    not at all) and remove it."""
    aside = _temporary(path, "old")
    try:
        os.rename(path, aside)
    except FileNotFoundError:  # another process moved it already
        return
    _remove_store_folder(aside)


def _write_store(
    file: str,
    encoder: Encoder,
    tmp: Path,
    data_format: str = "auto",
    columns: Mapping[str, str] | None = None,
    workers: _Workers | None = None,
) -> None:
    """Tokenize ``file`` and write its arrays and ``meta.json`` into ``tmp``.

    The arrays are written as the batches come (:class:`_Column`): memory holds one batch of
    examples and their tokens, not the file's, so a data file larger than the memory is
    tokenized all the same. A line in the log about every :data:`PROGRESS_EVERY_S` seconds says
    how far it is, at what rate, and about how long is left. With ``workers``, batches are
    rendered and tokenized in those processes, a few at a time, and written in order.
    """
    arrays = {
        "ids": _Column(tmp, "ids", np.uint32),
        "mask": _Column(tmp, "mask", np.uint8),
        "offsets": _Column(tmp, "offsets", np.int64),
        "lines": _Column(tmp, "lines", np.int64),
    }
    kind = file_kind(file, data_format)
    progress = _Progress(file, kind)
    try:
        arrays["offsets"].append(np.zeros(1, dtype=np.int64))
        end = 0
        records = iter_records(file, encoder.task_type, data_format, columns)
        batches = _batches(records, BATCH_SIZE)
        pairs = workers.encode(batches) if workers else ((b, encoder.encode(b)) for b in batches)
        for batch, encoded in pairs:
            lengths = np.fromiter((len(ids) for ids, _ in encoded), np.int64, len(encoded))
            arrays["ids"].append(np.concatenate([ids for ids, _ in encoded]))
            arrays["mask"].append(np.concatenate([mask for _, mask in encoded]))
            arrays["offsets"].append(end + np.cumsum(lengths))
            arrays["lines"].append(np.fromiter((r.line for r in batch), np.int64, len(batch)))
            end += int(lengths.sum())
            progress.update(sum(_chars(r) for r in batch), int(lengths.sum()), len(batch))
        described = {name: column.finish() for name, column in arrays.items()}
    finally:
        for column in arrays.values():
            column.close()
        progress.close()
    progress.done()
    tok = encoder.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    meta = {
        "file": os.path.abspath(file),
        "pad_id": int(pad_id or 0),
        "rows": kind in ROW_KINDS,
        "arrays": described,
    }
    # Last: a store without meta.json is incomplete.
    (tmp / "meta.json").write_text(json.dumps(meta))


class _Column:
    """One array of a store written in pieces: appended to a raw file with its CRC32 kept as it
    goes, then made the ``.npy`` file ``np.save`` would write (same bytes)."""

    def __init__(self, folder: Path, name: str, dtype: type) -> None:
        self.npy, self.raw = folder / f"{name}.npy", folder / f"{name}.raw"
        self.dtype = np.dtype(dtype)
        self.file = open(self.raw, "wb")  # noqa: SIM115 (closed by finish/close)
        self.count, self.crc = 0, 0

    def append(self, values: np.ndarray) -> None:
        array = np.ascontiguousarray(values, dtype=self.dtype)
        self.file.write(array.data)
        self.crc = zlib.crc32(array, self.crc)
        self.count += len(array)

    def finish(self) -> dict[str, Any]:
        """Write the ``.npy`` file (header, then the raw bytes) and return what ``meta.json``
        records of it (as :func:`_describe_npy` reads it back)."""
        self.file.close()
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False}
        with open(self.npy, "wb") as out, open(self.raw, "rb") as raw:
            np.lib.format.write_array_header_1_0(out, header | {"shape": (self.count,)})
            while chunk := raw.read(64 << 20):
                out.write(chunk)
        self.raw.unlink()
        return {"dtype": self.dtype.str, "shape": [self.count], "crc32": self.crc}

    def close(self) -> None:
        self.file.close()


PROGRESS_EVERY_S = 30.0


class _Progress:
    """Log lines while one file is tokenized: examples, tokens, rate and, for plain JSON and
    text files, the share of the file (by its characters against the file's bytes, so a little
    low for JSON) and the time left. (Of compressed and columnar files the characters say
    nothing of the share read: there, no share and no time left.) On a terminal, also a
    progress bar (tqdm) with the same rate and time left."""

    def __init__(self, file: str, kind: str) -> None:
        plain = kind in ("jsonl", "json", "text") and not is_compressed(file)
        self.file, self.size = file, max(1, data_size(file)) if plain else None
        self.start = self.last = time.monotonic()
        self.chars = self.tokens = self.examples = 0
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(
                total=self.size,  # characters of a plain file; examples otherwise
                unit="B" if self.size else " examples",
                unit_scale=bool(self.size),
                desc=f"tokenizing {Path(file).name}",
                leave=False,
                mininterval=1.0,
            )

    def update(self, chars: int, tokens: int, examples: int) -> None:
        self.chars += chars
        self.tokens += tokens
        self.examples += examples
        now = time.monotonic()
        if self.bar is not None:
            self.bar.update(min(chars, self.size - self.bar.n) if self.size else examples)
            self.bar.set_postfix_str(f"{self.tokens / max(now - self.start, 1e-9):,.0f} tokens/s")
        if now - self.last < PROGRESS_EVERY_S:
            return
        self.last = now
        elapsed = now - self.start
        said = f"tokenizing {self.file}: {self.examples} examples, {self.tokens} tokens "
        said += f"({self.tokens / elapsed:.0f} tokens/s)"
        if self.size is not None:
            share = min(self.chars / self.size, 0.99)
            left = elapsed * (1 - share) / max(share, 1e-9)
            said += f", about {100 * share:.0f}% of the file, about {_duration(left)} left"
        logger.info("%s", said)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def done(self) -> None:
        elapsed = time.monotonic() - self.start
        if elapsed >= PROGRESS_EVERY_S:  # a file that took long: say how it ended
            logger.info(
                "tokenized %s: %d examples, %d tokens in %s (%.0f tokens/s)",
                self.file,
                self.examples,
                self.tokens,
                _duration(elapsed),
                self.tokens / elapsed,
            )


def tokenize_processes(setting: int, file: str) -> int:
    """Processes to tokenize ``file`` in: ``setting`` when it is not 0; for 0 (auto), one per two
    CPUs this process may use, at most :data:`MAX_AUTO_WORKERS`, for a file of
    :data:`WORKERS_MIN_BYTES` or more on a machine of 4 CPUs or more, else 1 (this process).

    The Rust tokenizer already encodes a batch on every CPU; the processes add the rest in
    parallel (rendering the chat template and finding the loss spans, in Python).
    """
    if setting > 0:
        return setting
    cpus = len(os.sched_getaffinity(0))
    if cpus < 4 or data_size(file) < WORKERS_MIN_BYTES:
        return 1
    return min(MAX_AUTO_WORKERS, cpus // 2)


_WORKER_ENCODER: Encoder | None = None


def _start_worker(tokenizer_dir: str, task_type: str, loss_on: str, threads: int) -> None:
    """In a worker process: the tokenizer, with its share of the CPUs for batch encoding."""
    global _WORKER_ENCODER
    os.environ["RAYON_NUM_THREADS"] = str(threads)  # read when the Rust tokenizer first encodes
    _WORKER_ENCODER = Encoder(load_tokenizer(tokenizer_dir), task_type, loss_on)


def _encode_in_worker(batch: list[Record]) -> list[tuple[np.ndarray, np.ndarray]]:
    assert _WORKER_ENCODER is not None
    return _WORKER_ENCODER.encode(batch)


class _Workers:
    """Processes that render and tokenize batches of records (spawned: no state of this
    process is copied into them), each with the tokenizer loaded once."""

    def __init__(self, n: int, tokenizer_dir: str | os.PathLike, task_type: str, loss_on: str):
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        self.n = n
        threads = max(1, len(os.sched_getaffinity(0)) // n)
        self.pool = ProcessPoolExecutor(
            n,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_start_worker,
            initargs=(os.fspath(tokenizer_dir), task_type, loss_on, threads),
        )

    def encode(
        self, batches: Iterator[list[Record]]
    ) -> Iterator[tuple[list[Record], list[tuple[np.ndarray, np.ndarray]]]]:
        """Each batch with its encoding, in order; at most two batches per process in flight
        (memory stays a few batches, whatever the file's size)."""
        pending: deque = deque()
        for batch in batches:
            pending.append((batch, self.pool.submit(_encode_in_worker, batch)))
            if len(pending) >= 2 * self.n:
                batch0, future = pending.popleft()
                yield batch0, future.result()
        while pending:
            batch0, future = pending.popleft()
            yield batch0, future.result()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def tokenize_files(
    files: list[str],
    tokenizer_dir: str | os.PathLike,
    task_type: str,
    loss_on: str = "all_assistant",
    cache_dir: str | os.PathLike | None = None,
    tokenizer: Any | None = None,
    *,
    data_format: str = "auto",
    columns: Mapping[str, str] | None = None,
    processes: int = 0,
) -> list[TokenStore]:
    """Tokenize validated files into cached token stores, reusing stores that are up to date.

    The tokenizer is loaded only if some file has no store yet. A store that fails its check
    (see :meth:`TokenStore.open`) is removed and built again, with one warning naming it. Before
    the first store is written, the cache folder is marked as longtune's (when it holds nothing
    but stores) and the temporaries of killed tokenizations are removed.

    Args:
        files: validated data files.
        tokenizer_dir: HF folder with the tokenizer files and chat template.
        task_type: ``chat``, ``instruction`` or ``text``.
        loss_on: ``all_assistant`` or ``last_assistant``.
        cache_dir: where stores live; defaults to ``longtune.assets.cache_dir() / "tokens"``.
        tokenizer: the tokenizer of ``tokenizer_dir`` if the caller has it loaded already.
        data_format: ``data.format`` (``auto``: each file's own).
        columns: ``data.columns``.
        processes: ``data.tokenize_processes``: processes to tokenize a file in (0: auto, see
            :func:`tokenize_processes`).

    Returns:
        One memory-mapped store per file.
    """
    if loss_on not in LOSS_ON:
        raise ValueError(f"loss_on={loss_on!r} is not one of {LOSS_ON}")
    if cache_dir is None:
        from longtune.assets import cache_dir as default_cache_dir

        cache_dir = default_cache_dir() / "tokens"
    stores = []
    encoder: Encoder | None = None
    workers: _Workers | None = None
    try:
        for file in files:
            key = store_key(file, tokenizer_dir, task_type, loss_on, data_format, columns)
            path = Path(cache_dir) / key
            if path.exists():
                try:
                    stores.append(TokenStore.open(file, path))
                    continue
                except DamagedStoreError as e:
                    logger.warning("token cache of %s is damaged, tokenizing it again: %s", file, e)
                    _discard_damaged(path)
            if encoder is None:  # the first store to write
                _prepare_cache(Path(cache_dir))
                tok = tokenizer if tokenizer is not None else load_tokenizer(tokenizer_dir)
                encoder = Encoder(tok, task_type, loss_on)
            n = tokenize_processes(processes, file)
            if n > 1 and (workers is None or workers.n != n):
                if workers is not None:
                    workers.close()
                logger.info("tokenizing %s in %d processes", file, n)
                workers = _Workers(n, tokenizer_dir, task_type, loss_on)
            use = workers if n > 1 else None
            stores.append(build_store(file, encoder, path, data_format, columns, use))
    finally:
        if workers is not None:
            workers.close()
    return stores
