"""LoRA (rank 16 on all seven projections) against full fine-tuning, both ``longtune train``.

Speed mode (the default): the real CLI in a subprocess per run, ``longtune train --model M
--data D --context-length C --duration Nst --output-dir RUN`` with every other setting at its
default, once as full fine-tuning and once with ``--model.lora.rank=16`` (SmolLM2-135M, the
bundled demo data, 4,096 tokens by default). Per run:

- tokens/s: the median ``tokens_per_s`` of ``metrics.jsonl`` after the first step;
- training peak: ``peak_memory_gb`` of the last train record (peak RSS on CPU, before the final
  checkpoint and the export), and the whole process's peak RSS;
- the final checkpoint's size: every file under ``RUN/checkpoints/step-N``.

The two sides alternate (full, lora, lora, full, ...), each in its own process and output
folder (deleted after it is measured; the token cache is shared). A run whose share of
CPU-pressure stall time (``/proc/pressure/cpu``, ``some``) is above ``--max-stall`` was
contended by other work and is left out of the medians (shown, marked). Medians and the ratios
LoRA / full are printed.

Demo mode (``--demo-eval``): the demo's settings (``longtune.demo.DEMO_SETTINGS``,
``DEMO_STEPS``; train and eval files of ``longtune/demo/data``) through ``longtune.finetune``,
each run in its own process: full fine-tuning at the demo's learning rate, then LoRA r=16 at
each of ``--lora-lrs``; prints the eval loss at step 0 and at the end of each.

    python benchmarks/bench_lora.py                          # 2 runs per side, 4 steps, 4096
    python benchmarks/bench_lora.py --runs 3 --out results.json
    python benchmarks/bench_lora.py --env MALLOC_MMAP_THRESHOLD_=131072   # freed memory returned
    python benchmarks/bench_lora.py --demo-eval --lora-lrs 1e-3 1e-4

Other arguments after ``--`` go to every ``longtune train`` of the speed mode (e.g.
``-- --model.lora.targets=attention``: the LoRA side's flags come after them).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from bench_cpu_vs_hf import run_child  # the same measured-process protocol

REPO = Path(__file__).resolve().parent.parent
DEMO_DATA = REPO / "longtune" / "demo" / "data"
SIDES = {"full": [], "lora": ["--model.lora.rank=16"]}


def read_records(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("kind") == kind]


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def adapter_params(run_dir: Path) -> int | None:
    """The adapter count the trainer logs for a LoRA run (None for full fine-tuning)."""
    for line in (run_dir / "train.log").read_text().splitlines():
        if "adapter parameters" in line:
            return int(line.split(": ", 1)[1].split(" adapter parameters")[0].split()[-1])
    return None


# ---------------------------------------------------------------------------------------------
# Speed mode
# ---------------------------------------------------------------------------------------------


def train_run(a: argparse.Namespace, side: str, env: dict[str, str], workdir: Path, r: int) -> dict:
    """One ``longtune train`` of ``side``; its measurements (the run folder is deleted)."""
    run_dir = workdir / f"{side}-{r}"
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
        *SIDES[side],
    ]
    res = run_child(cmd, env)
    records = read_records(run_dir, "train")
    speeds = [x["tokens_per_s"] for x in records[1:]] or [records[0]["tokens_per_s"]]
    ckpt = run_dir / "checkpoints" / f"step-{records[-1]['step']}"
    res.update(
        tokens_per_s=statistics.median(speeds),
        train_peak_gb=records[-1]["peak_memory_gb"],
        checkpoint_bytes=folder_bytes(ckpt),
        export_bytes=folder_bytes(run_dir / "hf"),
        adapter_params=adapter_params(run_dir),
        losses=[x["loss"] for x in records],
    )
    res.pop("stdout")
    if not a.keep:
        shutil.rmtree(run_dir)
    return res


def fmt(x: float | None, spec: str) -> str:
    """``x`` formatted with ``spec``; None as a dash of the same width."""
    width = "".join(c for c in spec.split(".")[0].split(",")[0] if c.isdigit())
    return format("-", f">{width}") if x is None else format(x, spec)


KEYS = ("tokens_per_s", "train_peak_gb", "process_peak_gb", "checkpoint_bytes")


def summarize(results: dict[str, list[dict]]) -> dict:
    """Medians per side and the ratios LoRA / full: tokens/s over the clean runs only
    (contention slows a run), memory and sizes over every run (contention does not change
    them)."""
    summary: dict = {}
    for side, runs in results.items():
        ok = [x for x in runs if x["ok"]]
        summary[side] = {
            "clean_runs": len(ok),
            "tokens_per_s": statistics.median(x["tokens_per_s"] for x in ok) if ok else None,
            "adapter_params": runs[0]["adapter_params"],
        }
        summary[side]["tokens_per_s_all"] = statistics.median(x["tokens_per_s"] for x in runs)
        for key in ("train_peak_gb", "process_peak_gb", "checkpoint_bytes"):
            summary[side][key] = statistics.median(x[key] for x in runs)
    full, lora = summary["full"], summary["lora"]
    for key in (*KEYS, "tokens_per_s_all"):
        both = lora[key] is not None and full[key] is not None
        summary[f"{key}_ratio"] = lora[key] / full[key] if both else None
    return summary


def summary_table(summary: dict) -> list[str]:
    full, lora = summary["full"], summary["lora"]
    table = ["", f"{'':<28} {'full':>13} {'lora r=16':>13} {'lora / full':>12}"]
    for key, label, spec in (
        ("tokens_per_s", "tokens/s (clean runs)", ".1f"),
        ("tokens_per_s_all", "tokens/s (all runs)", ".1f"),
        ("train_peak_gb", "train peak GB (all runs)", ".2f"),
        ("process_peak_gb", "process peak GB (all runs)", ".2f"),
        ("checkpoint_bytes", "checkpoint bytes", ",.0f"),
    ):
        table.append(
            f"{label:<28} {fmt(full[key], '>13' + spec)} {fmt(lora[key], '>13' + spec)} "
            f"{fmt(summary[key + '_ratio'], '>12.3f')}"
        )
    table.append(
        f"clean runs: full {full['clean_runs']}, lora {lora['clean_runs']}; "
        f"adapter parameters: {lora['adapter_params']:,}"
    )
    if not (full["clean_runs"] and lora["clean_runs"]):
        table.append(
            "no clean (uncontended) run on one side for tokens/s: rerun on a quiet machine"
        )
    return table


def speed_mode(a: argparse.Namespace, env: dict[str, str]) -> None:
    lines = [
        f"model {a.model}; data {a.data}; context {a.context}; {a.steps} steps per run "
        f"(first = warm-up); {a.runs} runs per side, alternating; lora side: "
        f"{' '.join(SIDES['lora'])}; extra: {a.extra or 'none'}; env: {a.env or 'none'}",
        machine_line(),
        f"{'run':>3} {'side':<5} {'tokens/s':>9} {'train peak GB':>13} {'process peak GB':>15} "
        f"{'ckpt MB':>9} {'stall':>6} {'wall s':>7}  losses",
    ]
    print("\n".join(lines), flush=True)
    results: dict[str, list[dict]] = {"full": [], "lora": []}
    workdir = Path(tempfile.mkdtemp(prefix="bench_lora_", dir=a.workdir))
    try:
        for r in range(a.runs):
            for side in ("full", "lora") if r % 2 == 0 else ("lora", "full"):
                res = train_run(a, side, env, workdir, r)
                res["ok"] = res["stall"] is None or res["stall"] <= a.max_stall
                results[side].append(res)
                line = (
                    f"{r:>3} {side:<5} {res['tokens_per_s']:>9.1f} {res['train_peak_gb']:>13.2f} "
                    f"{res['process_peak_gb']:>15.2f} {res['checkpoint_bytes'] / 1e6:>9.1f} "
                    f"{fmt(res['stall'], '>6.1%')} {res['wall_s']:>7.0f}  "
                    f"{' '.join(f'{x:.3f}' for x in res['losses'])}"
                    + ("" if res["ok"] else "  REJECTED (contended)")
                )
                lines.append(line)
                print(line, flush=True)
    finally:
        if not a.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    summary = summarize(results)
    table = summary_table(summary)
    lines += table
    print("\n".join(table), flush=True)
    if a.out:
        Path(a.out).write_text(
            json.dumps({"summary": summary, "runs": results, "log": lines}, indent=1)
        )


# ---------------------------------------------------------------------------------------------
# Demo mode
# ---------------------------------------------------------------------------------------------


def demo_child(model: str, out: str, lr: float, rank: int) -> dict:
    """The demo's run (``longtune.demo.run.run_demo``'s ``finetune`` call) at ``lr``, with LoRA
    rank ``rank`` (0 = full fine-tuning); runs in its own process."""
    from longtune.api import finetune
    from longtune.demo import DATA_DIR, DEMO_SETTINGS, DEMO_STEPS

    settings = {**DEMO_SETTINGS, "learning_rate": lr}
    if rank:
        settings["model__lora__rank"] = rank
    result = finetune(
        model=model,
        train_data=str(DATA_DIR / "train.jsonl"),
        eval_data=str(DATA_DIR / "eval.jsonl"),
        task_type="chat",
        duration=f"{DEMO_STEPS}st",
        output_dir=out,
        **settings,
    )
    train = [m for m in result.metrics if m.get("kind") == "train"]
    evals = [m for m in result.metrics if m.get("kind") == "eval"]
    last = result.final_step
    return {
        "status": result.status,
        "steps": last,
        "eval": [[m["step"], m["eval_loss"]] for m in evals],
        "train_losses": [m["loss"] for m in train],
        "tokens_per_s": statistics.median(m["tokens_per_s"] for m in train[1:]),
        "train_peak_gb": train[-1]["peak_memory_gb"],
        "checkpoint_bytes": folder_bytes(Path(out) / "checkpoints" / f"step-{last}"),
        "export_rel_err": (result.export_check or {}).get("rel_err_vs_transformers"),
    }


def demo_mode(a: argparse.Namespace, env: dict[str, str]) -> None:
    from longtune.demo import DEMO_SETTINGS, DEMO_STEPS

    demo_lr = DEMO_SETTINGS["learning_rate"]
    cases = [("full", 0, demo_lr)] + [("lora r=16", 16, lr) for lr in a.lora_lrs]
    head = [
        f"the demo's settings ({DEMO_STEPS} steps, {DEMO_SETTINGS}), learning rate per run",
        machine_line(),
        f"{'run':<10} {'lr':>7} {'eval@0':>8} {'eval@end':>9} {'tokens/s':>9} {'peak GB':>8} "
        f"{'ckpt MB':>9} {'stall':>6} {'wall s':>7}",
    ]
    print("\n".join(head), flush=True)
    lines, runs = list(head), []
    workdir = Path(tempfile.mkdtemp(prefix="bench_lora_demo_", dir=a.workdir))
    try:
        for name, rank, lr in cases:
            out = workdir / f"{name.split()[0]}-{lr:g}"
            cmd = [sys.executable, __file__, "--_demo", a.model, str(out), repr(lr), str(rank)]
            res = run_child(cmd, env)
            res.update(json.loads(res.pop("stdout").strip().splitlines()[-1]))
            res.update(name=name, lr=lr)
            runs.append(res)
            (s0, e0), (s1, e1) = res["eval"][0], res["eval"][-1]
            line = (
                f"{name:<10} {lr:>7g} {e0:>8.4f} {e1:>9.4f} {res['tokens_per_s']:>9.1f} "
                f"{res['train_peak_gb']:>8.2f} {res['checkpoint_bytes'] / 1e6:>9.1f} "
                f"{fmt(res['stall'], '>6.1%')} {res['wall_s']:>7.0f}  (eval at steps {s0}, {s1})"
            )
            lines.append(line)
            print(line, flush=True)
            if not a.keep:
                shutil.rmtree(out)
    finally:
        if not a.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    if a.out:
        Path(a.out).write_text(json.dumps({"runs": runs, "log": lines}, indent=1))


def machine_line() -> str:
    import torch
    import transformers

    return (
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="HF Llama folder (default: SmolLM2-135M)")
    p.add_argument(
        "--data", default=str(DEMO_DATA / "train.jsonl"), help="chat JSONL (default: demo data)"
    )
    p.add_argument("--context", type=int, default=4096, help="tokens per packed sequence")
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per run (first = warmup)")
    p.add_argument("--runs", type=int, default=2, help="runs of each side, alternating")
    p.add_argument("--max-stall", type=float, default=0.05, help="reject runs above this stall")
    p.add_argument("--out", default=None, help="also write the results here (JSON)")
    p.add_argument("--workdir", default=None, help="where the run folders go (default: $TMPDIR)")
    p.add_argument("--keep", action="store_true", help="keep the run folders")
    p.add_argument(
        "--env",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="environment of the measured processes (e.g. glibc's MALLOC_MMAP_THRESHOLD_)",
    )
    p.add_argument(
        "--demo-eval",
        action="store_true",
        help="the demo's eval loss: full fine-tuning vs LoRA r=16 (see --lora-lrs)",
    )
    p.add_argument(
        "--lora-lrs",
        nargs="+",
        type=float,
        default=[1e-3],
        help="--demo-eval: the learning rates of the LoRA runs (the full run: the demo's)",
    )
    p.add_argument("--_demo", nargs=4, help=argparse.SUPPRESS)
    a, extra = p.parse_known_args()
    a.extra = [x for x in extra if x != "--"]
    if a._demo:
        model, out, lr, rank = a._demo
        print(json.dumps(demo_child(model, out, float(lr), int(rank))))
        return
    if a.model is None:
        from longtune.assets import smollm2_checkpoint

        a.model = str(smollm2_checkpoint())
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.update(kv.split("=", 1) for kv in a.env)
    (demo_mode if a.demo_eval else speed_mode)(a, env)


if __name__ == "__main__":
    main()
