"""`check_data` (the statistics and loss-mask preview behind `longtune validate` and the UI's
data preview) against the chat template's own rendering."""

from __future__ import annotations

import pytest
from data_fixtures import tiny_tokenizer_dir, write_jsonl
from transformers import AutoTokenizer

from longtune.data import check_data, print_report, validate_command
from longtune.data.command import PREVIEW_HEAD_TOKENS, PREVIEW_MAX_TOKENS

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome, since 1871."},
]


def test_preview_marks_exactly_the_assistant_turns(tmp_path):
    tok_dir = tiny_tokenizer_dir(tmp_path / "tok")
    data = write_jsonl(tmp_path / "d.jsonl", [{"messages": CONVERSATION}])
    rendered = AutoTokenizer.from_pretrained(tok_dir).apply_chat_template(
        CONVERSATION, tokenize=False
    )
    for loss_on, want in (
        ("all_assistant", ["Paris.<|im_end|>", "Rome, since 1871.<|im_end|>"]),
        ("last_assistant", ["Rome, since 1871.<|im_end|>"]),
    ):
        report = check_data(
            [str(data)], str(tok_dir), context_length=512, loss_on=loss_on, preview=1,
            cache_dir=str(tmp_path / "cache"),
        )  # fmt: skip
        (example,) = report.examples
        assert "".join(s.text for s in example.segments) == rendered
        assert [s.text for s in example.segments if s.target] == want
        # byte-level tokens: one per byte of the content, one for the end-of-turn token
        assert example.target_tokens == sum(len(t.removesuffix("<|im_end|>")) + 1 for t in want)
        assert example.source == f"{data}:1"


def test_preview_of_a_long_example_keeps_its_head_and_tail(tmp_path):
    tok_dir = tiny_tokenizer_dir(tmp_path / "tok")
    text = "".join(chr(ord("a") + i % 26) for i in range(2000))
    (tmp_path / "t.txt").write_text(text)
    report = check_data(
        [str(tmp_path / "t.txt")], str(tok_dir), task_type="text", context_length=4096,
        preview=1, cache_dir=str(tmp_path / "cache"),
    )  # fmt: skip
    (example,) = report.examples
    skipped = [s for s in example.segments if s.skipped]
    assert len(skipped) == 1 and skipped[0].skipped == example.tokens - PREVIEW_MAX_TOKENS
    shown = "".join(s.text for s in example.segments)
    tail = PREVIEW_MAX_TOKENS - PREVIEW_HEAD_TOKENS
    # one token per character, and the end-of-text token last
    assert shown == text[:PREVIEW_HEAD_TOKENS] + text[-(tail - 1) :] + "<|im_end|>"


def test_printer_is_the_validate_command(tmp_path, capsys):
    tok_dir = tiny_tokenizer_dir(tmp_path / "tok")
    data = write_jsonl(tmp_path / "d.jsonl", [{"messages": CONVERSATION}, "{broken"])
    args = ([str(data)], str(tok_dir), "chat", 512)
    assert validate_command(*args, all_errors=True) == 2  # bad input, as for `longtune train`
    printed = capsys.readouterr()
    report = check_data(*args, all_errors=True)
    assert report.stage == "lines" and len(report.errors) == 1
    assert report.errors[0].startswith(f"{data}:2: invalid-json: ")
    assert print_report(report) == 2
    assert capsys.readouterr() == printed


def test_no_usable_example_names_the_setting_that_keeps_them(tmp_path):
    """Every example dropped (overlength=drop), or cut before its answer (truncate): the message
    says which setting keeps them."""
    tok_dir = tiny_tokenizer_dir(tmp_path / "tok")
    long_prompt = [
        {"role": "user", "content": "q" * 300},
        {"role": "assistant", "content": "an answer after a long question"},
    ]
    data = write_jsonl(tmp_path / "d.jsonl", [{"messages": long_prompt}] * 3)
    kw = dict(context_length=128, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError) as dropped:
        check_data([str(data)], str(tok_dir), overlength="drop", **kw)
    with pytest.raises(ValueError) as truncated:
        check_data([str(data)], str(tok_dir), overlength="truncate", **kw)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    rendered = tok.apply_chat_template(long_prompt, tokenize=False)
    longest = len(tok(rendered, add_special_tokens=False)["input_ids"])
    assert str(dropped.value) == (
        "no usable document: overlength=drop dropped the 3 of 3 example(s) longer than the "
        "128-token context; overlength=truncate keeps their first 128 tokens, overlength=split "
        "keeps them as context-length pieces (every target kept), or raise context_length to "
        f"{longest} (the longest example)"
    )
    assert str(truncated.value) == (
        "no usable document: truncating the 3 of 3 example(s) longer than the 128-token context "
        "to their first tokens cut off every supervised (assistant) token; overlength=split keeps "
        "them as context-length pieces (every target kept), or raise context_length to "
        f"{longest} (the longest example)"
    )
    report = check_data([str(data)], str(tok_dir), overlength="split", **kw)
    assert report.ok and report.stats.files[0].split == 3
