"""Structural validation of training data, before any tokenizer, process group or tensor exists.

Every error names the file, the (1-based) line and the rule broken:
``"{file}:{line}: {rule}: {detail}"``, or ``"{file}: {rule}: {detail}"`` for a problem of the
whole file (missing, empty, of an unknown type). Validation is pure Python (json + UTF-8
decoding), so the trainer can call it first and fail in seconds on a bad line 2,000,000.

Input formats (``task_type``):

- ``chat``: JSONL, one ``{"messages": [{"role": ..., "content": ...}, ...]}`` per line. Roles
  ``system`` (first message only), ``user``, ``assistant`` and ``tool`` (answers an assistant
  turn). User and assistant alternate; a tool message follows an assistant or another tool
  message and is followed by an assistant message; the last message is the assistant's.
  Tool calling in OpenAI's shape: ``content`` may be a list of ``{"type": "text", "text": ...}``
  parts, joined with ``""`` into one string (any other part type, such as ``image_url``, is
  refused by name); an assistant message may carry ``tool_calls``
  (``[{"type": "function", "id": ..., "function": {"name": ..., "arguments": ...}}]``, with
  ``arguments`` an object or a string holding a JSON object, which is parsed) and then needs no
  ``content``; a tool message may carry ``tool_call_id`` and ``name``; the example may carry a
  top-level ``tools`` list (``{"type": "function", "function": {"name", "description",
  "parameters"}}``), passed to the chat template as given. Any other key is refused.
- ``instruction``: JSONL with ``prompt`` and ``response`` (or ``completion``).
- ``text``: ``.txt`` files (one document each) or JSONL with a ``text`` field.

A folder expands to its files with a known suffix (``.jsonl``, ``.json``, and ``.txt`` for
``text``), sorted by path. Links to files and folders are followed; a folder or file reached
twice (through links, or a link back to a folder above it) is read once, under its path without
links where it has one. Hidden entries (a name starting with
``.``: ``.git``, ``.ipynb_checkpoints``) are skipped, and so are sub-folders that longtune wrote
(a run folder, a converted or exported model, the token cache), so a run or a cache kept inside a
data folder is never read as data; a file named explicitly is read whatever its name. Blank lines
in JSONL files are skipped (their line numbers still count).

An example (one JSONL line, one ``.txt`` file) may be at most :data:`MAX_EXAMPLE_BYTES`; a longer
one is refused as ``example-too-large`` without being read whole (a tokenizer needs about 150
bytes of memory per character, so an unbounded line could take the machine's memory).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from longtune.fsutil import is_longtune_output
from longtune.run_dir import RunDir

TASK_TYPES = ("chat", "instruction", "text")
JSONL_SUFFIXES = (".jsonl", ".json")
TEXT_SUFFIXES = (".txt",)
CHAT_ROLES = ("system", "user", "assistant", "tool")
MAX_EXAMPLE_BYTES = 8 * 2**20
"""Largest example (a JSONL line or a ``.txt`` file): 8 MiB, about two million tokens."""

# Which roles may follow which (None: start of the conversation).
_NEXT_ROLES: dict[str | None, tuple[str, ...]] = {
    None: ("system", "user"),
    "system": ("user",),
    "user": ("assistant",),
    "assistant": ("user", "tool"),
    "tool": ("tool", "assistant"),
}


class DataValidationError(ValueError):
    """One broken rule in one line of one data file.

    Reads ``file:line: rule: detail``, or ``file: rule: detail`` for a whole-file problem.

    Attributes:
        file: the file (as given or expanded from a folder).
        line: 1-based line number (0 for a whole-file problem).
        rule: short rule name, e.g. ``"invalid-json"`` or ``"roles-not-alternating"``.
        detail: what was found and how to fix it.
    """

    def __init__(self, file: str, line: int, rule: str, detail: str) -> None:
        self.file = str(file)
        self.line = line
        self.rule = rule
        self.detail = detail
        where = f"{self.file}:{line}" if line > 0 else self.file
        super().__init__(f"{where}: {rule}: {detail}")


@dataclass(frozen=True)
class Record:
    """One validated example: where it came from and its normalized content.

    ``messages`` for ``chat`` and ``instruction`` (turned into a user/assistant pair),
    ``text`` for ``text``; ``tools`` for a chat example that declares tools. Plain JSON data:
    each message is ``{"role", "content"}`` with ``content`` one string (``""`` for an
    assistant message that only calls tools), plus ``tool_calls`` (normalized, see
    :func:`_tool_calls`) on an assistant message and ``tool_call_id`` / ``name`` on a tool
    message when the data gives them.
    """

    file: str
    line: int
    messages: list[dict[str, Any]] | None = None
    text: str | None = None
    tools: list[dict[str, Any]] | None = None


def expand_paths(paths: list[str], task_type: str) -> list[str]:
    """Expand folders into their data files and check that every path exists.

    Args:
        paths: files or folders.
        task_type: ``chat``, ``instruction`` or ``text`` (decides which suffixes a folder yields).

    Returns:
        The data files, folders expanded in sorted order.

    Raises:
        DataValidationError: a path does not exist, a file has an unknown suffix, a folder
            holds no data file, or a link in a folder leads nowhere.
    """
    check_task_type(task_type)
    suffixes = JSONL_SUFFIXES + (TEXT_SUFFIXES if task_type == "text" else ())
    files: list[str] = []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            found = _data_files(path, suffixes)
            if not found:
                raise DataValidationError(
                    p, 0, "no-data-files", f"folder has no file ending in {' or '.join(suffixes)}"
                )
            files.extend(found)
        elif path.is_file():
            if path.suffix == ".parquet":
                raise DataValidationError(
                    p, 0, "unsupported-file-type", "parquet is not supported yet; convert to JSONL"
                )
            if path.suffix not in suffixes:
                raise DataValidationError(
                    p,
                    0,
                    "unsupported-file-type",
                    f"suffix {path.suffix!r} is not one of {suffixes} for task type {task_type!r}",
                )
            files.append(p)
        else:
            raise DataValidationError(p, 0, "file-not-found", "no such file or folder")
    if not files:
        raise DataValidationError("<none>", 0, "no-data-files", "no data path was given")
    return files


def _written_by_longtune(folder: Path) -> bool:
    run = RunDir(folder)
    return run.is_run() or run.lock.exists() or is_longtune_output(folder)


def _identity(path: str) -> tuple[int, int] | None:
    """``(device, inode)`` of what ``path`` leads to after links; None for a broken link."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _data_files(folder: Path, suffixes: tuple[str, ...]) -> list[str]:
    """Files of ``folder`` with a data suffix, sorted; links followed, each folder and file read
    once; hidden entries and folders longtune wrote skipped.

    The real tree of ``folder`` is walked first (sorted), then the folders that links lead to,
    in the order they were found; a folder already walked (a link back to an ancestor, a folder
    reached twice) is not walked again. A file reached twice keeps its path without links if it
    has one, else the first in sorted order.

    Raises:
        DataValidationError: a link with a data suffix leads nowhere.
    """
    seen_dirs: set[tuple[int, int] | None] = set()
    candidates: list[tuple[bool, str, tuple[int, int]]] = []  # (through a link, path, identity)
    roots = [(str(folder), False)]
    while roots:
        top, linked = roots.pop(0)
        if _identity(top) in seen_dirs:
            continue
        seen_dirs.add(_identity(top))
        for root, dirs, files in os.walk(top):
            walked = []
            for d in sorted(dirs):
                path = os.path.join(root, d)
                if d.startswith(".") or _written_by_longtune(Path(path)):
                    continue
                if os.path.islink(path):  # walked after the real tree, if not walked by then
                    roots.append((path, True))
                elif _identity(path) not in seen_dirs:
                    seen_dirs.add(_identity(path))
                    walked.append(d)
            dirs[:] = walked
            for f in files:
                path = os.path.join(root, f)
                if f.startswith(".") or Path(f).suffix not in suffixes:
                    continue
                identity = _identity(path)
                if identity is None:  # a link to nothing (or a file gone since the listing)
                    target = os.readlink(path) if os.path.islink(path) else path
                    raise DataValidationError(
                        path,
                        0,
                        "file-not-found",
                        f"a link to {target}, which does not exist; fix or remove the link",
                    )
                candidates.append((linked or os.path.islink(path), path, identity))
    found: dict[tuple[int, int], str] = {}
    for _, path, identity in sorted(candidates):
        found.setdefault(identity, path)
    return sorted(found.values())


def check_task_type(task_type: str) -> None:
    """Raise ``ValueError`` unless ``task_type`` is one of :data:`TASK_TYPES`."""
    if task_type not in TASK_TYPES:
        raise ValueError(f"task_type={task_type!r} is not one of {TASK_TYPES}")


def _check_string(file: str, line: int, value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise DataValidationError(
            file, line, "wrong-type", f"{where} must be a string, got {type(value).__name__}"
        )
    if not value.strip():
        raise DataValidationError(
            file, line, "empty-content", f"{where} is empty; remove the example or fill it in"
        )
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataValidationError(
            file,
            line,
            "invalid-unicode",
            f"{where} holds a lone surrogate {value[e.start]!r} at character {e.start + 1}; "
            "a \\ud800-\\udfff escape must be one half of a pair — fix the text's encoding",
        ) from None
    return value


def _check_keys(file: str, line: int, obj: dict, required: set[str], optional: set[str]) -> None:
    missing = sorted(required - obj.keys())
    if missing:
        raise DataValidationError(
            file, line, "missing-key", f"missing key(s) {missing}; found {sorted(obj.keys())}"
        )
    unknown = sorted(obj.keys() - required - optional)
    if unknown:
        raise DataValidationError(
            file,
            line,
            "unknown-key",
            f"unknown key(s) {unknown}; allowed: {sorted(required | optional)}",
        )


# Keys a message may carry beside ``role`` and ``content``, by role.
_OPTIONAL_MESSAGE_KEYS: dict[str, set[str]] = {
    "assistant": {"tool_calls"},
    "tool": {"tool_call_id", "name"},
}


def _check_json_text(file: str, line: int, value: Any, where: str) -> None:
    """Refuse lone surrogates anywhere in a JSON value (the tokenizer cannot encode them)."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise DataValidationError(
            file,
            line,
            "invalid-unicode",
            f"{where} holds a lone surrogate (a \\ud800-\\udfff escape that is not one half of "
            "a pair); fix the text's encoding",
        ) from None


def _content_text(file: str, line: int, content: Any, where: str) -> Any:
    """``content`` as one string: a string as is, a list of ``{"type": "text", "text": ...}``
    parts joined with ``""``; any other value is returned for :func:`_check_string` to refuse."""
    if not isinstance(content, list):
        return content
    texts = []
    for k, part in enumerate(content):
        if not isinstance(part, dict):
            raise DataValidationError(
                file,
                line,
                "wrong-type",
                f"{where}[{k}] must be an object {{type, text}}, got {type(part).__name__}",
            )
        kind = part.get("type")
        if kind != "text":
            raise DataValidationError(
                file,
                line,
                "unsupported-content-part",
                f"{where}[{k}] has type {kind!r}; only 'text' parts are read",
            )
        _check_keys(file, line, part, {"type", "text"}, set())
        if not isinstance(part["text"], str):
            raise DataValidationError(
                file,
                line,
                "wrong-type",
                f"{where}[{k}].text must be a string, got {type(part['text']).__name__}",
            )
        texts.append(part["text"])
    return "".join(texts)


def _tool_calls(file: str, line: int, calls: Any, where: str) -> list[dict[str, Any]]:
    """Validate an assistant's ``tool_calls`` (OpenAI shape) and normalize each to
    ``{"type": "function", ["id": ...,] "function": {"name": ..., "arguments": {...}}}``, with
    ``arguments`` parsed when given as a JSON string."""
    if not isinstance(calls, list) or not calls:
        raise DataValidationError(
            file,
            line,
            "wrong-type",
            f"{where} must be a non-empty list of {{type, id, function}} objects",
        )
    out = []
    for j, call in enumerate(calls):
        at = f"{where}[{j}]"
        if not isinstance(call, dict):
            raise DataValidationError(
                file, line, "wrong-type", f"{at} must be an object, got {type(call).__name__}"
            )
        _check_keys(file, line, call, {"function"}, {"type", "id"})
        if call.get("type", "function") != "function":
            raise DataValidationError(
                file,
                line,
                "unsupported-tool-call",
                f"{at}.type={call['type']!r}; only 'function' calls are read",
            )
        normalized: dict[str, Any] = {"type": "function"}
        if "id" in call:
            normalized["id"] = _check_string(file, line, call["id"], f"{at}.id")
        function = call["function"]
        if not isinstance(function, dict):
            raise DataValidationError(
                file,
                line,
                "wrong-type",
                f"{at}.function must be an object {{name, arguments}}, "
                f"got {type(function).__name__}",
            )
        _check_keys(file, line, function, {"name", "arguments"}, set())
        name = _check_string(file, line, function["name"], f"{at}.function.name")
        arguments = _arguments(file, line, function["arguments"], f"{at}.function.arguments")
        normalized["function"] = {"name": name, "arguments": arguments}
        out.append(normalized)
    return out


def _arguments(file: str, line: int, arguments: Any, where: str) -> dict[str, Any]:
    """A call's arguments as an object: given as one, or as a string holding a JSON object
    (chat templates write them with ``tojson``, so a string would be quoted twice)."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as e:
            raise DataValidationError(
                file,
                line,
                "invalid-tool-arguments",
                f"{where} is not valid JSON ({e.msg} at column {e.colno}); "
                "give a JSON object or a string holding one",
            ) from None
        except RecursionError:
            raise DataValidationError(
                file, line, "too-deeply-nested", f"{where} nests too deeply to read"
            ) from None
    if not isinstance(arguments, dict):
        raise DataValidationError(
            file,
            line,
            "invalid-tool-arguments",
            f"{where} must be a JSON object (or a string holding one), "
            f"got {type(arguments).__name__}",
        )
    _check_json_text(file, line, arguments, where)
    return arguments


def _tools(file: str, line: int, tools: Any) -> list[dict[str, Any]] | None:
    """Validate the example's ``tools`` (OpenAI shape), kept as given; ``[]`` is no tools."""
    if not isinstance(tools, list):
        raise DataValidationError(
            file,
            line,
            "wrong-type",
            f"'tools' must be a list of {{type, function}} objects, got {type(tools).__name__}",
        )
    for k, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str) or not name.strip():
            raise DataValidationError(
                file,
                line,
                "wrong-type",
                f'tools[{k}] must be an object {{"type": "function", "function": '
                f'{{"name": ..., "parameters": ...}}}} with a function name',
            )
    _check_json_text(file, line, tools, "'tools'")
    return tools or None


def _chat_record(file: str, line: int, obj: dict) -> Record:
    _check_keys(file, line, obj, {"messages"}, {"tools"})
    messages = obj["messages"]
    if not isinstance(messages, list) or not messages:
        raise DataValidationError(
            file, line, "wrong-type", "'messages' must be a non-empty list of {role, content}"
        )
    tools = _tools(file, line, obj["tools"]) if "tools" in obj else None
    prev: str | None = None
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise DataValidationError(
                file, line, "wrong-type", f"messages[{i}] must be an object, got {type(m).__name__}"
            )
        role = m.get("role")
        calls = role == "assistant" and "tool_calls" in m
        required = {"role"} if calls else {"role", "content"}
        optional = _OPTIONAL_MESSAGE_KEYS.get(role, set()) if isinstance(role, str) else set()
        _check_keys(file, line, m, required, optional | {"content"})
        if role not in CHAT_ROLES:
            raise DataValidationError(
                file, line, "unknown-role", f"messages[{i}].role={role!r}; use one of {CHAT_ROLES}"
            )
        if role not in _NEXT_ROLES[prev]:
            if role == "system":
                raise DataValidationError(
                    file,
                    line,
                    "system-not-first",
                    f"messages[{i}] is a system message; only the first may be",
                )
            raise DataValidationError(
                file,
                line,
                "roles-not-alternating",
                f"messages[{i}].role={role!r} follows {prev or 'the start'!r}; "
                f"expected one of {_NEXT_ROLES[prev]}",
            )
        where = f"messages[{i}].content"
        content = _content_text(file, line, m.get("content"), where)
        message: dict[str, Any] = {"role": role}
        if calls and (content is None or (isinstance(content, str) and not content.strip())):
            message["content"] = ""  # a call without text: "" renders in any template
        else:
            message["content"] = _check_string(file, line, content, where)
        if calls:
            message["tool_calls"] = _tool_calls(
                file, line, m["tool_calls"], f"messages[{i}].tool_calls"
            )
        for key in ("tool_call_id", "name"):
            if key in m:
                message[key] = _check_string(file, line, m[key], f"messages[{i}].{key}")
        out.append(message)
        prev = role
    if prev != "assistant":
        raise DataValidationError(
            file,
            line,
            "last-not-assistant",
            f"the last message is {prev!r}; a training example must end with an assistant message",
        )
    return Record(file, line, messages=out, tools=tools)


def _instruction_record(file: str, line: int, obj: dict) -> Record:
    if "response" in obj and "completion" in obj:
        raise DataValidationError(
            file, line, "unknown-key", "give either 'response' or 'completion', not both"
        )
    answer_key = "completion" if "completion" in obj else "response"
    _check_keys(file, line, obj, {"prompt", answer_key}, set())
    prompt = _check_string(file, line, obj["prompt"], "prompt")
    answer = _check_string(file, line, obj[answer_key], answer_key)
    return Record(
        file,
        line,
        messages=[{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
    )


def _text_record(file: str, line: int, obj: dict) -> Record:
    _check_keys(file, line, obj, {"text"}, set())
    return Record(file, line, text=_check_string(file, line, obj["text"], "text"))


_RECORD_BUILDERS = {"chat": _chat_record, "instruction": _instruction_record, "text": _text_record}


def iter_records(file: str, task_type: str) -> Iterator[Record]:
    """Yield the validated examples of one data file, raising on the first broken rule.

    Args:
        file: a ``.jsonl``/``.json`` (one JSON object per line) or, for ``text``, a ``.txt`` file.
        task_type: ``chat``, ``instruction`` or ``text``.

    Yields:
        One :class:`Record` per example, in file order.

    Raises:
        DataValidationError: naming the file, the line and the rule.
    """
    check_task_type(task_type)
    if Path(file).suffix in TEXT_SUFFIXES:
        size = Path(file).stat().st_size
        if size > MAX_EXAMPLE_BYTES:
            raise _too_large(file, 1, size)
        raw = Path(file).read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            line = raw[: e.start].count(b"\n") + 1
            raise DataValidationError(
                file,
                line,
                "invalid-utf8",
                f"byte {e.start} is not UTF-8 ({e.reason}); re-encode as UTF-8",
            ) from None
        yield Record(file, 1, text=_check_string(file, 1, text, "file text"))
        return
    n = 0
    with open(file, "rb") as f:
        for line_no, raw_line in _lines(f, file):
            if not raw_line.strip():
                continue
            n += 1
            yield _check_line(file, line_no, raw_line, task_type)
    if n == 0:
        raise DataValidationError(file, 0, "empty-file", "the file holds no example")


def _too_large(file: str, line: int, size: int) -> DataValidationError:
    return DataValidationError(
        file,
        line,
        "example-too-large",
        f"{size / 2**20:.1f} MiB in one example; at most {MAX_EXAMPLE_BYTES // 2**20} MiB "
        "(about two million tokens) — split it into several examples",
    )


def _lines(f: BinaryIO, file: str) -> Iterator[tuple[int, bytes]]:
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
            raise _too_large(file, line_no, size)
        yield line_no, raw


def validate_files(
    paths: list[str], task_type: str, all_errors: bool = False
) -> list[DataValidationError]:
    """Check every example of every file against the rules of ``task_type``.

    Needs no tokenizer and starts nothing: call it before loading models or process groups.

    Args:
        paths: data files or folders.
        task_type: ``chat``, ``instruction`` or ``text``.
        all_errors: collect every error (one per line at most) instead of stopping at the first.

    Returns:
        The errors found (empty when the data is valid); at most one unless ``all_errors``.
    """
    try:
        files = expand_paths(paths, task_type)
    except DataValidationError as e:
        return [e]
    errors: list[DataValidationError] = []
    for file in files:
        errors.extend(_validate_file(file, task_type, all_errors))
        if errors and not all_errors:
            return errors[:1]
    return errors


def _validate_file(file: str, task_type: str, all_errors: bool) -> list[DataValidationError]:
    if not all_errors or Path(file).suffix in TEXT_SUFFIXES:
        try:
            for _ in iter_records(file, task_type):
                pass
        except DataValidationError as e:
            return [e]
        return []
    # All errors: validate line by line so one bad line does not hide the next.
    errors: list[DataValidationError] = []
    n = 0
    with open(file, "rb") as f:
        lines = _lines(f, file)
        while True:
            try:
                line_no, raw_line = next(lines, (0, None))
            except DataValidationError as e:  # a line too large to read: stop at it
                errors.append(e)
                break
            if raw_line is None:
                break
            if not raw_line.strip():
                continue
            n += 1
            try:
                _check_line(file, line_no, raw_line, task_type)
            except DataValidationError as e:
                errors.append(e)
    if n == 0:
        errors.append(DataValidationError(file, 0, "empty-file", "the file holds no example"))
    return errors


def _check_line(file: str, line_no: int, raw_line: bytes, task_type: str) -> Record:
    try:
        line = raw_line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataValidationError(
            file, line_no, "invalid-utf8", f"column {e.start + 1} is not UTF-8 ({e.reason})"
        ) from None
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        end = len(line.rstrip())
        if e.pos >= end or e.msg.startswith("Unterminated"):
            detail = (
                f"the line ends at column {end} before its JSON value is complete "
                "(was the file cut short?)"
            )
        else:
            detail = f"{e.msg} at column {e.colno}"
        raise DataValidationError(file, line_no, "invalid-json", detail) from None
    except RecursionError:
        raise DataValidationError(
            file,
            line_no,
            "too-deeply-nested",
            "the JSON nests objects/lists too deeply to read; an example is a flat list of "
            "messages",
        ) from None
    if not isinstance(obj, dict):
        raise DataValidationError(
            file, line_no, "not-an-object", f"expected a JSON object, got {type(obj).__name__}"
        )
    return _RECORD_BUILDERS[task_type](file, line_no, obj)
