#!/usr/bin/env python3
"""Build the bundled demo data set of ``longtune demo`` (``longtune/demo/data/``).

A small long-context, retrieval-augmented chat data set made of REAL text: the documentation
strings of functions in CPython's standard library (Python Software Foundation License 2.0).

Each example is a chat::

    system:    fixed instruction (answer from the documents, cite the document)
    user:      4-9 documents "[Document k] module.func(signature)" + docstring, one of them
               relevant, the others distractors, then
               "Question: According to the documents, what does `module.func` do?"
    assistant: "Document k describes `module.func`: <summary line of its docstring>"

The answer is copied from the relevant document (the docstring's one-line summary, PEP 257),
so it is correct by construction and the same answer form is used everywhere: a 135M model
learns it within a few dozen optimizer steps.  Summaries shared by two functions are dropped,
and a distractor never mentions the asked-for name, so every question has one answer.

Train, eval and the held-out example draw their documents from disjoint sets of functions.

Outputs (written byte-identically on every run with the same Python):
    train.jsonl, eval.jsonl   one {"messages": [...]} object per line
    heldout.json              one example not in train/eval: prompt messages (system, user),
                              question, documents, relevant document, reference answer
    SOURCE.md                 where the text comes from and its license

Requirements to regenerate: CPython 3.11.7 on Linux (docstrings, signatures and ``os``
functions vary with the Python version, even between patch releases, and with the platform;
other versions print a warning and may produce different files), plus ``transformers`` and the SmolLM2 checkpoint (``longtune.assets``) to measure
token lengths.  The committed files are what ships; nothing here runs at demo time.

Usage:
    python scripts/make_demo_data.py            # (re)write longtune/demo/data/
    python scripts/make_demo_data.py --check    # exit 1 if the committed files differ
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import random
import re
import statistics
import subprocess
import sys
import warnings
from pathlib import Path

SEED = 1234
N_TRAIN = 200
N_EVAL = 24
EVAL_POOL_FRACTION = 0.25
# Token bounds of a whole example under SmolLM2's chat template (the test checks 300..900).
MIN_TOKENS, MAX_TOKENS = 320, 880
MIN_DOCS, MAX_DOCS = 4, 9
MAX_DOC_CHARS = 700  # docstring bodies are cut at a paragraph boundary below this
HELDOUT_FUNCTION = "textwrap.dedent"
GENERATED_WITH = (3, 11, 7)  # CPython version the committed files come from

OUT_DIR = Path(__file__).resolve().parent.parent / "longtune" / "demo" / "data"

SYSTEM_PROMPT = (
    "You are a helpful assistant. Answer the question using only the documents in the "
    "user's message, and say which document the answer comes from."
)
QUESTION_TEMPLATE = "According to the documents, what does `{name}` do?"
ANSWER_TEMPLATE = "Document {k} describes `{name}`: {summary}"
DOC_HEADER_TEMPLATE = "[Document {k}] {title}"

REPLACEABLE = {"warnings.showwarning", "warnings.formatwarning", "signal.default_int_handler"}

# Standard-library modules whose public functions are used (imported, never run).  Fixed order.
MODULES = """
abc argparse ast base64 binascii bisect bz2 calendar cmath codecs collections colorsys copy
csv datetime difflib dis email.utils filecmp fnmatch fractions functools getpass gettext glob
gzip hashlib heapq hmac html importlib inspect ipaddress itertools json keyword linecache
locale logging lzma math mimetypes operator os os.path pathlib pickle pkgutil platform
plistlib pprint py_compile quopri random re reprlib secrets shlex shutil signal site socket
sqlite3 stat statistics string struct subprocess sys tarfile tempfile textwrap
threading time timeit tokenize traceback types typing unicodedata urllib.parse urllib.request
uuid warnings weakref wsgiref.util xml.sax.saxutils zipfile zlib
""".split()


# --------------------------------------------------------------------------------------------
# Documents


def _signature(obj) -> str:
    try:
        sig = str(inspect.signature(obj))
    except (TypeError, ValueError):
        return "(...)"
    # Default values whose repr depends on the process (addresses, open streams) are hidden.
    if "<" in sig or " at 0x" in sig:
        return "(...)"
    return sig


def _clean(text: str) -> str:
    lines = [line.rstrip().replace("\t", "    ") for line in text.strip().splitlines()]
    return "\n".join(lines)


def collect_functions() -> list[dict]:
    """Public module-level functions with a one-line, unique, sentence-like docstring summary."""
    seen: set[int] = set()
    found: list[dict] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for modname in MODULES:
            mod = importlib.import_module(modname)
            for attr in sorted(vars(mod)):
                if attr.startswith("_"):
                    continue
                obj = getattr(mod, attr)
                if not (inspect.isfunction(obj) or inspect.isbuiltin(obj)):
                    continue
                if id(obj) in seen:  # re-exports (os.path.join is posixpath.join, ...)
                    continue
                # Hooks that a host program may have replaced (pytest replaces sys.unraisablehook
                # and warnings.showwarning), and anything else not from the standard library.
                if attr.endswith("hook") or f"{modname}.{attr}" in REPLACEABLE:
                    continue
                owner = getattr(obj, "__module__", None) or modname
                if owner.split(".")[0] not in sys.stdlib_module_names:
                    continue
                seen.add(id(obj))
                doc = inspect.getdoc(obj)
                if not doc:
                    continue
                doc = _clean(doc)
                paragraphs = [p.strip() for p in re.split(r"\n\s*\n", doc) if p.strip()]
                summary = paragraphs[0]
                if "\n" in summary or not summary.endswith("."):
                    continue
                if not 4 <= len(summary.split()) <= 40:
                    continue
                body = [summary]
                for para in paragraphs[1:]:
                    if len("\n\n".join(body + [para])) > MAX_DOC_CHARS:
                        break
                    body.append(para)
                name = f"{modname}.{attr}"
                found.append(
                    {
                        "name": name,
                        "title": name + _signature(obj),
                        "summary": summary,
                        "body": "\n\n".join(body),
                    }
                )
    counts: dict[str, int] = {}
    for f in found:
        counts[f["summary"]] = counts.get(f["summary"], 0) + 1
    return [f for f in found if counts[f["summary"]] == 1]


def collect_functions_clean() -> list[dict]:
    """``collect_functions`` in a fresh interpreter: libraries imported by the caller (torch,
    pytest, ...) monkeypatch some standard-library functions (``inspect.getfile``, hooks)."""
    out = subprocess.run(
        [sys.executable, "-I", str(Path(__file__).resolve()), "--dump-functions"],
        check=True,
        capture_output=True,
        text=True,
        encoding="utf-8",
    ).stdout
    return json.loads(out)


def _mentions(name: str, text: str) -> bool:
    return re.search(r"(?<![\w.])" + re.escape(name) + r"(?![\w])", text) is not None


# --------------------------------------------------------------------------------------------
# Examples


def render_user(docs: list[dict], question: str) -> str:
    parts = ["Read the documents below and answer the question that follows them."]
    for k, d in enumerate(docs, start=1):
        parts.append(DOC_HEADER_TEMPLATE.format(k=k, title=d["title"]) + "\n" + d["body"])
    parts.append("Question: " + question)
    return "\n\n".join(parts)


class Lengths:
    """Token length of a chat under SmolLM2's tokenizer and chat template."""

    def __init__(self) -> None:
        from transformers import AutoTokenizer

        from longtune.assets import smollm2_checkpoint

        self.tok = AutoTokenizer.from_pretrained(str(smollm2_checkpoint()))

    def __call__(self, messages: list[dict]) -> int:
        text = self.tok.apply_chat_template(messages, tokenize=False)
        return len(self.tok(text, add_special_tokens=False)["input_ids"])


def make_example(rng: random.Random, target: dict, pool: list[dict], lengths: Lengths) -> dict:
    """One example asking about ``target``, with distractors drawn from ``pool``."""
    name = target["name"]
    question = QUESTION_TEMPLATE.format(name=name)
    want_tokens = rng.randint(MIN_TOKENS + 60, MAX_TOKENS - 80)
    want_docs = rng.randint(MIN_DOCS, MAX_DOCS)
    # Distractors never name the asked-for function nor contain its answer.
    candidates = [
        d
        for d in pool
        if d["name"] != name
        and not _mentions(name, d["title"] + "\n" + d["body"])
        and target["summary"] not in d["body"]
    ]
    rng.shuffle(candidates)
    position = rng.randint(0, want_docs - 1)

    def build(distractors: list[dict]) -> dict:
        docs = list(distractors)
        docs.insert(min(position, len(docs)), target)
        k = docs.index(target) + 1
        messages = [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": render_user(docs, question)},
            {
                "role": "assistant",
                "content": ANSWER_TEMPLATE.format(k=k, name=name, summary=target["summary"]),
            },
        ]
        return {"messages": messages}

    chosen: list[dict] = []
    example = build(chosen)
    n = lengths(example["messages"])
    for cand in candidates:
        if len(chosen) + 1 >= want_docs and n >= want_tokens:
            break
        if len(chosen) + 1 >= MAX_DOCS:
            break
        trial = build(chosen + [cand])
        trial_n = lengths(trial["messages"])
        if trial_n > MAX_TOKENS:
            continue
        chosen.append(cand)
        example, n = trial, trial_n
    if not (MIN_TOKENS <= n <= MAX_TOKENS and len(chosen) + 1 >= MIN_DOCS):
        raise RuntimeError(
            f"could not build an example for {name}: {n} tokens, {len(chosen) + 1} docs"
        )
    example["_tokens"] = n
    return example


def generate() -> tuple[dict[str, bytes], dict]:
    if sys.version_info[:3] != GENERATED_WITH:
        print(
            "warning: the committed data was generated with CPython "
            f"{'.'.join(map(str, GENERATED_WITH))}; this is {sys.version.split()[0]}, whose "
            "docstrings and signatures may differ (even patch releases change a few)",
            file=sys.stderr,
        )
    functions = collect_functions_clean()
    by_name = {f["name"]: f for f in functions}
    heldout_fn = by_name[HELDOUT_FUNCTION]
    rest = [f for f in functions if f["name"] != HELDOUT_FUNCTION]
    rng = random.Random(SEED)
    rng.shuffle(rest)
    n_eval_pool = int(len(rest) * EVAL_POOL_FRACTION)
    eval_pool, train_pool = rest[:n_eval_pool], rest[n_eval_pool:]
    if len(train_pool) < N_TRAIN or len(eval_pool) < N_EVAL + 1:
        raise RuntimeError(f"too few functions: {len(train_pool)} train, {len(eval_pool)} eval")

    lengths = Lengths()
    train = [make_example(rng, t, train_pool, lengths) for t in train_pool[:N_TRAIN]]
    evals = [make_example(rng, t, eval_pool, lengths) for t in eval_pool[:N_EVAL]]
    held = make_example(rng, heldout_fn, eval_pool, lengths)

    def jsonl(examples: list[dict]) -> bytes:
        lines = [json.dumps({"messages": e["messages"]}, ensure_ascii=False) for e in examples]
        return ("\n".join(lines) + "\n").encode("utf-8")

    user = held["messages"][1]["content"]
    answer = held["messages"][2]["content"]
    docs = [
        block.strip()
        for block in re.split(
            r"\n\n(?=\[Document \d+\] )", user.split("\n\n", 1)[1].rsplit("\n\nQuestion: ", 1)[0]
        )
    ]
    k = int(re.match(r"Document (\d+) ", answer).group(1))
    heldout = {
        "messages": held["messages"][:2],
        "question": QUESTION_TEMPLATE.format(name=heldout_fn["name"]),
        "documents": docs,
        "relevant_document": k,
        "reference_answer": answer,
    }
    files = {
        "train.jsonl": jsonl(train),
        "eval.jsonl": jsonl(evals),
        "heldout.json": (json.dumps(heldout, ensure_ascii=False, indent=2) + "\n").encode("utf-8"),
        "SOURCE.md": SOURCE_MD.format(
            n_functions=len(functions), n_modules=len(MODULES), n_train=N_TRAIN, n_eval=N_EVAL
        ).encode("utf-8"),
    }
    stats = {
        "functions": len(functions),
        "train_pool": len(train_pool),
        "eval_pool": len(eval_pool),
        "train": [e["_tokens"] for e in train],
        "eval": [e["_tokens"] for e in evals],
        "heldout": [held["_tokens"]],
        "docs": [e["messages"][1]["content"].count("\n[Document ") for e in train + evals],
    }
    return files, stats


SOURCE_MD = """\
# Demo data: source and license

Generated by `scripts/make_demo_data.py` (seeded, deterministic; `--check` verifies these files).

**Text.** Every document is the real documentation string (`inspect.getdoc`) of a public
function of the CPython 3.11.7 standard library, Linux build ({n_functions} functions from
{n_modules} modules such as `os`, `math`, `textwrap`, `shutil`, `inspect`), headed by the
function's name and signature; long docstrings are cut at a paragraph boundary. Regenerating
byte-identically needs that same Python (other releases change a few docstrings) plus
`transformers` and the SmolLM2 checkpoint (`longtune.assets`) to measure token lengths. Only the framing sentences (the
instruction, the question form and the answer form) are templated.

**License.** Python's docstrings are part of CPython, (c) Python Software Foundation, distributed
under the Python Software Foundation License Version 2 (permissive, GPL-compatible; see
https://docs.python.org/3/license.html).

**Task.** Each example's user message holds 4-9 documents, one relevant and the others
distractors, and the question "According to the documents, what does `module.func` do?";
the assistant answers "Document k describes `module.func`: <summary>", where the summary is the
relevant docstring's first line, copied verbatim. Train ({n_train}), eval ({n_eval}) and the
held-out example (`heldout.json`, about `textwrap.dedent`) use disjoint sets of functions.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed files differ")
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="output folder")
    parser.add_argument("--dump-functions", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.dump_functions:  # used by collect_functions_clean
        sys.stdout.write(json.dumps(collect_functions(), ensure_ascii=True))
        return 0

    files, stats = generate()

    def summary(xs: list[int]) -> str:
        return f"min {min(xs)}, median {statistics.median(xs):g}, max {max(xs)} (n={len(xs)})"

    print(
        f"functions: {stats['functions']} (train pool {stats['train_pool']}, eval pool {stats['eval_pool']})"
    )
    print(f"tokens per example (SmolLM2 chat template): train {summary(stats['train'])}")
    print(f"tokens per example (SmolLM2 chat template): eval  {summary(stats['eval'])}")
    print(f"tokens of the held-out example: {stats['heldout'][0]}")
    print(f"documents per example: {summary(stats['docs'])}")
    print(f"total bytes: {sum(len(b) for b in files.values())}")

    if args.check:
        bad = [
            n
            for n, b in files.items()
            if not (args.out / n).is_file() or (args.out / n).read_bytes() != b
        ]
        if bad:
            print(
                f"MISMATCH: {', '.join(bad)} differ from what the script generates", file=sys.stderr
            )
            return 1
        print(f"OK: {args.out} matches the generator")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    for n, b in files.items():
        (args.out / n).write_bytes(b)
    print(f"wrote {', '.join(files)} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
