"""Golden loss-mask tests on two real chat templates: Llama 3.1 (checked against Meta's own
ChatFormat encoder) and SmolLM2 (its shipped chat_template.jinja)."""

from __future__ import annotations

import numpy as np
import pytest
from data_fixtures import LLAMA31_CHAT_TEMPLATE, llama31_tokenizer_dir, write_jsonl

from longtune.data import IGNORE_INDEX, build_packed_dataset, pack_sequence, tokenize_files

CONVERSATIONS = [
    [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4."},
    ],
    [
        {"role": "user", "content": "Name a prime."},
        {"role": "assistant", "content": "Seven is prime.\nSo is 11."},
        {"role": "user", "content": "Say héllo in 中文, please!"},
        {"role": "assistant", "content": '你好 — that\'s "hello".'},
    ],
    [
        {"role": "user", "content": "What's the weather in Paris?"},
        {"role": "assistant", "content": '{"name": "weather", "parameters": {"city": "Paris"}}'},
        {"role": "tool", "content": '{"temp_c": 21, "sky": "clear"}'},
        {"role": "assistant", "content": "It is 21 °C and clear in Paris."},
    ],
]


def expected_labels(ids: list[int], supervised: list[bool]) -> np.ndarray:
    """Shift once: labels[t] = ids[t+1] if token t+1 is supervised, last token -100."""
    labels = np.full(len(ids), IGNORE_INDEX, dtype=np.int64)
    for t in range(len(ids) - 1):
        if supervised[t + 1]:
            labels[t] = ids[t + 1]
    return labels


def labels_of(store, d: int) -> tuple[np.ndarray, np.ndarray]:
    s, e = int(store.offsets[d]), int(store.offsets[d + 1])
    seq = pack_sequence([(store.ids[s:e], store.mask[s:e])], e - s, 0)
    assert seq["cu_seqlens"].tolist() == [0, e - s]
    return seq["input_ids"], seq["labels"]


# ---------------------------------------------------------------- Llama 3.1 ---------------


def meta_encoding(messages: list[dict], loss_on: str) -> tuple[list[int], list[bool]]:
    """Token ids and supervised flags from Meta's llama_models ChatFormat (the ground truth)."""
    from llama_models.datatypes import RawMessage, StopReason

    raw = [
        RawMessage(role=m["role"], content=m["content"], stop_reason=StopReason.end_of_turn)
        for m in messages
    ]
    return meta_dialog(raw, loss_on)


def meta_dialog(messages: list, loss_on: str, tool_format=None) -> tuple[list[int], list[bool]]:  # noqa: ANN001
    """Meta's ``ChatFormat`` encoding of ``RawMessage`` s after ``<|begin_of_text|>``: each
    header unsupervised, the rest of an assistant message supervised (every one, or the last
    only for ``last_assistant``)."""
    from llama_models.llama3.chat_format import ChatFormat
    from llama_models.llama3.tokenizer import Tokenizer

    fmt = ChatFormat(Tokenizer.get_instance())
    ids = [fmt.tokenizer.special_tokens["<|begin_of_text|>"]]
    supervised = [False]
    last = max(i for i, m in enumerate(messages) if m.role == "assistant")
    for i, m in enumerate(messages):
        toks, _ = fmt.encode_message(m, tool_format)
        header = len(fmt._encode_header(m.role))
        on = m.role == "assistant" and (loss_on == "all_assistant" or i == last)
        ids += toks
        supervised += [False] * header + [on] * (len(toks) - header)
    return ids, supervised


@pytest.fixture(scope="module")
def llama_dir():
    return llama31_tokenizer_dir()


@pytest.fixture(scope="module")
def llama_tok(llama_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(llama_dir)


def test_llama31_template_matches_meta_chat_format(llama_tok):
    from llama_models.datatypes import RawMessage
    from llama_models.llama3.chat_format import ChatFormat
    from llama_models.llama3.tokenizer import Tokenizer

    tok = llama_tok
    assert tok.chat_template == LLAMA31_CHAT_TEMPLATE
    fmt = ChatFormat(Tokenizer.get_instance())
    for conv in CONVERSATIONS:
        meta = fmt.encode_dialog_prompt([RawMessage(**m) for m in conv]).tokens
        ours = tok.apply_chat_template(conv, add_generation_prompt=True, return_dict=True)
        assert ours["input_ids"] == meta
        # Without the generation prompt: Meta's dialog minus its trailing assistant header.
        whole = tok.apply_chat_template(conv, return_dict=True)["input_ids"]
        assert whole == meta[: -len(fmt._encode_header("assistant"))]
        assert whole == meta_encoding(conv, "all_assistant")[0]


@pytest.mark.parametrize("loss_on", ["all_assistant", "last_assistant"])
def test_llama31_golden_loss_mask(llama_dir, llama_tok, tmp_path, loss_on):
    tok = llama_tok
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in CONVERSATIONS])
    (store,) = tokenize_files([str(data)], llama_dir, "chat", loss_on, tmp_path / "cache", tok)
    for d, conv in enumerate(CONVERSATIONS):
        ids, labels = labels_of(store, d)
        meta_ids, supervised = meta_encoding(conv, loss_on)
        assert ids.tolist() == meta_ids
        assert ids.tolist() == tok.apply_chat_template(conv, return_dict=True)["input_ids"]
        np.testing.assert_array_equal(labels, expected_labels(meta_ids, supervised))
        # Readable form of the same fact: supervised ids = assistant contents + <|eot_id|> each.
        turns = [m for m in conv if m["role"] == "assistant"]
        if loss_on == "last_assistant":
            turns = turns[-1:]
        want = sum((tok.encode(m["content"], add_special_tokens=False) + [eot] for m in turns), [])
        assert labels[labels != IGNORE_INDEX].tolist() == want


# ---------------------------------------------------------------- SmolLM2 ------------------


@pytest.fixture(scope="module")
def smollm2_dir():
    from longtune.assets import smollm2_checkpoint

    return smollm2_checkpoint()


@pytest.fixture(scope="module")
def smollm2_tok(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


def chatml_supervised(tok, ids: list[int], conv: list[dict], loss_on: str) -> list[bool]:
    """Assistant spans found on token ids: after each `<|im_start|>assistant\\n` header, up to
    and including `<|im_end|>`; the span's content must be the content's own tokenization."""
    header = tok.encode("<|im_start|>assistant\n", add_special_tokens=False)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    starts = [
        t + len(header) for t in range(len(ids) - len(header)) if ids[t : t + len(header)] == header
    ]
    contents = [m["content"] for m in conv if m["role"] == "assistant"]
    assert len(starts) == len(contents)
    if loss_on == "last_assistant":
        starts, contents = starts[-1:], contents[-1:]
    supervised = [False] * len(ids)
    for s, content in zip(starts, contents, strict=True):
        e = ids.index(im_end, s)
        assert ids[s:e] == tok.encode(content, add_special_tokens=False)
        for t in range(s, e + 1):  # content and its end-of-turn token; not the "\n" after it
            supervised[t] = True
    return supervised


@pytest.mark.parametrize("loss_on", ["all_assistant", "last_assistant"])
def test_smollm2_golden_loss_mask(smollm2_dir, smollm2_tok, tmp_path, loss_on):
    tok = smollm2_tok
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in CONVERSATIONS])
    (store,) = tokenize_files([str(data)], smollm2_dir, "chat", loss_on, tmp_path / "cache", tok)
    for d, conv in enumerate(CONVERSATIONS):
        ids, labels = labels_of(store, d)
        want_ids = tok.apply_chat_template(conv, return_dict=True)["input_ids"]
        assert ids.tolist() == want_ids
        supervised = chatml_supervised(tok, want_ids, conv, loss_on)
        np.testing.assert_array_equal(labels, expected_labels(want_ids, supervised))


def test_smollm2_packed_dataset_keeps_golden_labels(smollm2_dir, smollm2_tok, tmp_path):
    """Through packing (tokenizer loaded by build_packed_dataset itself): every document
    segment carries exactly its golden labels."""
    tok = smollm2_tok
    rows = [{"messages": c} for c in CONVERSATIONS] * 3
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    ds = build_packed_dataset([str(data)], smollm2_dir, "chat", 256, cache_dir=tmp_path / "c")
    golden = {}
    for conv in CONVERSATIONS:
        ids = tok.apply_chat_template(conv, return_dict=True)["input_ids"]
        golden[tuple(ids)] = expected_labels(
            ids, chatml_supervised(tok, ids, conv, "all_assistant")
        )
    seen = 0
    for i in range(len(ds)):
        item = ds[i]
        cu = item["cu_seqlens"]
        for k in range(int(item["num_docs"])):
            s, e = cu[k], cu[k + 1]
            np.testing.assert_array_equal(
                item["labels"][s:e], golden[tuple(item["input_ids"][s:e].tolist())]
            )
            seen += 1
    assert seen == len(rows)
