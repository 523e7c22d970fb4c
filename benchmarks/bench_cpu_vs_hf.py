"""``longtune train`` (its defaults) against a plain transformers training step, on CPU.

The workload this project exists for: long-context chat examples (retrieved documents in the
user turn, a short answer; the bundled demo data by default), several packed per sequence of
``--context`` tokens, loss on the answers; full fine-tuning in float32 with AdamW.

- longtune: the real CLI, ``longtune train --model M --data D --context-length C
  --duration Nst`` in a subprocess, every other setting at its default. Throughput is the median
  ``tokens_per_s`` of its ``metrics.jsonl`` after the first step; memory is the process's peak
  resident set while training (``peak_memory_gb`` of the last step record; the final
  checkpoint and export come after it), and the peak of the whole process is shown too.
- transformers: ``LlamaForCausalLM`` (SDPA attention, float32) in a subprocess, fed the same
  packed sequences in the same order (longtune's packer and loader, seed 0) as plain
  ``input_ids`` + ``labels`` (-100 off the answers), ``loss.backward()``, gradient clipping at
  1.0, ``AdamW`` with longtune's default hyper-parameters. Same time and memory measurements.

The two sides alternate (hf, lt, lt, hf, ...), each in its own process; the medians over the
runs and their ratios are reported. Every process's share of CPU-pressure stall time is read
from ``/proc/pressure/cpu`` (``some`` total, µs); a run whose stall share is above
``--max-stall`` was contended by other work and is left out of the medians (shown, marked).

    python benchmarks/bench_cpu_vs_hf.py                      # SmolLM2-135M, demo data, 4096
    python benchmarks/bench_cpu_vs_hf.py --runs 5 --steps 4 --out results.json
    python benchmarks/bench_cpu_vs_hf.py --longtune-env MALLOC_MMAP_THRESHOLD_=131072

Other arguments after ``--`` go to ``longtune train`` (e.g. ``-- --model.attention=sdpa``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEMO_DATA = REPO / "longtune" / "demo" / "data" / "train.jsonl"


def cpu_stall_us() -> int | None:
    """Cumulative µs during which some runnable task waited for a CPU (None without PSI)."""
    try:
        text = Path("/proc/pressure/cpu").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("some"):
            return int(dict(kv.split("=") for kv in line.split()[1:])["total"])
    return None


def run_child(cmd: list[str], env: dict[str, str]) -> dict:
    """Run one measured process: wall time, stdout, its peak RSS, the CPU stall share over it."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        stall0, t0 = cpu_stall_us(), time.monotonic()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.monotonic() - t0
        stall1 = cpu_stall_us()
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{stderr[-3000:]}")
    return {
        "wall_s": wall,
        "stdout": stdout,
        "process_peak_gb": usage.ru_maxrss / 2**20,
        "stall": None if stall0 is None else (stall1 - stall0) / (wall * 1e6),
    }


# ---------------------------------------------------------------------------------------------
# The transformers side (runs in its own process)
# ---------------------------------------------------------------------------------------------


def hf_side(model_dir: str, data: str, context: int, steps: int, cache_dir: str) -> dict:
    """``steps`` plain transformers training steps on longtune's packed sequences."""
    import torch
    from transformers import LlamaForCausalLM

    from longtune.data import IGNORE_INDEX, PackedLoader, build_packed_dataset
    from longtune.train.config import OptimConfig

    dataset = build_packed_dataset([data], model_dir, "chat", context, cache_dir=cache_dir)
    loader = PackedLoader(
        dataset, micro_batch_size=1, dp_rank=0, dp_size=1, sp_rank=0, sp_size=1, seed=0
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="sdpa"
    ).train()
    opt = OptimConfig()
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=opt.lr,
        betas=tuple(opt.betas),
        eps=opt.eps,
        weight_decay=opt.weight_decay,
    )
    times, losses = [], []
    for _ in range(steps):
        b = next(loader)
        ids = b["input_ids"]
        # longtune's labels are already shifted (label i is the target of token i); transformers
        # shifts inside, so the same targets are labels[i + 1] = ours[i].
        labels = torch.cat([torch.full_like(ids[:, :1], IGNORE_INDEX), b["labels"][:, :-1]], 1)
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), opt.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    return {
        "tokens_per_s": ids.numel() / statistics.median(times[1:] or times),
        "train_peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "losses": losses,
        "threads": torch.get_num_threads(),
    }


# ---------------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------------


def longtune_side(a: argparse.Namespace, env: dict[str, str], workdir: Path) -> dict:
    run_dir = workdir / "run"
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    cmd = [
        sys.executable,
        "-m",
        "longtune",
        "train",
        "--model",
        a.model,
        "--data",
        a.data,
        "--context-length",
        str(a.context),
        "--duration",
        f"{a.steps}st",
        "--output-dir",
        str(run_dir),
        f"--data.cache_dir={workdir / 'cache'}",
        *a.extra,
    ]
    res = run_child(cmd, {**env, **dict(kv.split("=", 1) for kv in a.longtune_env)})
    records = [
        json.loads(line)
        for line in (run_dir / "metrics.jsonl").read_text().splitlines()
        if '"train"' in line
    ]
    speeds = [r["tokens_per_s"] for r in records[1:]] or [records[0]["tokens_per_s"]]
    res.update(
        tokens_per_s=statistics.median(speeds),
        train_peak_gb=records[-1]["peak_memory_gb"],
        losses=[r["loss"] for r in records],
    )
    return res


def hf_run(a: argparse.Namespace, env: dict[str, str], workdir: Path) -> dict:
    cmd = [sys.executable, __file__, "--_hf", a.model, a.data, str(a.context), str(a.steps)]
    cmd += ["--_cache", str(workdir / "cache")]
    res = run_child(cmd, env)
    res.update(json.loads(res.pop("stdout").strip().splitlines()[-1]))
    return res


def fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="HF Llama folder (default: SmolLM2-135M)")
    p.add_argument("--data", default=str(DEMO_DATA), help="chat JSONL (default: the demo data)")
    p.add_argument("--context", type=int, default=4096, help="tokens per packed sequence")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per run (first = warmup)")
    p.add_argument("--runs", type=int, default=3, help="runs of each side, alternating")
    p.add_argument("--max-stall", type=float, default=0.05, help="reject runs above this stall")
    p.add_argument("--out", default=None, help="also write the results here (JSON)")
    p.add_argument(
        "--longtune-env",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="environment of the longtune processes only (e.g. glibc's MALLOC_MMAP_THRESHOLD_)",
    )
    p.add_argument("--_hf", nargs=4, help=argparse.SUPPRESS)
    p.add_argument("--_cache", help=argparse.SUPPRESS)
    a, extra = p.parse_known_args()
    a.extra = [x for x in extra if x != "--"]
    if a._hf:
        model, data, context, steps = a._hf
        print(json.dumps(hf_side(model, data, int(context), int(steps), a._cache)))
        return
    if a.model is None:
        from longtune.assets import smollm2_checkpoint

        a.model = str(smollm2_checkpoint())
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    lines = [
        f"model {a.model}; data {a.data}; context {a.context}; {a.steps} steps per run "
        f"(first = warm-up); {a.runs} runs per side, alternating; extra: {a.extra or 'none'}; "
        f"longtune env: {a.longtune_env or 'none'}",
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        f"{'run':>3} {'side':<12} {'tokens/s':>9} {'train peak GB':>13} {'process peak GB':>15} "
        f"{'stall':>6} {'wall s':>7}  losses",
    ]
    print("\n".join(lines), flush=True)
    results: dict[str, list[dict]] = {"transformers": [], "longtune": []}
    with tempfile.TemporaryDirectory(prefix="bench_cpu_vs_hf_") as tmp:
        workdir = Path(tmp)
        for r in range(a.runs):
            order = ("transformers", "longtune") if r % 2 == 0 else ("longtune", "transformers")
            for side in order:
                res = (hf_run if side == "transformers" else longtune_side)(a, env, workdir)
                res.pop("stdout", None)
                res["ok"] = res["stall"] is None or res["stall"] <= a.max_stall
                results[side].append(res)
                line = (
                    f"{r:>3} {side:<12} {res['tokens_per_s']:>9.1f} {res['train_peak_gb']:>13.2f} "
                    f"{res['process_peak_gb']:>15.2f} "
                    f"{fmt(res['stall'], '>6.1%')} {res['wall_s']:>7.0f}  "
                    f"{' '.join(f'{x:.3f}' for x in res['losses'])}"
                    + ("" if res["ok"] else "  REJECTED (contended)")
                )
                lines.append(line)
                print(line, flush=True)
    summary = {}
    for side, runs in results.items():
        ok = [x for x in runs if x["ok"]]
        summary[side] = {
            "clean_runs": len(ok),
            "tokens_per_s": statistics.median(x["tokens_per_s"] for x in ok) if ok else None,
            "train_peak_gb": statistics.median(x["train_peak_gb"] for x in ok) if ok else None,
        }
    hf, lt = summary["transformers"], summary["longtune"]
    if hf["clean_runs"] and lt["clean_runs"]:
        speed = lt["tokens_per_s"] / hf["tokens_per_s"]
        mem = lt["train_peak_gb"] / hf["train_peak_gb"]
        final = (
            f"medians of clean runs: transformers {hf['tokens_per_s']:.1f} tokens/s, "
            f"{hf['train_peak_gb']:.2f} GB; longtune {lt['tokens_per_s']:.1f} tokens/s, "
            f"{lt['train_peak_gb']:.2f} GB -> speed {speed:.2f}x, peak memory {mem:.2f}x"
        )
        summary["speed_ratio"], summary["memory_ratio"] = speed, mem
    else:
        final = "no clean (uncontended) run on one side: rerun on a quiet machine"
    lines.append(final)
    print(final, flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps({"summary": summary, "runs": results}, indent=1))


if __name__ == "__main__":
    main()
