"""Structural validation of training data, before any tokenizer, process group or tensor exists.

Every error names the file, where in it, and the rule broken: ``"{file}:{line}: {rule}:
{detail}"`` (JSONL, text), ``"{file}: row {N}: {rule}: {detail}"`` (JSON arrays, parquet,
Arrow, ``datasets`` folders; rows count from 0) or ``"{file}: {rule}: {detail}"`` for a problem
of the whole file (missing, empty, of an unknown type). Validation is pure Python (json, UTF-8
decoding, and pyarrow / ``datasets`` for columnar files), so the trainer can call it first and
fail in seconds on a bad row 2,000,000. Files are read by :mod:`longtune.data.formats`.

Record shapes (``task_type``), whatever the file format:

- ``chat``: ``{"messages": [{"role": ..., "content": ...}, ...]}``, or ShareGPT
  ``{"conversations": [{"from": ..., "value": ...}, ...]}`` (see :data:`SHAREGPT_ROLES`; an
  optional top-level ``system`` string becomes the system message, an optional ``tools`` list or
  JSON string the tools). Roles ``system`` (first message only), ``user``, ``assistant`` and
  ``tool`` (answers an assistant turn). User and assistant alternate; a tool message follows an
  assistant or another tool message and is followed by an assistant message; the last message
  is the assistant's. Tool calling in OpenAI's shape: ``content`` may be a list of
  ``{"type": "text", "text": ...}`` parts, joined with ``""`` into one string (any other part
  type, such as ``image_url``, is refused by name); an assistant message may carry
  ``tool_calls`` (``[{"type": "function", "id": ..., "function": {"name": ..., "arguments":
  ...}}]``, with ``arguments`` an object or a string holding a JSON object, which is parsed) and
  then needs no ``content``; a tool message may carry ``tool_call_id`` and ``name``; the example
  may carry a top-level ``tools`` list (``{"type": "function", "function": {"name",
  "description", "parameters"}}``), passed to the chat template as given. Any other key of a
  message is refused.
- ``instruction``: ``prompt`` and ``response`` (or ``completion``), or Alpaca's
  ``instruction``, optional ``input`` and ``output`` (the prompt is the instruction, then a blank
  line and the input when there is one).
- ``text``: ``.txt`` files (one document each) or records with a ``text`` field.

``data.columns`` renames columns first (``{"messages": "dialog"}`` reads the ``dialog`` column
as ``messages``). Other top-level keys are ignored and counted (:func:`validate_files` returns
the counts for the log).

A folder expands to its data files (every suffix :mod:`longtune.data.formats` reads, ``.txt``
only for ``text``) and ``datasets`` folders, sorted by path. Links to files and folders are
followed; a folder or file reached twice (through links, or a link back to a folder above it)
is read once, under its path without links where it has one. Hidden entries (a name starting
with ``.``: ``.git``, ``.ipynb_checkpoints``) are skipped, and so are sub-folders that longtune
wrote (a run folder, a converted or exported model, the token cache), so a run or a cache kept
inside a data folder is never read as data; a file named explicitly is read whatever its name
when ``data.format`` says how. Blank lines in JSONL files are skipped (their line numbers still
count).

An example (one JSONL line, one array element, one ``.txt`` file) may be at most
:data:`MAX_EXAMPLE_BYTES`; a longer one is refused as ``example-too-large`` without being read
whole (a tokenizer needs about 150 bytes of memory per character, so an unbounded line could
take the machine's memory).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from longtune.data.formats import (
    MAX_EXAMPLE_BYTES,
    ROW_KINDS,
    DataValidationError,
    check_file_name,
    check_format,
    dataset_dict_error,
    file_kind,
    folder_suffixes,
    has_suffix,
    is_dataset_dict_folder,
    is_dataset_folder,
    read_rows,
    where,
)
from longtune.fsutil import is_longtune_output
from longtune.run_dir import RunDir

__all__ = ["MAX_EXAMPLE_BYTES", "DataValidationError", "Record", "expand_paths", "iter_records"]

TASK_TYPES = ("chat", "instruction", "text")
CHAT_ROLES = ("system", "user", "assistant", "tool")
COLUMNS = (
    "messages",
    "conversations",
    "system",
    "tools",
    "prompt",
    "response",
    "completion",
    "instruction",
    "input",
    "output",
    "text",
)
"""The names ``data.columns`` may map another column to."""
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "function_call": "assistant",
    "observation": "tool",
    "tool": "tool",
}
"""ShareGPT's ``from`` -> role. A ``function_call`` turn is an assistant tool call: its value
is a JSON object ``{"name": ..., "arguments": ...}`` (or a list of them); ``observation`` is a
tool's result."""
_SHAREGPT_KEYS = ("from", "value")

# Which roles may follow which (None: start of the conversation).
_NEXT_ROLES: dict[str | None, tuple[str, ...]] = {
    None: ("system", "user"),
    "system": ("user",),
    "user": ("assistant",),
    "assistant": ("user", "tool"),
    "tool": ("tool", "assistant"),
}


@dataclass(frozen=True)
class Record:
    """One validated example: where it came from and its normalized content.

    ``messages`` for ``chat`` and ``instruction`` (turned into a user/assistant pair),
    ``text`` for ``text``; ``tools`` for a chat example that declares tools. Plain JSON data:
    each message is ``{"role", "content"}`` with ``content`` one string (``""`` for an
    assistant message that only calls tools), plus ``tool_calls`` (normalized, see
    :func:`_tool_calls`) on an assistant message and ``tool_call_id`` / ``name`` on a tool
    message when the data gives them. ``line`` is the 1-based line, or the 0-based row when
    ``row``.
    """

    file: str
    line: int
    messages: list[dict[str, Any]] | None = None
    text: str | None = None
    tools: list[dict[str, Any]] | None = None
    row: bool = False

    def error(self, rule: str, detail: str) -> DataValidationError:
        """The one-line error of a broken rule in this example."""
        return DataValidationError(self.file, self.line, rule, detail, self.row)


def expand_paths(paths: list[str], task_type: str, data_format: str = "auto") -> list[str]:
    """Expand folders into their data files and check that every path exists.

    Args:
        paths: files or folders (a ``datasets`` folder is one data "file").
        task_type: ``chat``, ``instruction`` or ``text`` (decides which suffixes a folder yields).
        data_format: ``auto`` or a format of :data:`longtune.data.formats.FORMATS` (a forced
            format reads a folder's files of that format only, and a named file whatever its
            suffix).

    Returns:
        The data files, folders expanded in sorted order.

    Raises:
        DataValidationError: a path does not exist, a file has an unknown suffix, a folder
            holds no data file, a link in a folder leads nowhere, a ``DatasetDict`` folder.
    """
    check_task_type(task_type)
    check_format(data_format, task_type)
    suffixes = folder_suffixes(data_format, task_type)
    files: list[str] = []
    for p in paths:
        path = Path(p)
        if path.is_dir() and is_dataset_folder(path):
            files.append(p)
        elif path.is_dir() and is_dataset_dict_folder(path):
            raise dataset_dict_error(p)
        elif path.is_dir():
            found = _data_files(path, suffixes)
            if not found:
                raise DataValidationError(
                    p,
                    0,
                    "no-data-files",
                    f"folder has no file ending in {' or '.join(suffixes)} and no datasets "
                    "folder (save_to_disk)",
                )
            files.extend(found)
        elif path.is_file():
            check_file_name(p, data_format, task_type)
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
    """Files of ``folder`` with a data suffix and its ``datasets`` folders, sorted; links
    followed, each folder and file read once; hidden entries and folders longtune wrote skipped.

    The real tree of ``folder`` is walked first (sorted), then the folders that links lead to,
    in the order they were found; a folder already walked (a link back to an ancestor, a folder
    reached twice) is not walked again. A file reached twice keeps its path without links if it
    has one, else the first in sorted order.

    Raises:
        DataValidationError: a link with a data suffix leads nowhere; a ``DatasetDict`` folder
            (which split to read is the user's choice).
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
                if ".arrow" in suffixes and is_dataset_dict_folder(path):
                    raise dataset_dict_error(path)
                if is_dataset_folder(path):  # one data "file", never walked into
                    if ".arrow" in suffixes:  # read as Arrow data (auto or data.format=arrow)
                        candidates.append((linked or os.path.islink(path), path, _identity(path)))
                    continue
                if os.path.islink(path):  # walked after the real tree, if not walked by then
                    roots.append((path, True))
                elif _identity(path) not in seen_dirs:
                    seen_dirs.add(_identity(path))
                    walked.append(d)
            dirs[:] = walked
            for f in files:
                path = os.path.join(root, f)
                if f.startswith(".") or not has_suffix(f, suffixes):
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
    except TypeError as e:  # a parquet / Arrow value JSON has no type for (a date, bytes)
        raise DataValidationError(
            file, line, "wrong-type", f"{where} holds a value JSON cannot hold ({e})"
        ) from None
    except RecursionError:
        raise DataValidationError(
            file, line, "too-deeply-nested", f"{where} nests too deeply to read"
        ) from None
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
        if "tool_calls" in m and m["tool_calls"] in (None, []):  # written by many exporters
            m = {k: v for k, v in m.items() if k != "tool_calls"}
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


def _renamed(obj: dict, columns: Mapping[str, str]) -> dict:
    """``obj`` with each column of ``columns``' values read as its key (``data.columns``)."""
    if not columns:
        return obj
    out = {k: v for k, v in obj.items() if k not in columns.values()}
    for name, column in columns.items():
        if column in obj:
            out[name] = obj[column]
    return out


def _shaped(file: str, line: int, obj: dict, task_type: str) -> tuple[dict, list[str]]:
    """The record's canonical keys for its task type (``messages`` [+ ``tools``]; ``prompt`` and
    ``response``/``completion``; ``text``) and the top-level keys it ignores."""
    _check_required(file, line, obj, task_type)
    if task_type == "chat" and "messages" not in obj and "conversations" in obj:
        used = {"conversations", "system", "tools"}
        shaped = {"messages": _sharegpt_messages(file, line, obj)}
        tools = _sharegpt_tools(file, line, obj.get("tools"))
        if tools is not None:
            shaped["tools"] = tools
    elif task_type == "chat":
        used = {"messages", "tools"}
        shaped = {k: obj[k] for k in used if k in obj}
    elif task_type == "instruction" and "prompt" not in obj and "instruction" in obj:
        used = {"instruction", "input", "output"}
        instruction = _check_string(file, line, obj["instruction"], "instruction")
        extra = obj.get("input")
        if extra is not None and not isinstance(extra, str):
            raise DataValidationError(
                file, line, "wrong-type", f"input must be a string, got {type(extra).__name__}"
            )
        prompt = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
        shaped = {"prompt": prompt}
        if "output" in obj:
            shaped["response"] = obj["output"]
    elif task_type == "instruction":
        used = {"prompt", "response", "completion"}
        shaped = {k: obj[k] for k in used if k in obj}
    else:
        used = {"text"}
        shaped = {k: obj[k] for k in used if k in obj}
    return shaped, sorted(obj.keys() - used)


_REQUIRED = {
    "chat": [("messages",), ("conversations",)],
    "instruction": [("prompt", "response"), ("prompt", "completion"), ("instruction", "output")],
    "text": [("text",)],
}
"""Per task type, the sets of keys one of which a record must hold."""


def _check_required(file: str, line: int, obj: dict, task_type: str) -> None:
    if any(all(k in obj for k in keys) for keys in _REQUIRED[task_type]):
        return
    shapes = " or ".join("+".join(repr(k) for k in keys) for keys in _REQUIRED[task_type])
    raise DataValidationError(
        file,
        line,
        "missing-key",
        f"{'an' if task_type[0] in 'aeiou' else 'a'} {task_type} example needs {shapes}; found "
        f"{sorted(obj)} (data.columns maps another column name, e.g. messages=dialog)",
    )


def _sharegpt_tools(file: str, line: int, tools: Any) -> Any:
    """ShareGPT's ``tools``: a list, or the JSON text of one (as LLaMA-Factory writes it); a
    bare ``{"name", "description", "parameters"}`` (LLaMA-Factory's) is wrapped as OpenAI's
    ``{"type": "function", "function": ...}``."""
    try:
        if isinstance(tools, str):
            tools = json.loads(tools) if tools.strip() else None
    except RecursionError:
        raise DataValidationError(
            file, line, "too-deeply-nested", "tools nests too deeply to read"
        ) from None
    except json.JSONDecodeError as e:
        raise DataValidationError(
            file,
            line,
            "invalid-json",
            f"tools is a string but not JSON: {e.msg} at column {e.colno}",
        ) from None
    if not isinstance(tools, list):
        return tools
    return [
        {"type": "function", "function": t}
        if isinstance(t, dict) and "name" in t and "function" not in t
        else t
        for t in tools
    ]


def _sharegpt_messages(file: str, line: int, obj: dict) -> list[Any]:
    """ShareGPT ``conversations`` (and ``system``) as ``messages``; the roles by
    :data:`SHAREGPT_ROLES`, a ``function_call`` turn as an assistant's ``tool_calls``."""
    turns = obj["conversations"]
    if not isinstance(turns, list) or not turns:
        raise DataValidationError(
            file, line, "wrong-type", "'conversations' must be a non-empty list of {from, value}"
        )
    messages: list[Any] = []
    system = obj.get("system")
    if system is not None and not (isinstance(system, str) and not system.strip()):
        messages.append({"role": "system", "content": system})  # "" (LLaMA-Factory's none): none
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise DataValidationError(
                file,
                line,
                "wrong-type",
                f"conversations[{i}] must be an object, got {type(turn).__name__}",
            )
        missing = [k for k in _SHAREGPT_KEYS if k not in turn]
        if missing:
            raise DataValidationError(
                file,
                line,
                "missing-key",
                f"conversations[{i}] has no {missing[0]!r}; found {sorted(turn)}",
            )
        who = turn["from"]
        if not isinstance(who, str) or who not in SHAREGPT_ROLES:
            raise DataValidationError(
                file,
                line,
                "unknown-role",
                f"conversations[{i}].from={who!r}; use one of {tuple(SHAREGPT_ROLES)}",
            )
        if who == "function_call":
            calls = _sharegpt_calls(file, line, i, turn["value"])
            messages.append({"role": "assistant", "tool_calls": calls})
        else:
            messages.append({"role": SHAREGPT_ROLES[who], "content": turn["value"]})
    return messages


def _sharegpt_calls(file: str, line: int, i: int, value: Any) -> list[dict]:
    """A ``function_call`` turn's value (``{"name", "arguments"}`` or a list, as JSON text) as
    OpenAI-style ``tool_calls``."""
    where_ = f"conversations[{i}].value"
    try:
        calls = json.loads(value) if isinstance(value, str) else value
    except RecursionError:
        raise DataValidationError(
            file, line, "too-deeply-nested", f"{where_} nests too deeply to read"
        ) from None
    except json.JSONDecodeError as e:
        raise DataValidationError(
            file,
            line,
            "invalid-json",
            f'{where_} of a function_call turn must be JSON {{"name", "arguments"}}: '
            f"{e.msg} at column {e.colno}",
        ) from None
    calls = calls if isinstance(calls, list) else [calls]
    out = []
    for call in calls:
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            raise DataValidationError(
                file,
                line,
                "wrong-type",
                f'{where_} of a function_call turn must hold {{"name": ..., "arguments": '
                "...}} (or a list of them)",
            )
        arguments = call.get("arguments", call.get("parameters", {}))
        out.append({"type": "function", "function": {"name": call["name"], "arguments": arguments}})
    return out


def _examples(
    file: str,
    task_type: str,
    data_format: str = "auto",
    columns: Mapping[str, str] | None = None,
    ignored: Counter | None = None,
) -> Iterator[Record | DataValidationError]:
    """Each example of ``file``: its record, or the error of its broken rule.

    Raises:
        DataValidationError: a problem that ends the reading (a whole-file problem, an example
            too large to read, a damaged compressed stream).
    """
    kind = file_kind(file, data_format)
    row = kind in ROW_KINDS
    n = 0
    for position, value in read_rows(file, kind):
        n += 1
        if isinstance(value, DataValidationError):
            yield value
            continue
        try:
            if kind == "text":
                yield Record(file, position, text=_check_string(file, position, value, "file text"))
                continue
            if not isinstance(value, dict):
                raise DataValidationError(
                    file,
                    position,
                    "not-an-object",
                    f"expected a JSON object, got {type(value).__name__}",
                )
            obj, unused = _shaped(file, position, _renamed(value, columns or {}), task_type)
            if ignored is not None:
                ignored.update(unused)
            record = _RECORD_BUILDERS[task_type](file, position, obj)
            yield replace(record, row=True) if row else record
        except DataValidationError as e:
            yield DataValidationError(e.file, e.line, e.rule, e.detail, row) if row else e
    if n == 0:
        raise DataValidationError(file, 0, "empty-file", "the file holds no example")


def iter_records(
    file: str,
    task_type: str,
    data_format: str = "auto",
    columns: Mapping[str, str] | None = None,
) -> Iterator[Record]:
    """Yield the validated examples of one data file, raising on the first broken rule.

    Args:
        file: a data file (or ``datasets`` folder) of a format
            :mod:`longtune.data.formats` reads.
        task_type: ``chat``, ``instruction`` or ``text``.
        data_format: ``auto`` (from the file) or a forced format.
        columns: ``data.columns`` (canonical name -> the file's column).

    Yields:
        One :class:`Record` per example, in file order.

    Raises:
        DataValidationError: naming the file, the line or row, and the rule.
    """
    check_task_type(task_type)
    for example in _examples(file, task_type, data_format, columns):
        if isinstance(example, DataValidationError):
            raise example
        yield example


def validate_files(
    paths: list[str],
    task_type: str,
    all_errors: bool = False,
    *,
    data_format: str = "auto",
    columns: Mapping[str, str] | None = None,
    ignored: Counter | None = None,
) -> list[DataValidationError]:
    """Check every example of every file against the rules of ``task_type``.

    Needs no tokenizer and starts nothing: call it before loading models or process groups.

    Args:
        paths: data files or folders.
        task_type: ``chat``, ``instruction`` or ``text``.
        all_errors: collect every error (one per example at most) instead of stopping at the
            first.
        data_format: ``auto`` or a forced format (``data.format``).
        columns: ``data.columns``.
        ignored: when given, counts each top-level key the examples hold that is not read.

    Returns:
        The errors found (empty when the data is valid); at most one unless ``all_errors``.
    """
    try:
        files = expand_paths(paths, task_type, data_format)
    except DataValidationError as e:
        return [e]
    errors: list[DataValidationError] = []
    for file in files:
        try:
            for example in _examples(file, task_type, data_format, columns, ignored):
                if isinstance(example, DataValidationError):
                    errors.append(example)
                    if not all_errors:
                        return errors
        except DataValidationError as e:  # the reading stops here: one more error
            errors.append(e)
            if not all_errors:
                return errors
    return errors


def parse_columns(value: str | Mapping[str, str]) -> dict[str, str]:
    """``data.columns`` from ``"messages=dialog,text=body"`` (or a mapping), checked: each name
    one of :data:`COLUMNS`, each column a non-empty string.

    Raises:
        ValueError: naming the item and the valid names.
    """
    if isinstance(value, str):
        items = [w.strip() for w in value.split(",") if w.strip()]
        pairs = [item.partition("=") for item in items]
        bad = [item for item, (_, eq, col) in zip(items, pairs, strict=True) if not eq or not col]
        if bad:
            raise ValueError(f"{bad[0]!r} is not NAME=COLUMN, e.g. messages=dialog")
        value = {name.strip(): col.strip() for name, _, col in pairs}
    if not isinstance(value, Mapping):
        raise ValueError(f"expected NAME=COLUMN pairs, got {type(value).__name__}")
    for name, column in value.items():
        if name not in COLUMNS:
            raise ValueError(
                f"{name!r} is not a column longtune reads; one of {', '.join(COLUMNS)}"
            )
        if not isinstance(column, str) or not column:
            raise ValueError(f"{name}={column!r}: the column name must be a non-empty string")
    return dict(value)


def ignored_keys_summary(ignored: Counter) -> str:
    """``'meta' in 200 examples, 'id' in 12`` for the log."""
    return ", ".join(f"{k!r} in {n} example{'s' * (n != 1)}" for k, n in ignored.most_common())


__all__ += [
    "COLUMNS",
    "SHAREGPT_ROLES",
    "ignored_keys_summary",
    "parse_columns",
    "validate_files",
    "where",
]
