"""Every validation rule: a bad file, an error naming file, line and rule, and nothing started."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from data_fixtures import tiny_tokenizer_dir, write_jsonl

import longtune.data.tokenize as tokenize_mod
from longtune.data import (
    DataValidationError,
    build_packed_dataset,
    validate_command,
    validate_files,
)
from longtune.data.validation import expand_paths

GOOD_CHAT = {
    "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
}


def chat(*pairs: tuple[str, object]) -> dict:
    return {"messages": [{"role": r, "content": c} for r, c in pairs]}


# (task type, bad line as written, rule)
BAD_LINES = [
    ("chat", '{"messages": [', "invalid-json"),
    ("chat", "[1, 2]", "not-an-object"),
    ("chat", {"conversation": []}, "missing-key"),
    ("chat", {"messages": [], "extra": 1}, "wrong-type"),  # extra keys are ignored
    ("chat", {"messages": "hello"}, "wrong-type"),
    ("chat", {"messages": [{"role": "user"}]}, "missing-key"),
    ("chat", {"messages": [{"role": "user", "content": "a", "name": "x"}]}, "unknown-key"),
    ("chat", chat(("user", 3), ("assistant", "a")), "wrong-type"),
    ("chat", chat(("user", "q"), ("assistant", "  ")), "empty-content"),
    ("chat", chat(("human", "q"), ("assistant", "a")), "unknown-role"),
    ("chat", chat(("user", "q"), ("system", "s"), ("assistant", "a")), "system-not-first"),
    ("chat", chat(("user", "q"), ("user", "q2"), ("assistant", "a")), "roles-not-alternating"),
    (
        "chat",
        chat(
            ("assistant", "a"),
        ),
        "roles-not-alternating",
    ),
    ("chat", chat(("user", "q"), ("tool", "t"), ("assistant", "a")), "roles-not-alternating"),
    ("chat", chat(("user", "q"), ("assistant", "a"), ("user", "q2")), "last-not-assistant"),
    ("chat", chat(("system", "s"), ("user", "q")), "last-not-assistant"),
    (
        "chat",
        chat(("user", [{"type": "image_url", "image_url": {"url": "x"}}]), ("assistant", "a")),
        "unsupported-content-part",
    ),
    (
        "chat",
        {
            "messages": [
                {"role": "user", "content": "q"},
                {
                    "role": "assistant",
                    "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}],
                },
            ]
        },
        "invalid-tool-arguments",
    ),
    ("chat", {"tools": "f", "messages": GOOD_CHAT["messages"]}, "wrong-type"),
    ("instruction", {"prompt": "p"}, "missing-key"),
    ("instruction", {"prompt": "p", "response": "r", "completion": "c"}, "unknown-key"),
    ("instruction", {"prompt": "", "response": "r"}, "empty-content"),
    ("instruction", {"prompt": "p", "answer": "r"}, "missing-key"),
    ("text", {"text": ""}, "empty-content"),
    ("text", {"body": "x"}, "missing-key"),
]

GOOD = {
    "chat": GOOD_CHAT,
    "instruction": {"prompt": "p", "completion": "c"},
    "text": {"text": "some text"},
}


def make_bad_file(tmp_path, task_type: str, bad) -> tuple[str, int]:
    """Two good lines, a blank line, then the bad one on line 4."""
    path = write_jsonl(tmp_path / "data.jsonl", [GOOD[task_type], GOOD[task_type], "", bad])
    return str(path), 4


@pytest.fixture
def no_tokenizer(monkeypatch):
    """Fail loudly if anything tries to load a tokenizer."""

    def forbidden(*args, **kwargs):
        raise AssertionError("a tokenizer was loaded before validation finished")

    monkeypatch.setattr(tokenize_mod, "load_tokenizer", forbidden)


@pytest.mark.parametrize(("task_type", "bad", "rule"), BAD_LINES)
def test_rule_names_file_line_and_rule(tmp_path, no_tokenizer, task_type, bad, rule):
    import torch.distributed as dist

    path, line = make_bad_file(tmp_path, task_type, bad)
    errors = validate_files([path], task_type)
    assert len(errors) == 1
    assert (errors[0].file, errors[0].line, errors[0].rule) == (path, line, rule)
    assert str(errors[0]).startswith(f"{path}:{line}: {rule}: ")
    # The trainer's entry point raises the same error before loading anything.
    with pytest.raises(DataValidationError, match=f"^{path}:{line}: {rule}: "):
        build_packed_dataset([path], tmp_path / "no-model", task_type, 64, cache_dir=tmp_path)
    assert not dist.is_initialized()
    assert not (tmp_path / "no-model").exists()


def test_invalid_utf8_jsonl_and_txt(tmp_path, no_tokenizer):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    (err,) = validate_files([str(bad)], "text")
    assert (err.file, err.line, err.rule) == (str(bad), 2, "invalid-utf8")
    txt = tmp_path / "doc.txt"
    txt.write_bytes(b"line one\nline two\nbad \xff byte\n")
    (err,) = validate_files([str(txt)], "text")
    assert (err.file, err.line, err.rule) == (str(txt), 3, "invalid-utf8")
    with pytest.raises(DataValidationError, match="invalid-utf8"):
        build_packed_dataset([str(txt)], tmp_path, "text", 64, cache_dir=tmp_path)


def test_file_level_rules(tmp_path, no_tokenizer):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    (err,) = validate_files([str(empty)], "chat")
    assert (err.line, err.rule) == (0, "empty-file")
    # A whole-file problem has no line: "FILE: rule: detail", never "FILE:0:".
    assert str(err) == f"{empty}: empty-file: the file holds no example"
    (err,) = validate_files([str(tmp_path / "missing.jsonl")], "chat")
    assert str(err) == f"{tmp_path / 'missing.jsonl'}: file-not-found: no such file or folder"
    csv = tmp_path / "data.csv"
    csv.write_text("a,b\n")
    (err,) = validate_files([str(csv)], "chat")
    assert err.rule == "unsupported-file-type" and ".csv" in str(err)
    folder = tmp_path / "folder"
    folder.mkdir()
    (err,) = validate_files([str(folder)], "chat")
    assert err.rule == "no-data-files"
    (folder / "a.txt").write_text("   ")
    (err,) = validate_files([str(folder)], "text")
    assert (err.file, err.line, err.rule) == (str(folder / "a.txt"), 1, "empty-content")
    with pytest.raises(ValueError, match="task_type='dialog'"):
        validate_files([str(folder)], "dialog")


def test_all_errors_lists_every_bad_line(tmp_path):
    rows = [
        GOOD_CHAT,
        "{oops",
        GOOD_CHAT,
        chat(("user", "q")),
        chat(("bot", "x"), ("assistant", "a")),
    ]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    first = validate_files([str(path)], "chat")
    assert [(e.line, e.rule) for e in first] == [(2, "invalid-json")]
    every = validate_files([str(path)], "chat", all_errors=True)
    assert [(e.line, e.rule) for e in every] == [
        (2, "invalid-json"),
        (4, "last-not-assistant"),
        (5, "unknown-role"),
    ]


def test_valid_data_of_every_kind(tmp_path):
    chat_file = write_jsonl(
        tmp_path / "c.jsonl",
        [
            chat(
                ("system", "s"),
                ("user", "q"),
                ("assistant", "a"),
                ("tool", "t"),
                ("assistant", "b"),
            )
        ],
    )
    assert validate_files([str(chat_file)], "chat") == []
    inst = write_jsonl(
        tmp_path / "i.jsonl", [GOOD["instruction"], {"prompt": "p", "response": "r"}]
    )
    assert validate_files([str(inst)], "instruction") == []
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text("hello")
    write_jsonl(folder / "b.jsonl", [GOOD["text"]])
    assert validate_files([str(folder)], "text") == []


def test_validation_imports_no_tokenizer_library(tmp_path):
    """validate_files is pure: transformers is never imported (subprocess, fresh interpreter)."""
    path, _ = make_bad_file(tmp_path, "chat", chat(("user", "q")))
    code = textwrap.dedent(
        f"""
        import sys
        from longtune.data import validate_files
        (err,) = validate_files([{path!r}], "chat")
        assert err.rule == "last-not-assistant", err
        assert "transformers" not in sys.modules and "tokenizers" not in sys.modules
        import torch.distributed as dist
        assert not dist.is_initialized()
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"


def test_tool_role_unsupported_by_template(tmp_path):
    model = tiny_tokenizer_dir(tmp_path / "tok")
    cfg = model / "chat_template.jinja"
    template = (
        "{% for m in messages %}{% if m['role'] != 'tool' %}"
        "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
        "{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    cfg.write_text(template)
    row = chat(("user", "q"), ("assistant", "call"), ("tool", "result 42"), ("assistant", "a"))
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD_CHAT, row])
    with pytest.raises(DataValidationError, match=rf"^{path}:2: tool-role-unsupported: "):
        build_packed_dataset([str(path)], model, "chat", 64, cache_dir=tmp_path / "c")


def test_validate_command(tmp_path, capsys):
    model = tiny_tokenizer_dir(tmp_path / "tok")
    bad = write_jsonl(tmp_path / "bad.jsonl", [GOOD_CHAT, "{x", chat(("user", "q"))])
    assert validate_command([str(bad)], str(model), context_length=64) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2: invalid-json" in err and ":3:" not in err
    assert len(err.splitlines()) == 1  # one error, one line
    assert validate_command([str(bad)], str(model), context_length=64, all_errors=True) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2: invalid-json" in err and f"{bad}:3: last-not-assistant" in err

    long_row = chat(("user", "q" * 100), ("assistant", "a" * 100))
    good = write_jsonl(tmp_path / "good.jsonl", [GOOD_CHAT] * 5 + [long_row])
    args = dict(context_length=128, cache_dir=str(tmp_path / "c"))
    assert validate_command([str(good)], str(model), **args) == 0
    out = capsys.readouterr().out
    for word in (
        "examples            6",
        "supervised tokens",
        "packed sequences",
        "padding fraction",
    ):
        assert word in out
    assert "over 128" in out and "1 (truncate: 1 truncated" in out
    assert validate_command([str(good)], str(model), overlength="drop", **args) == 0
    assert "1 (drop: 1 dropped)" in capsys.readouterr().out


def test_links_in_a_data_folder_are_followed(tmp_path):
    """A linked sub-folder and a linked file are data like the real ones, in sorted order."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    write_jsonl(elsewhere / "b.jsonl", [GOOD_CHAT])
    write_jsonl(tmp_path / "c.jsonl", [GOOD_CHAT])
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "a.jsonl", [GOOD_CHAT])
    (data / "linked").symlink_to(elsewhere)
    (data / "z.jsonl").symlink_to(tmp_path / "c.jsonl")
    want = [str(data / "a.jsonl"), str(data / "linked" / "b.jsonl"), str(data / "z.jsonl")]
    assert expand_paths([str(data)], "chat") == want
    assert validate_files([str(data)], "chat") == []


def test_link_loops_and_folders_reached_twice_are_read_once(tmp_path):
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    write_jsonl(data / "a.jsonl", [GOOD_CHAT])
    write_jsonl(data / "sub" / "b.jsonl", [GOOD_CHAT])
    (data / "sub" / "up").symlink_to(data)  # back to an ancestor: a loop
    (data / "again").symlink_to(data / "sub")  # a folder also reached without the link
    (data / "sub" / "same.jsonl").symlink_to(data / "a.jsonl")  # a file reached twice
    outside = tmp_path / "outside"
    outside.mkdir()
    write_jsonl(outside / "e.jsonl", [GOOD_CHAT])
    (outside / "self").symlink_to(outside)  # a loop inside a linked folder
    (data / "x").symlink_to(outside)
    (data / "y").symlink_to(outside)  # the same linked folder twice
    (data / "b").mkdir()  # a link to a file that comes before the file in sorted order
    (data / "b" / "first.jsonl").symlink_to(data / "c" / "real.jsonl")
    (data / "c").mkdir()
    write_jsonl(data / "c" / "real.jsonl", [GOOD_CHAT])
    # Each file once, under its path without links where it has one, else the first link's.
    assert expand_paths([str(data)], "chat") == [
        str(data / "a.jsonl"),
        str(data / "c" / "real.jsonl"),
        str(data / "sub" / "b.jsonl"),
        str(data / "x" / "e.jsonl"),
    ]


def test_a_broken_link_in_a_data_folder_is_one_line(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "a.jsonl", [GOOD_CHAT])
    (data / "gone.jsonl").symlink_to(tmp_path / "deleted.jsonl")
    (err,) = validate_files([str(data)], "chat")
    assert str(err) == (
        f"{data / 'gone.jsonl'}: file-not-found: a link to {tmp_path / 'deleted.jsonl'}, "
        "which does not exist; fix or remove the link"
    )


def test_hidden_entries_of_a_data_folder_are_skipped(tmp_path):
    data = tmp_path / "data"
    for hidden in (".ipynb_checkpoints", ".git", ".cache"):
        (data / hidden).mkdir(parents=True)
        write_jsonl(data / hidden / "notes.jsonl", ["not data"])
    write_jsonl(data / ".hidden.jsonl", ["{not data"])
    write_jsonl(data / "a.jsonl", [GOOD_CHAT])
    (data / ".linked").symlink_to(data / ".git")
    assert expand_paths([str(data)], "chat") == [str(data / "a.jsonl")]
    assert validate_files([str(data)], "chat") == []
    # Named explicitly, a hidden file is read.
    hidden = str(data / ".hidden.jsonl")
    assert expand_paths([hidden], "chat") == [hidden]
    (err,) = validate_files([hidden], "chat")
    assert (err.file, err.line, err.rule) == (hidden, 1, "invalid-json")
