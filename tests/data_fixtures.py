"""Helpers for the data tests: tokenizer folders and data files.

- :func:`tiny_tokenizer_dir`: a byte-level tokenizer (256 byte tokens + ChatML specials) with a
  ChatML template; builds in milliseconds, for the fast tests.
- :func:`llama31_tokenizer_dir`: the real Llama 3 tokenizer (``llama_models`` package's
  ``tokenizer.model``) converted by transformers' ``TikTokenConverter``, with
  :data:`LLAMA31_CHAT_TEMPLATE`; cached under ``longtune.assets.cache_dir()``.
- :func:`llama31_tools_tokenizer_dir`: the same tokenizer with a tool-calling template
  (:data:`LLAMA31_TOOLS_TEMPLATE`, Meta's JSON call format, or
  :data:`LLAMA31_TOOLS_TEMPLATE_HF_SHAPE`, the call shape of HF's published template).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

from longtune.assets import cache_dir

# Llama 3.1's chat format for plain system / user / assistant / tool (ipython) turns, as Meta's
# llama_models/llama3/chat_format.py encodes it: <|begin_of_text|>, then per message
# "<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>" (role "tool" is written
# "ipython"); the generation prompt is the assistant header. No default system message and no
# content trimming, exactly like ChatFormat.encode_dialog_prompt.
LLAMA31_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'tool' %}{%- set role = 'ipython' %}"
    "{%- else %}{%- set role = message['role'] %}{%- endif %}"
    "{{- '<|start_header_id|>' + role + '<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

# Llama 3.1's chat format with tool calling, written for these tests, as Meta's
# llama_models/llama3/chat_format.py encodes it with ToolPromptFormat.json and
# StopReason.end_of_turn: like LLAMA31_CHAT_TEMPLATE, plus an assistant message's tool calls
# written after its content, each as json.dumps({"type": "function", "name": ...,
# "parameters": ...}) (ToolUtils.encode_tool_call; `tojson(ensure_ascii=True)` so non-ASCII
# characters are \uXXXX escapes, as json.dumps writes them), then <|eot_id|>. Tool results are
# `tool` messages, written under the `ipython` header. Meta's ChatFormat does not write tool
# definitions; this template writes `tools` into the system message: the system content (if the
# conversation has one), then "\n\n" (only after a system content), then TOOLS_PREAMBLE and
# one line per tool, `tool | tojson` — see `llama31_tools_text`.
# HF's published Llama 3.1 template writes a call as {"name": ..., "parameters": ...} (no
# "type", non-ASCII characters as they are): LLAMA31_TOOLS_TEMPLATE_HF_SHAPE writes that shape.
TOOLS_PREAMBLE = "Environment: ipython\n\nFunctions you may call, one JSON object a line:"
_LLAMA31_TOOLS_TEMPLATE = (
    "{{- bos_token }}"
    "{%- set loop_messages = messages %}"
    "{%- if tools %}"
    "{%- set ns = namespace(text='') %}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set ns.text = messages[0]['content'] + '\\n\\n' %}"
    "{%- set loop_messages = messages[1:] %}"
    "{%- endif %}"
    "{%- set ns.text = ns.text + " + repr(TOOLS_PREAMBLE).replace("\n", "\\n") + " %}"
    "{%- for tool in tools %}{%- set ns.text = ns.text + '\\n' + (tool | tojson) %}{%- endfor %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' + ns.text + '<|eot_id|>' }}"
    "{%- endif %}"
    "{%- for message in loop_messages %}"
    "{%- if message['role'] == 'tool' %}{%- set role = 'ipython' %}"
    "{%- else %}{%- set role = message['role'] %}{%- endif %}"
    "{{- '<|start_header_id|>' + role + '<|end_header_id|>\\n\\n' + message['content'] }}"
    "{%- for call in message['tool_calls'] or [] %}{{- CALL }}{%- endfor %}"
    "{{- '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
LLAMA31_TOOLS_TEMPLATE = _LLAMA31_TOOLS_TEMPLATE.replace(
    "CALL",
    "{'type': 'function', 'name': call['function']['name'], "
    "'parameters': call['function']['arguments']} | tojson(ensure_ascii=True)",
)
LLAMA31_TOOLS_TEMPLATE_HF_SHAPE = _LLAMA31_TOOLS_TEMPLATE.replace(
    "CALL",
    "'{\"name\": \"' + call['function']['name'] + '\", \"parameters\": ' "
    "+ (call['function']['arguments'] | tojson) + '}'",
)


def llama31_tools_text(system: str | None, tools: list[dict]) -> str:
    """The system message content the tools templates write for ``tools``."""
    lines = [TOOLS_PREAMBLE] + [json.dumps(t, ensure_ascii=False) for t in tools]
    return (f"{system}\n\n" if system is not None else "") + "\n".join(lines)


LLAMA3_SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
    "<|image|>",
] + [f"<|reserved_special_token_{2 + i}|>" for i in range(256 - 12)]

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def llama_models_dir() -> Path:
    spec = importlib.util.find_spec("llama_models")
    assert spec is not None and spec.submodule_search_locations, (
        "pip install --no-deps llama-models"
    )
    return Path(next(iter(spec.submodule_search_locations)))


def llama31_tokenizer_dir() -> Path:
    """HF folder with the real Llama 3 tokenizer and the Llama 3.1 chat template (cached)."""
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    model_file = llama_models_dir() / "llama3" / "tokenizer.model"
    out = cache_dir() / "test-llama31-tokenizer"
    marker = out / ".complete"
    stamp = f"{model_file.stat().st_size}:{len(LLAMA31_CHAT_TEMPLATE)}:v1"
    if marker.is_file() and marker.read_text() == stamp:
        return out
    backend = TikTokenConverter(
        vocab_file=str(model_file), extra_special_tokens=LLAMA3_SPECIAL_TOKENS
    ).converted()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<|finetune_right_pad_id|>",
    )
    tok.chat_template = LLAMA31_CHAT_TEMPLATE
    out.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(out)
    marker.write_text(stamp)
    return out


def llama31_tools_tokenizer_dir(template: str = LLAMA31_TOOLS_TEMPLATE) -> Path:
    """The Llama 3 tokenizer folder of :func:`llama31_tokenizer_dir` with another chat template
    (by default :data:`LLAMA31_TOOLS_TEMPLATE`), in a cache folder named by the template."""
    from transformers import AutoTokenizer

    digest = hashlib.sha256(template.encode()).hexdigest()[:16]
    out = cache_dir() / f"test-llama31-tokenizer-{digest}"
    marker = out / ".complete"
    if marker.is_file():
        return out
    tok = AutoTokenizer.from_pretrained(llama31_tokenizer_dir())
    tok.chat_template = template
    out.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(out)
    marker.write_text(digest)
    return out


def tiny_tokenizer_dir(path: Path) -> Path:
    """Write a byte-level tokenizer (256 byte tokens) with ChatML specials and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    alphabet = ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(alphabet))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
    )
    tok.chat_template = CHATML_TEMPLATE
    path.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(path)
    return path


def write_jsonl(path: Path, rows: list) -> Path:
    """Write rows (objects, or raw strings written as-is) one per line."""
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(row if isinstance(row, str) else json.dumps(row))
            f.write("\n")
    return path


def chat_rows(n: int, seed: int = 0, max_words: int = 30) -> list[dict]:
    """``n`` random valid chat examples (1-3 user/assistant exchanges, some with a system)."""
    import random

    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "long", "context", "token", "pack", "héllo", "数据"]

    def text() -> str:
        return " ".join(rng.choice(words) for _ in range(rng.randint(1, max_words)))

    rows = []
    for _ in range(n):
        msgs = [{"role": "system", "content": text()}] if rng.random() < 0.3 else []
        for _ in range(rng.randint(1, 3)):
            msgs += [{"role": "user", "content": text()}, {"role": "assistant", "content": text()}]
        rows.append({"messages": msgs})
    return rows
