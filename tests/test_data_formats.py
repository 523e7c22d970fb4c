"""Data as users have it: one set of conversations written in every format and record shape
longtune reads gives the same tokens; columns renamed by ``data.columns``; folders of mixed
formats; bad records named by file and line or row in every format."""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path

import pytest
from data_fixtures import chat_rows, tiny_tokenizer_dir, write_jsonl

from longtune.data import build_packed_dataset, validate_files
from longtune.data.tokenize import STORE_ARRAYS, tokenize_files
from longtune.data.validation import expand_paths, iter_records, parse_columns

N = 200
TOKEN_ARRAYS = ("ids", "mask", "offsets")


def as_parts(rows: list[dict]) -> list[dict]:
    """OpenAI content parts: each content split in two text parts (joined back with "")."""
    out = []
    for row in rows:
        msgs = []
        for m in row["messages"]:
            c = m["content"]
            half = len(c) // 2
            msgs.append(
                {
                    "role": m["role"],
                    "content": [
                        {"type": "text", "text": c[:half]},
                        {"type": "text", "text": c[half:]},
                    ],
                }
            )
        out.append({"messages": msgs, "id": len(out)})
    return out


def as_sharegpt(rows: list[dict]) -> list[dict]:
    who = {"system": "system", "user": "human", "assistant": "gpt"}
    return [
        {"conversations": [{"from": who[m["role"]], "value": m["content"]} for m in r["messages"]]}
        for r in rows
    ]


def write_zst(path: Path, rows: list[dict]) -> Path:
    import zstandard

    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
    path.write_bytes(zstandard.ZstdCompressor().compress(text))
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=64)
    return path


def write_dataset(path: Path, rows: list[dict]) -> Path:
    import datasets

    datasets.disable_progress_bars()
    datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return chat_rows(N, seed=11, max_words=12)


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Path:
    return tiny_tokenizer_dir(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def written(tmp_path_factory, rows) -> dict[str, Path]:
    """The same conversations in every format and shape."""
    root = tmp_path_factory.mktemp("formats")
    files = {
        "jsonl messages": write_jsonl(root / "messages.jsonl", rows),
        "jsonl content parts": write_jsonl(root / "parts.jsonl", as_parts(rows)),
        "jsonl sharegpt": write_jsonl(root / "sharegpt.jsonl", as_sharegpt(rows)),
        "json array": root / "array.json",
        "jsonl.gz": root / "messages.jsonl.gz",
        "jsonl.zst": write_zst(root / "messages.jsonl.zst", rows),
        "parquet": write_parquet(root / "messages.parquet", rows),
        "parquet sharegpt": write_parquet(root / "sharegpt.parquet", as_sharegpt(rows)),
        "save_to_disk": write_dataset(root / "saved", rows),
    }
    files["json array"].write_text(json.dumps(rows, indent=1, ensure_ascii=False))
    with gzip.open(files["jsonl.gz"], "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return files


def store_bytes(store) -> dict[str, bytes]:
    return {name: (store.path / f"{name}.npy").read_bytes() for name in TOKEN_ARRAYS}


def test_every_format_and_shape_gives_byte_identical_token_stores(written, tok, tmp_path):
    stores = {
        name: tokenize_files([str(path)], tok, "chat", cache_dir=tmp_path / "cache")[0]
        for name, path in written.items()
    }
    reference = store_bytes(stores["jsonl messages"])
    assert len(stores["jsonl messages"].offsets) == N + 1
    for name, store in stores.items():
        assert store_bytes(store) == reference, name
    # Where each example came from: JSONL lines from 1, rows of the others from 0.
    assert stores["jsonl.zst"].where(0) == f"{written['jsonl.zst']}:1"
    assert stores["parquet"].where(5) == f"{written['parquet']}: row 5"
    assert stores["save_to_disk"].where(N - 1) == f"{written['save_to_disk']}: row {N - 1}"
    assert sorted(STORE_ARRAYS) == sorted({*TOKEN_ARRAYS, "lines"})


def test_a_folder_of_every_format_reads_each_once(written, tok, tmp_path):
    folder = written["jsonl messages"].parent
    files = expand_paths([str(folder)], "chat")
    assert sorted(Path(f).name for f in files) == sorted(p.name for p in written.values())
    ds = build_packed_dataset([str(folder)], tok, "chat", 256, cache_dir=tmp_path / "c")
    assert ds.stats.documents == N * len(written)


def test_columns_renamed_by_data_columns(rows, tok, tmp_path):
    renamed = [{"dialog": r["messages"], "messages": "not read"} for r in rows[:20]]
    plain = write_jsonl(tmp_path / "plain.jsonl", rows[:20])
    other = write_parquet(tmp_path / "dialog.parquet", renamed)
    columns = parse_columns("messages=dialog")
    assert validate_files([str(other)], "chat", columns=columns) == []
    (a,) = tokenize_files([str(plain)], tok, "chat", cache_dir=tmp_path / "c")
    (b,) = tokenize_files([str(other)], tok, "chat", cache_dir=tmp_path / "c", columns=columns)
    assert store_bytes(a) == store_bytes(b)
    with pytest.raises(ValueError, match="'dialogue' is not a column longtune reads; one of"):
        parse_columns("dialogue=messages")
    (err,) = validate_files([str(other)], "chat")  # without the mapping: the string is read
    assert str(err).startswith(f"{other}: row 0: wrong-type: 'messages' must be")


def test_instruction_shapes_alpaca_and_prompt_response_agree(tok, tmp_path):
    alpaca = [
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
        {"instruction": "Say hi.", "input": "", "output": "hi"},
        {"instruction": "Name a colour.", "output": "blue", "history": []},
    ]
    plain = [
        {"prompt": "Add the numbers.\n\n2 and 3", "response": "5"},
        {"prompt": "Say hi.", "completion": "hi"},
        {"prompt": "Name a colour.", "response": "blue"},
    ]
    a = write_jsonl(tmp_path / "alpaca.jsonl", alpaca)
    p = write_jsonl(tmp_path / "plain.jsonl", plain)
    got = [r.messages for r in iter_records(str(a), "instruction")]
    assert got == [r.messages for r in iter_records(str(p), "instruction")]
    (sa,) = tokenize_files([str(a)], tok, "instruction", cache_dir=tmp_path / "c")
    (sp,) = tokenize_files([str(p)], tok, "instruction", cache_dir=tmp_path / "c")
    assert store_bytes(sa) == store_bytes(sp)


def test_sharegpt_roles_system_and_function_calls_map_to_messages(tmp_path):
    row = {
        "system": "Be brief.",
        "tools": json.dumps([{"type": "function", "function": {"name": "weather"}}]),
        "conversations": [
            {"from": "human", "value": "Weather in Paris?"},
            {
                "from": "function_call",
                "value": json.dumps({"name": "weather", "arguments": {"city": "Paris"}}),
            },
            {"from": "observation", "value": "21 C"},
            {"from": "gpt", "value": "21 C and clear."},
        ],
    }
    from longtune.data.validation import _sharegpt_messages, _sharegpt_tools

    msgs = _sharegpt_messages("f", 1, row)
    assert msgs == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "tool_calls": [
                {
                    "type": "function",
                    "function": {"name": "weather", "arguments": {"city": "Paris"}},
                }
            ],
        },
        {"role": "tool", "content": "21 C"},
        {"role": "assistant", "content": "21 C and clear."},
    ]
    assert _sharegpt_tools("f", 1, row["tools"])[0]["function"]["name"] == "weather"
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"conversations": [{"from": "bot", "value": "x"}]}])
    (err,) = validate_files([str(bad)], "chat")
    assert str(err).startswith(f"{bad}:1: unknown-role: conversations[0].from='bot'; use one of")


def test_ignored_keys_are_counted_in_the_log(rows, tok, tmp_path, caplog):
    extra = [{**r, "id": i, "source": "web"} for i, r in enumerate(rows[:10])]
    path = write_jsonl(tmp_path / "extra.jsonl", extra)
    with caplog.at_level(logging.INFO, logger="longtune.data.packing"):
        build_packed_dataset([str(path)], tok, "chat", 256, cache_dir=tmp_path / "c")
    assert "data keys not read (ignored): 'id' in 10 examples, 'source' in 10 examples" in (
        caplog.text
    )


def test_a_forced_format_reads_any_name(rows, tmp_path):
    odd = tmp_path / "export.data"
    odd.write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    (err,) = validate_files([str(odd)], "chat")
    assert err.rule == "unsupported-file-type" and "data.format" in str(err)
    assert validate_files([str(odd)], "chat", data_format="jsonl") == []


def test_a_dataset_dict_folder_is_refused_naming_its_splits(rows, tmp_path):
    import datasets

    datasets.disable_progress_bars()
    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(rows[:4]),
            "test": datasets.Dataset.from_list(rows[4:6]),
        }
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    (err,) = validate_files([str(tmp_path / "dd")], "chat")
    assert err.rule == "dataset-dict" and "['test', 'train']" in str(err)
    assert validate_files([str(tmp_path / "dd" / "train")], "chat") == []


# ---------------------------------------------------------------- bad records ------------


def bad_rows(rows: list[dict]) -> list[dict]:
    """Three good conversations, then one whose last message is the user's (row 3)."""
    bad = {"messages": [{"role": "user", "content": "q"}]}
    return [*rows[:3], bad]


@pytest.mark.parametrize("fmt", ["jsonl.gz", "jsonl.zst", "json array", "parquet", "save_to_disk"])
def test_a_bad_record_is_named_by_line_or_row_in_every_format(rows, tmp_path, fmt):
    data = bad_rows(rows)
    path = {
        "jsonl.gz": tmp_path / "d.jsonl.gz",
        "jsonl.zst": tmp_path / "d.jsonl.zst",
        "json array": tmp_path / "d.json",
        "parquet": tmp_path / "d.parquet",
        "save_to_disk": tmp_path / "saved",
    }[fmt]
    if fmt == "jsonl.gz":
        with gzip.open(path, "wt") as f:
            f.writelines(json.dumps(r) + "\n" for r in data)
    elif fmt == "jsonl.zst":
        write_zst(path, data)
    elif fmt == "json array":
        path.write_text(json.dumps(data))
    elif fmt == "parquet":
        write_parquet(path, data)
    else:
        write_dataset(path, data)
    (err,) = validate_files([str(path)], "chat")
    where = f"{path}:4" if fmt.startswith("jsonl") else f"{path}: row 3"
    assert str(err).startswith(f"{where}: last-not-assistant: the last message is 'user'"), err
    assert "\n" not in str(err)


def test_a_cut_compressed_file_is_one_line(rows, tmp_path):
    import zstandard

    whole = "".join(json.dumps(r) + "\n" for r in rows).encode()
    cut = tmp_path / "cut.jsonl.zst"
    cut.write_bytes(zstandard.ZstdCompressor().compress(whole)[:-50])
    (err,) = validate_files([str(cut)], "chat")
    assert err.rule in ("damaged-file", "invalid-json"), err
    assert "\n" not in str(err)


def test_a_sharegpt_tool_conversation_tokenizes_as_its_openai_form(tmp_path):
    """ShareGPT function_call / observation turns (LLaMA-Factory's shape, tools as JSON text)
    give the same tokens as the same conversation in OpenAI's messages with tool_calls, through
    a template that renders tools (Llama 3.1's format)."""
    from data_fixtures import llama31_tools_tokenizer_dir

    tool = {"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}
    arguments = {"city": "Paris", "unit": "C"}
    sharegpt = {
        "system": "Be brief.",
        "tools": json.dumps([tool]),
        "conversations": [
            {"from": "human", "value": "Weather in Paris?"},
            {
                "from": "function_call",
                "value": json.dumps({"name": "weather", "arguments": arguments}),
            },
            {"from": "observation", "value": '{"temp": 21}'},
            {"from": "gpt", "value": "21 degrees."},
        ],
    }
    openai = {
        "tools": [tool],
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "tool_calls": [
                    {"type": "function", "function": {"name": "weather", "arguments": arguments}}
                ],
            },
            {"role": "tool", "content": '{"temp": 21}'},
            {"role": "assistant", "content": "21 degrees."},
        ],
    }
    tok = llama31_tools_tokenizer_dir()
    a = write_jsonl(tmp_path / "sharegpt.jsonl", [sharegpt])
    b = write_jsonl(tmp_path / "openai.jsonl", [openai])
    (sa,) = tokenize_files([str(a)], tok, "chat", cache_dir=tmp_path / "c")
    (sb,) = tokenize_files([str(b)], tok, "chat", cache_dir=tmp_path / "c")
    assert store_bytes(sa) == store_bytes(sb)
    assert int(sa.mask.sum()) > 0


def test_the_config_knows_the_same_column_names_as_validation():
    import typing

    from longtune.data.validation import COLUMNS
    from longtune.train.config import ColumnName

    assert typing.get_args(ColumnName) == COLUMNS


def test_tokenizing_in_processes_writes_the_same_store(rows, tok, tmp_path):
    from longtune.data import tokenize

    path = write_jsonl(tmp_path / "many.jsonl", rows)
    (one,) = tokenize_files([str(path)], tok, "chat", cache_dir=tmp_path / "a", processes=1)
    old = tokenize.BATCH_SIZE
    tokenize.BATCH_SIZE = 16  # several batches in flight in each process
    try:
        (two,) = tokenize_files([str(path)], tok, "chat", cache_dir=tmp_path / "b", processes=2)
        assert store_bytes(one) == store_bytes(two)
        # A template refusing an example in a process: the same one line, naming the row.
        bad = write_parquet(
            tmp_path / "bad.parquet",
            [
                *rows[:40],
                {
                    "messages": [
                        {"role": "user", "content": "q"},
                        {"role": "assistant", "content": "a"},
                    ]
                },
            ],
        )
        refusing = tmp_path / "refusing"
        refusing.mkdir()
        for f in Path(tok).iterdir():
            (refusing / f.name).write_bytes(f.read_bytes())
        config = json.loads((refusing / "tokenizer_config.json").read_text())
        config["chat_template"] = (
            "{% for m in messages %}{% if m['content'] == 'q' %}{{ raise_exception('no q') }}"
            "{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
        )
        (refusing / "tokenizer_config.json").write_text(json.dumps(config))
        (refusing / "chat_template.jinja").unlink(missing_ok=True)
        with pytest.raises(Exception) as raised:
            tokenize_files([str(bad)], refusing, "chat", cache_dir=tmp_path / "c", processes=2)
        assert str(raised.value).startswith(f"{bad}: row 40: chat-template-error:"), raised.value
    finally:
        tokenize.BATCH_SIZE = old


def test_a_forced_format_reads_only_its_files_of_a_folder(written):
    folder = written["jsonl messages"].parent
    names = {
        fmt: sorted(Path(f).name for f in expand_paths([str(folder)], "chat", fmt))
        for fmt in ("parquet", "arrow", "jsonl")
    }
    assert names["parquet"] == ["messages.parquet", "sharegpt.parquet"]
    assert names["arrow"] == ["saved"]
    assert "saved" not in names["jsonl"] and "messages.jsonl.zst" in names["jsonl"]


def test_bad_input_found_in_review_is_one_line(tmp_path):
    """A huge parquet row, a syntax error inside a JSON array, deep or odd ShareGPT values,
    non-JSON values in columnar tool arguments: each one line, never a traceback."""
    from datetime import datetime

    huge = write_parquet(tmp_path / "huge.parquet", [{"text": "word " * (2 * 2**20)}])
    (err,) = validate_files([str(huge)], "text")
    assert str(err).startswith(f"{huge}: row 0: example-too-large: 10.0 MiB"), err

    good = {"prompt": "p", "response": "r"}
    broken = tmp_path / "broken.json"
    rows = [json.dumps(good), '{"prompt": tru, "response": "r"}'] + [json.dumps(good)] * 9000
    broken.write_text("[" + ",".join(rows) + "]")
    (err,) = validate_files([str(broken)], "instruction")
    assert str(err).startswith(f"{broken}: row 1: invalid-json: Expecting value (character 12"), err

    deep = "[" * 100_000 + "]" * 100_000
    cases = {
        "deep call": {
            "conversations": [
                {"from": "human", "value": "q"},
                {"from": "function_call", "value": deep},
            ]
        },
        "deep tools": {
            "tools": deep,
            "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}],
        },
        "list from": {
            "conversations": [{"from": ["human"], "value": "q"}, {"from": "gpt", "value": "a"}]
        },
    }
    for name, row in cases.items():
        path = write_jsonl(tmp_path / f"{name.replace(' ', '_')}.jsonl", [row])
        (err,) = validate_files([str(path)], "chat")
        assert err.rule in ("too-deeply-nested", "unknown-role"), (name, err)

    dated = write_parquet(
        tmp_path / "dated.parquet",
        [
            {
                "messages": [
                    {"role": "user", "content": "when?"},
                    {
                        "role": "assistant",
                        "tool_calls": [
                            {
                                "type": "function",
                                "function": {
                                    "name": "f",
                                    "arguments": {"at": datetime(2024, 1, 1)},
                                },
                            }
                        ],
                    },
                    {"role": "tool", "content": "ok"},
                    {"role": "assistant", "content": "done"},
                ]
            }
        ],
    )
    (err,) = validate_files([str(dated)], "chat")
    assert err.rule == "wrong-type" and "JSON cannot hold" in str(err), err


def test_llama_factory_tools_and_empty_tool_calls_are_read(tmp_path):
    """LLaMA-Factory's bare tool objects are wrapped in OpenAI's shape; ``tool_calls: []`` or
    null (as many exporters write them) is no call."""
    from longtune.data.validation import iter_records

    bare = [{"name": "bmi", "description": "BMI", "parameters": {"type": "object"}}]
    rows = [
        {
            "tools": json.dumps(bare),
            "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}],
        },
        {
            "messages": [
                {"role": "user", "content": "q", "tool_calls": None},
                {"role": "assistant", "content": "a", "tool_calls": []},
            ]
        },
    ]
    path = write_jsonl(tmp_path / "lf.jsonl", rows)
    first, second = iter_records(str(path), "chat")
    assert first.tools == [{"type": "function", "function": bare[0]}]
    assert second.messages == [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a"},
    ]
