"""Tokenize-and-pack throughput of the data path, first run and cached run.

Generates a chat JSONL file of at least ``--mb`` megabytes (random multi-turn conversations),
then times ``build_packed_dataset`` twice with a fresh cache folder: the first run validates,
tokenizes with the model's chat template and packs; the second finds the token store and only
validates and packs. Prints tokens/s for both, and the process's peak resident memory over each
run (``VmHWM``, reset before each run by writing ``5`` to ``/proc/self/clear_refs``; file pages
mapped by the process count, as they do for the machine's memory limits) with its baseline and,
at the end of the run, the anonymous and file-backed parts of the resident memory.

    python benchmarks/bench_data.py --mb 50 --context-length 8192
    python benchmarks/bench_data.py --mb 2048 --workdir /tmp/bench-data   # the 2 GB case
    python benchmarks/bench_data.py --mb 200 --processes 2   # tokenized in 2 processes
    python benchmarks/bench_data.py --mb 50 --phases   # + a cached run phase by phase

The phases of an already-built 2 GB workdir alone: ``cd benchmarks && python -c "import
bench_data as b; from pathlib import Path; w = Path('/tmp/bench-data'); b.phases(w / 'chat.jsonl',
MODEL, w / 'cache', 8192)"``.

With several tokenizing processes (``--processes``, or auto on 4+ CPUs for files of 64 MiB or
more) it also prints the largest process's peak and the sum bound of all of them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import shutil
import tempfile
import time
from pathlib import Path

from longtune.data import build_packed_dataset
from longtune.data.tokenize import tokenize_processes


def status_kb(*fields: str) -> dict[str, int]:
    """Fields of ``/proc/self/status`` in kB (VmRSS, VmHWM, RssAnon, RssFile)."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key = line.split(":")[0]
        if key in fields:
            out[key] = int(line.split()[1])
    return out


WORDS = (
    "the model reads long documents and answers questions about them with care while the "
    "sequence parallel group shares one packed sequence across ranks token context window "
    "gradient loss mask assistant user system tool parquet lorem ipsum dolor sit amet 42 7 "
    "naïve café 数据 训练 — “quoted” text, with punctuation; and numbers 3.14159 too!"
).split()


def generate(path: Path, megabytes: float, seed: int = 0) -> int:
    """Write random chat examples until the file holds ``megabytes`` MB; return the count."""
    rng = random.Random(seed)
    target = int(megabytes * 1e6)
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        while f.tell() < target:
            msgs = [{"role": "system", "content": "You are a helpful assistant."}]
            for _ in range(rng.randint(1, 4)):
                for role in ("user", "assistant"):
                    k = rng.randint(5, 400)
                    msgs.append({"role": role, "content": " ".join(rng.choices(WORDS, k=k))})
            f.write(json.dumps({"messages": msgs}, ensure_ascii=False) + "\n")
            n += 1
    return n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=50.0, help="size of the generated file")
    parser.add_argument("--context-length", type=int, default=8192)
    parser.add_argument("--model", default=None, help="HF folder (default: SmolLM2 asset)")
    parser.add_argument("--workdir", default=None, help="where to put the file and cache")
    parser.add_argument(
        "--processes", type=int, default=0, help="data.tokenize_processes (0: auto)"
    )
    parser.add_argument(
        "--phases",
        action="store_true",
        help="after the runs: each phase of a cached run with its peak, and where a first run's "
        "time goes on a 3 MB sample",
    )
    args = parser.parse_args()

    if args.model is None:
        from longtune.assets import smollm2_checkpoint

        args.model = str(smollm2_checkpoint())
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_data_"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / "chat.jsonl"
    cache = work / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    t = time.perf_counter()
    n = generate(data, args.mb)
    size = data.stat().st_size / 1e6
    print(f"generated {n} examples, {size:.1f} MB in {time.perf_counter() - t:.1f} s")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")

    for run in ("first", "cached"):
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        base = status_kb("VmRSS")["VmRSS"]
        t = time.perf_counter()
        ds = build_packed_dataset(
            [str(data)],
            args.model,
            "chat",
            args.context_length,
            cache_dir=cache,
            tokenize_processes=args.processes,
        )
        dt = time.perf_counter() - t
        s = ds.stats
        print(
            f"{run:>6} run: {dt:7.2f} s  {s.tokens / dt:12,.0f} tokens/s  {size / dt:6.2f} MB/s  "
            f"({s.documents} docs, {s.tokens:,} tokens, {s.packed_sequences} sequences of "
            f"{args.context_length}, padding {s.padding_fraction:.4f})"
        )
        mem = status_kb("VmHWM", "RssAnon", "RssFile")
        print(
            f"{'':>6}      peak RSS {mem['VmHWM'] / 2**20:.2f} GiB (baseline "
            f"{base / 2**20:.2f} GiB; at the end anonymous {mem['RssAnon'] / 2**20:.2f} GiB, "
            f"file-backed {mem['RssFile'] / 2**20:.2f} GiB)"
        )
        children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # kB, largest child
        n = tokenize_processes(args.processes, str(data))
        if run == "first" and n > 1:
            print(
                f"{'':>6}      {n} tokenizing processes, the largest peaked at "
                f"{children / 2**20:.2f} GiB (all together at most "
                f"{(mem['VmHWM'] + n * children) / 2**20:.2f} GiB with this process)"
            )
        del ds
    if args.phases:
        phases(data, args.model, cache, args.context_length)
        time_split(work, args.model)
    shutil.rmtree(work) if args.workdir is None else None


def measured(name: str, fn):  # noqa: ANN001, ANN201
    """Run ``fn`` with the peak RSS reset; print its time and peak."""
    Path("/proc/self/clear_refs").write_text("5")
    t = time.perf_counter()
    out = fn()
    mem = status_kb("VmHWM", "VmRSS")
    print(
        f"  {name:<12} {time.perf_counter() - t:7.2f} s  peak RSS {mem['VmHWM'] / 2**20:.2f} GiB "
        f"(after: {mem['VmRSS'] / 2**20:.2f} GiB)"
    )
    return out


def phases(data: Path, model: str, cache: Path, context_length: int) -> None:
    """A cached run phase by phase: validation, opening (and verifying) the stores, packing."""
    from longtune.data import PackedDataset, tokenize_files, validate_files

    print("cached run, phase by phase:")
    measured("validate", lambda: validate_files([str(data)], "chat"))
    stores = measured(
        "open stores", lambda: tokenize_files([str(data)], model, "chat", cache_dir=cache)
    )
    measured("pack", lambda: PackedDataset(stores, context_length, stores[0].pad_id, "truncate"))


def time_split(work: Path, model: str) -> None:
    """Where a first run's time goes, on a 3 MB sample: rendering the chat template (per
    assistant turn) and the Rust tokenizer's batch encoding, each alone, then
    ``Encoder.encode`` doing both and the masks."""
    from longtune.data import Encoder, iter_records
    from longtune.data.tokenize import load_tokenizer

    sample = work / "sample.jsonl"
    generate(sample, 3, seed=1)
    tok = load_tokenizer(model)
    encoder = Encoder(tok, "chat")
    records = list(iter_records(str(sample), "chat"))
    t = time.perf_counter()
    texts = [encoder.render(r)[0] for r in records]
    render = time.perf_counter() - t
    t = time.perf_counter()
    encodings = tok.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    encode = time.perf_counter() - t
    t = time.perf_counter()
    encoder.encode(records)
    whole = time.perf_counter() - t
    tokens = sum(len(e.ids) for e in encodings)
    print(
        f"3 MB sample, {len(records)} conversations, {tokens:,} tokens: rendering {render:.2f} s, "
        f"encode_batch {encode:.2f} s; Encoder.encode (both, and the masks) {whole:.2f} s"
    )
