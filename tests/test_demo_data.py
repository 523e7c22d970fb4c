"""The bundled demo data set (longtune/demo/data/, built by scripts/make_demo_data.py)."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "longtune" / "demo" / "data"
SCRIPT = ROOT / "scripts" / "make_demo_data.py"

MIN_TOKENS, MAX_TOKENS = 300, 900
QUESTION_RE = re.compile(r"\n\nQuestion: According to the documents, what does `([\w.]+)` do\?\Z")
ANSWER_RE = re.compile(r"\ADocument (\d+) describes `([\w.]+)`: (.+)\Z", re.S)
DOC_SPLIT_RE = re.compile(r"\n\n(?=\[Document \d+\] )")
DOC_RE = re.compile(r"\A\[Document (\d+)\] ([\w.]+)\((.*?)\)\n(.+)\Z", re.S)


def _load_jsonl(name: str) -> list[dict]:
    lines = (DATA / name).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


@pytest.fixture(scope="module")
def train() -> list[dict]:
    return _load_jsonl("train.jsonl")


@pytest.fixture(scope="module")
def evals() -> list[dict]:
    return _load_jsonl("eval.jsonl")


@pytest.fixture(scope="module")
def heldout() -> dict:
    return json.loads((DATA / "heldout.json").read_text(encoding="utf-8"))


def parse_user(content: str) -> tuple[list[tuple[str, str]], str]:
    """Return ([(function name, full document text), ...] in order, asked-for name)."""
    m = QUESTION_RE.search(content)
    assert m, content[-200:]
    intro, _, docs_text = content[: m.start()].partition("\n\n")
    assert intro.startswith("Read the documents below")
    docs = []
    for k, block in enumerate(DOC_SPLIT_RE.split(docs_text), start=1):
        d = DOC_RE.match(block)
        assert d, block[:200]
        assert int(d.group(1)) == k
        docs.append((d.group(2), block))
    return docs, m.group(1)


def check_answer(user: str, answer: str) -> str:
    """The answer names the one document about the asked-for function and quotes it."""
    docs, asked = parse_user(user)
    assert 4 <= len(docs) <= 9
    names = [n for n, _ in docs]
    assert len(set(names)) == len(names)
    assert names.count(asked) == 1
    a = ANSWER_RE.match(answer)
    assert a, answer
    k, name, summary = int(a.group(1)), a.group(2), a.group(3)
    assert name == asked
    relevant_name, relevant_text = docs[k - 1]
    assert relevant_name == asked
    # The quoted summary is the relevant document's first line of text, verbatim ...
    assert relevant_text.split("\n")[1] == summary
    # ... and no distractor contains it or names the asked-for function.
    for i, (_, text) in enumerate(docs):
        if i != k - 1:
            assert summary not in text
            assert not re.search(r"(?<![\w.])" + re.escape(asked) + r"(?!\w)", text)
    return asked


def test_files_and_sizes(train, evals, heldout):
    names = sorted(p.name for p in DATA.iterdir())
    assert names == ["SOURCE.md", "eval.jsonl", "heldout.json", "train.jsonl"]
    assert sum(p.stat().st_size for p in DATA.iterdir()) < 2_000_000
    assert 150 <= len(train) <= 300
    assert 16 <= len(evals) <= 40
    assert "License" in (DATA / "SOURCE.md").read_text()


@pytest.mark.parametrize("split", ["train", "evals"])
def test_chat_format(split, request):
    for ex in request.getfixturevalue(split):
        assert set(ex) == {"messages"}
        roles = [m["role"] for m in ex["messages"]]
        assert roles == ["system", "user", "assistant"]
        for m in ex["messages"]:
            assert set(m) == {"role", "content"}
            assert isinstance(m["content"], str) and m["content"].strip()


@pytest.mark.parametrize("split", ["train", "evals"])
def test_answers_come_from_the_relevant_document(split, request):
    examples = request.getfixturevalue(split)
    asked = [
        check_answer(ex["messages"][1]["content"], ex["messages"][2]["content"]) for ex in examples
    ]
    assert len(set(asked)) == len(asked)  # one example per function
    # The relevant document is not always at the same place.
    positions = {int(ANSWER_RE.match(ex["messages"][2]["content"]).group(1)) for ex in examples}
    assert len(positions) >= 4


def test_heldout(train, evals, heldout):
    assert [m["role"] for m in heldout["messages"]] == ["system", "user"]
    user = heldout["messages"][1]["content"]
    asked = check_answer(user, heldout["reference_answer"])
    assert heldout["question"] in user
    assert heldout["messages"][0] == train[0]["messages"][0]
    docs, _ = parse_user(user)
    assert heldout["documents"] == [text for _, text in docs]
    assert docs[heldout["relevant_document"] - 1][0] == asked
    # Not in train or eval: neither the prompt nor the asked-for function.
    for ex in train + evals:
        assert ex["messages"][1]["content"] != user
        assert parse_user(ex["messages"][1]["content"])[1] != asked


def test_train_and_eval_use_disjoint_functions(train, evals, heldout):
    def functions(examples):
        return {n for ex in examples for n, _ in parse_user(ex["messages"][1]["content"])[0]}

    train_fns = functions(train)
    assert not train_fns & functions(evals)
    assert not train_fns & functions([heldout])


def test_token_lengths(train, evals, heldout):
    from transformers import AutoTokenizer

    from longtune.assets import smollm2_checkpoint

    tok = AutoTokenizer.from_pretrained(str(smollm2_checkpoint()))

    def n_tokens(messages):
        text = tok.apply_chat_template(messages, tokenize=False)
        return len(tok(text, add_special_tokens=False)["input_ids"])

    for ex in train + evals:
        assert MIN_TOKENS <= n_tokens(ex["messages"]) <= MAX_TOKENS
    full = heldout["messages"] + [{"role": "assistant", "content": heldout["reference_answer"]}]
    assert MIN_TOKENS <= n_tokens(full) <= MAX_TOKENS


@pytest.mark.slow
@pytest.mark.skipif(
    sys.version_info[:3] != (3, 11, 7),
    reason="the committed data comes from CPython 3.11.7's docstrings; other releases differ",
)
def test_files_are_what_the_script_generates():
    spec = importlib.util.spec_from_file_location("make_demo_data", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    files, _ = module.generate()
    for name, content in files.items():
        assert (DATA / name).read_bytes() == content, f"{name} differs; run {SCRIPT.name}"
