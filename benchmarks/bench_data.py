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
    shutil.rmtree(work) if args.workdir is None else None


if __name__ == "__main__":
    main()
