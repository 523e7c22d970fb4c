"""Tool-calling conversations (OpenAI shape): validation, and loss masks that cover the calls,
checked against Meta's own Llama 3.1 encoder; SmolLM2's template refuses them by name."""

from __future__ import annotations

import json

import numpy as np
import pytest
from data_fixtures import (
    LLAMA31_TOOLS_TEMPLATE,
    LLAMA31_TOOLS_TEMPLATE_HF_SHAPE,
    llama31_tools_text,
    llama31_tools_tokenizer_dir,
    tiny_tokenizer_dir,
    write_jsonl,
)
from test_data_golden import expected_labels, labels_of, meta_dialog

from longtune.data import (
    IGNORE_INDEX,
    DataValidationError,
    build_packed_dataset,
    tokenize_files,
    validate_command,
    validate_files,
)
from longtune.data.validation import iter_records

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
CONVERT = {
    "type": "function",
    "function": {"name": "convert_currency", "description": "Convert an amount"},
}
SEARCH = {"type": "function", "function": {"name": "search", "description": "Recherche — 検索"}}


def call(name: str, arguments, id: str | None = None) -> dict:
    c = {"type": "function", "function": {"name": name, "arguments": arguments}}
    return c | ({"id": id} if id else {})


EXAMPLES = [
    # One call (arguments as a JSON string, as OpenAI writes them), its result, an answer.
    {
        "tools": [WEATHER],
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What's the weather in Paris?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [call("get_weather", '{"city": "Paris"}', "call_1")],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 21, "sky": "clear"}'},
            {"role": "assistant", "content": "It is 21 °C and clear in Paris."},
        ],
    },
    # Two calls in sequence, each answered; content given as text parts.
    {
        "tools": [CONVERT],
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Convert 100 USD to EUR, "},
                    {"type": "text", "text": "then that to JPY."},
                ],
            },
            {
                "role": "assistant",
                "tool_calls": [
                    call("convert_currency", {"amount": 100, "from": "USD", "to": "EUR"})
                ],
            },
            {"role": "tool", "name": "convert_currency", "content": "92.1"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    call("convert_currency", {"amount": 92.1, "from": "EUR", "to": "JPY"})
                ],
            },
            {"role": "tool", "content": "15003"},
            {"role": "assistant", "content": "100 USD is 92.10 EUR, which is 15003 JPY."},
        ],
    },
    # Unicode arguments.
    {
        "tools": [SEARCH],
        "messages": [
            {"role": "user", "content": "Cherche « café » à Zürich, puis 東京 🙂"},
            {
                "role": "assistant",
                "tool_calls": [call("search", {"query": "café Zürich 東京", "mood": "🙂"})],
            },
            {"role": "tool", "content": "Café Grüner — 3 résultats"},
            {"role": "assistant", "content": "J'ai trouvé « Café Grüner » ☕."},
        ],
    },
    # Nested arguments, no `tools` list, ending on the call (the last assistant turn).
    {
        "messages": [
            {"role": "user", "content": "Book the standup with Ann tomorrow at 9:30."},
            {"role": "assistant", "content": "Sure."},
            {"role": "user", "content": "And remind me."},
            {
                "role": "assistant",
                "tool_calls": [
                    call(
                        "create_event",
                        {
                            "title": "Standup",
                            "attendees": [{"name": "Ann", "email": "ann@example.org"}],
                            "when": {"day": "2025-05-01", "time": {"h": 9, "m": 30}},
                            "remind": True,
                            "room": None,
                            "weight": 1.5,
                        },
                    )
                ],
            },
        ],
    },
]


# ---------------------------------------------------------------- validation --------------


def records_of(tmp_path, rows: list) -> list:
    path = write_jsonl(tmp_path / "tools.jsonl", rows)
    return list(iter_records(str(path), "chat"))


def test_tool_examples_are_valid_and_normalized(tmp_path):
    records = records_of(tmp_path, EXAMPLES)
    first, second = records[0], records[1]
    assert first.tools == [WEATHER]
    assert first.messages[2] == {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "type": "function",
                "id": "call_1",
                "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
            }
        ],
    }
    assert first.messages[3]["tool_call_id"] == "call_1"
    assert second.messages[0]["content"] == "Convert 100 USD to EUR, then that to JPY."
    assert second.messages[2]["name"] == "convert_currency"
    assert second.messages[1]["content"] == ""  # no content key at all
    assert records[3].tools is None
    for r in records:  # plain data, as the token store and the UI want it
        assert json.loads(json.dumps(r.messages)) == r.messages


def test_empty_tools_list_is_no_tools(tmp_path):
    row = {"tools": [], "messages": EXAMPLES[3]["messages"]}
    assert records_of(tmp_path, [row])[0].tools is None


def with_message(i: int, **changes) -> dict:
    """EXAMPLES[0] with message ``i`` changed (a value None removes the key)."""
    row = json.loads(json.dumps(EXAMPLES[0]))
    for key, value in changes.items():
        if value is None:
            row["messages"][i].pop(key, None)
        else:
            row["messages"][i][key] = value
    return row


BAD_TOOL_LINES = [
    (
        with_message(
            1,
            content=[
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": "http://x/y.png"}},
            ],
        ),
        "unsupported-content-part",
        "messages[1].content[1] has type 'image_url'; only 'text' parts are read",
    ),
    (
        with_message(1, content=[{"type": "input_audio", "input_audio": {}}]),
        "unsupported-content-part",
        "messages[1].content[0] has type 'input_audio'; only 'text' parts are read",
    ),
    (with_message(1, content=[{"type": "text", "text": 3}]), "wrong-type", "content[0].text"),
    (with_message(1, content=[]), "empty-content", "messages[1].content is empty"),
    (
        with_message(2, tool_calls=[call("get_weather", '{"city": "Paris"')]),
        "invalid-tool-arguments",
        "messages[2].tool_calls[0].function.arguments is not valid JSON",
    ),
    (
        with_message(2, tool_calls=[call("get_weather", "[1, 2]")]),
        "invalid-tool-arguments",
        "messages[2].tool_calls[0].function.arguments must be a JSON object",
    ),
    # tool_calls [] (or null) is no call, as exporters write it: then the content is needed.
    (with_message(2, tool_calls=[]), "wrong-type", "messages[2].content must be a string"),
    (
        with_message(2, tool_calls=[{"type": "function", "function": {"name": "f"}}]),
        "missing-key",
        "['arguments']",
    ),
    (
        with_message(2, tool_calls=[{"type": "code", "function": {"name": "f", "arguments": {}}}]),
        "unsupported-tool-call",
        "messages[2].tool_calls[0].type='code'",
    ),
    (with_message(2, tool_calls=[call("", {})]), "empty-content", "function.name is empty"),
    (with_message(1, tool_calls=[call("f", {})]), "unknown-key", "['tool_calls']"),
    (with_message(4, tool_call_id="x"), "unknown-key", "['tool_call_id']"),
    (with_message(3, tool_call_id=7), "wrong-type", "messages[3].tool_call_id must be a string"),
    (with_message(2, tool_calls=None), "wrong-type", "messages[2].content must be a string"),
    (
        with_message(2, tool_calls=[call("get_weather", '{"city": "\\ud800"}')]),
        "invalid-unicode",
        "messages[2].tool_calls[0].function.arguments holds a lone surrogate",
    ),
    (
        {"tools": [WEATHER, SEARCH | {"x": "\ud800"}], "messages": EXAMPLES[3]["messages"]},
        "invalid-unicode",
        "'tools' holds a lone surrogate",
    ),
    ({"tools": {"a": 1}, "messages": EXAMPLES[3]["messages"]}, "wrong-type", "'tools' must be"),
    (
        {"tools": [{"type": "function"}], "messages": EXAMPLES[3]["messages"]},
        "wrong-type",
        "tools[0]",
    ),
]


@pytest.mark.parametrize(("bad", "rule", "detail"), BAD_TOOL_LINES)
def test_tool_rules_are_one_line(tmp_path, bad, rule, detail):
    path = write_jsonl(tmp_path / "tools.jsonl", [EXAMPLES[0], "", bad])
    (error,) = validate_files([str(path)], "chat")
    assert (error.line, error.rule) == (3, rule)
    assert str(error).startswith(f"{path}:3: {rule}: ")
    assert detail in error.detail
    assert "\n" not in str(error)


# ---------------------------------------------------------------- Llama 3.1 vs Meta -------


def meta_tool_encoding(example: dict, loss_on: str) -> tuple[list[int], list[bool]]:
    """Token ids and supervised flags from Meta's ChatFormat (ToolPromptFormat.json, every
    message ending its turn): header unsupervised, the rest of an assistant message supervised.
    ``tools`` go into the system message as the template writes them (Meta writes none)."""
    from llama_models.datatypes import RawMessage, StopReason, ToolCall, ToolPromptFormat

    messages = [dict(m) for m in example["messages"]]
    if example.get("tools"):
        system = messages.pop(0)["content"] if messages[0]["role"] == "system" else None
        messages.insert(
            0, {"role": "system", "content": llama31_tools_text(system, example["tools"])}
        )
    raw = []
    for m in messages:
        content = m.get("content") or ""
        if isinstance(content, list):
            content = "".join(part["text"] for part in content)
        # model_construct: ToolCall's type allows two levels of nesting in the arguments;
        # encode_tool_call only json.dumps them, at any depth.
        calls = [
            ToolCall.model_construct(
                call_id=c.get("id", "call"),
                tool_name=c["function"]["name"],
                arguments=(
                    json.loads(args)
                    if isinstance(args := c["function"]["arguments"], str)
                    else args
                ),
            )
            for c in m.get("tool_calls", [])
        ]
        raw.append(
            RawMessage(
                role=m["role"],
                content=content,
                stop_reason=StopReason.end_of_turn,
                tool_calls=calls,
            )
        )
    return meta_dialog(raw, loss_on, ToolPromptFormat.json)


@pytest.fixture(scope="module")
def llama_tools_dir():
    return llama31_tools_tokenizer_dir()


@pytest.fixture(scope="module")
def llama_tools_tok(llama_tools_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(llama_tools_dir)
    assert tok.chat_template == LLAMA31_TOOLS_TEMPLATE
    return tok


@pytest.mark.parametrize("loss_on", ["all_assistant", "last_assistant"])
def test_llama31_tool_calls_golden_against_meta(
    llama_tools_dir, llama_tools_tok, tmp_path, loss_on
):
    """Every id and every label equals Meta's encoding of the same dialog: the calls (Meta's
    JSON form) and their <|eot_id|> carry the loss, their headers and the tool results do not."""
    tok = llama_tools_tok
    data = write_jsonl(tmp_path / "tools.jsonl", EXAMPLES)
    cache = tmp_path / "cache"
    (store,) = tokenize_files([str(data)], llama_tools_dir, "chat", loss_on, cache, tok)
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    for d, example in enumerate(EXAMPLES):
        ids, labels = labels_of(store, d)
        meta_ids, supervised = meta_tool_encoding(example, loss_on)
        assert ids.tolist() == meta_ids
        np.testing.assert_array_equal(labels, expected_labels(meta_ids, supervised))
        # Readable form: the supervised ids are, per turn, the call JSON (or the text) + eot.
        turns = [m for m in example["messages"] if m["role"] == "assistant"]
        if loss_on == "last_assistant":
            turns = turns[-1:]
        want = []
        for m in turns:
            text = m.get("content") or ""
            for c in m.get("tool_calls", []):
                args = c["function"]["arguments"]
                args = json.loads(args) if isinstance(args, str) else args
                text += json.dumps(
                    {"type": "function", "name": c["function"]["name"], "parameters": args}
                )
            want += tok.encode(text, add_special_tokens=False) + [eot]
        assert labels[labels != IGNORE_INDEX].tolist() == want


def supervised_runs(ids: np.ndarray, mask: np.ndarray) -> list[list[int]]:
    """The ids of each run of consecutive supervised tokens."""
    runs, current = [], []
    for t, m in zip(ids.tolist(), mask.tolist(), strict=True):
        if m:
            current.append(t)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


def test_llama31_hf_call_shape_supervises_exactly_the_call(tmp_path):
    """With the call shape of HF's published template ({"name", "parameters"}, no "type",
    non-ASCII as is): each tool-call turn's supervised tokens decode to the call + <|eot_id|>."""
    from transformers import AutoTokenizer

    model = llama31_tools_tokenizer_dir(LLAMA31_TOOLS_TEMPLATE_HF_SHAPE)
    tok = AutoTokenizer.from_pretrained(model)
    data = write_jsonl(tmp_path / "tools.jsonl", EXAMPLES)
    (store,) = tokenize_files([str(data)], model, "chat", "all_assistant", tmp_path / "c", tok)
    for d, example in enumerate(EXAMPLES):
        s, e = int(store.offsets[d]), int(store.offsets[d + 1])
        runs = supervised_runs(store.ids[s:e], store.mask[s:e])
        turns = [m for m in example["messages"] if m["role"] == "assistant"]
        assert len(runs) == len(turns)
        for run, m in zip(runs, turns, strict=True):
            if "tool_calls" not in m:
                assert tok.decode(run) == m["content"] + "<|eot_id|>"
                continue
            (c,) = m["tool_calls"]
            args = c["function"]["arguments"]
            args = json.loads(args) if isinstance(args, str) else args
            text = json.dumps(
                {"name": c["function"]["name"], "parameters": args}, ensure_ascii=False
            )
            assert tok.decode(run) == text + "<|eot_id|>"


# ---------------------------------------------------------------- templates without tools --


def test_smollm2_template_refuses_tools(smollm2_dir, tmp_path):
    """SmolLM2's template writes only role and content: a call would render as an empty
    assistant turn, so the example is refused by name, at its line."""
    for example in (EXAMPLES[0], EXAMPLES[3]):  # with `tools`; with tool_calls only
        path = write_jsonl(
            tmp_path / "tools.jsonl", [{"messages": EXAMPLES[3]["messages"][:2]}, example]
        )
        name = "get_weather" if "tools" in example else "create_event"
        with pytest.raises(DataValidationError) as info:
            build_packed_dataset([str(path)], smollm2_dir, "chat", 512, cache_dir=tmp_path / "c")
        assert str(info.value) == (
            f"{path}:2: tools-unsupported: the model's chat template does not render tools "
            f"(tool {name!r} is not in the rendered conversation); remove 'tools'/'tool_calls' "
            "or use a model whose template supports them"
        )


def test_template_that_renders_calls_but_not_tools_is_refused(tmp_path):
    """ChatML with calls written after the content, but no `tools`: the tool list would be
    lost, so an example that declares tools is refused; one that only calls them is trained."""
    model = tiny_tokenizer_dir(tmp_path / "tok")
    (model / "chat_template.jinja").write_text(
        "{% for m in messages %}"
        "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] }}"
        "{% for c in m['tool_calls'] or [] %}"
        "{{ '<tool_call>' + (c['function'] | tojson) + '</tool_call>' }}{% endfor %}"
        "{{ '<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    path = write_jsonl(tmp_path / "tools.jsonl", [EXAMPLES[3], EXAMPLES[0]])
    with pytest.raises(
        DataValidationError,
        match=rf"^{path}:2: tools-unsupported: .*\('tools' leaves the rendered conversation unchanged\)",
    ):
        build_packed_dataset([str(path)], model, "chat", 1024, cache_dir=tmp_path / "c")
    # The calls-only example: its call turn is supervised through <|im_end|>, not the newline.
    path = write_jsonl(tmp_path / "calls.jsonl", [EXAMPLES[3]])
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    (store,) = tokenize_files([str(path)], model, "chat", "last_assistant", tmp_path / "c", tok)
    (run,) = supervised_runs(store.ids[:], store.mask[:])
    function = EXAMPLES[3]["messages"][3]["tool_calls"][0]["function"]
    assert (
        tok.decode(run)
        == f"<tool_call>{json.dumps(function, ensure_ascii=False)}</tool_call><|im_end|>"
    )


# ---------------------------------------------------------------- end to end --------------


def test_validate_command_on_a_tool_file(llama_tools_dir, tmp_path, capsys):
    path = write_jsonl(tmp_path / "tools.jsonl", EXAMPLES * 2)
    args = dict(context_length=512, cache_dir=str(tmp_path / "c"))
    assert validate_command([str(path)], str(llama_tools_dir), **args) == 0
    out = capsys.readouterr().out
    assert "examples            8" in out
    ds = build_packed_dataset([str(path)], llama_tools_dir, "chat", 512, cache_dir=tmp_path / "c")
    assert sum(int(ds[i]["num_docs"]) for i in range(len(ds))) == 8
    # A bad line among them is one line naming it.
    bad = with_message(2, tool_calls=[call("get_weather", "{city: Paris}")])
    path = write_jsonl(tmp_path / "bad.jsonl", EXAMPLES + [bad])
    assert validate_command([str(path)], str(llama_tools_dir), **args) == 2
    err = capsys.readouterr().err.strip()
    assert f"{path}:5: invalid-tool-arguments: messages[2].tool_calls[0].function." in err
    assert len(err.splitlines()) == 1
