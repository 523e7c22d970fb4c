"""The planner's predicted peak memory per rank against one real training step on this CPU.

For each row (model, context, activation checkpointing, tiled MLP, SP degree, micro-batch):

- predicted: ``longtune.plan.planner.predict`` on the ``cpu`` device, float32 (as the trainer
  on CPU): its ``tensor_peak``, the traced tensor peak (no device terms on CPU);
- measured, in a fresh process per row (per rank, gloo, under torchrun for SP > 1): the model
  built the trainer's way (meta -> ``parallelize`` -> ``to_empty`` -> random init), AdamW with
  its state made by one step on zero gradients, then one step (forward with every token
  supervised, backward, optimizer step) on real tensors, under the planner's ``MemoryTracker``
  with the same holds and segments as ``longtune/plan/trace.py``: the *tracked* tensor peak;
  and the *RSS growth*: the process's peak resident set (``VmHWM``, reset through
  ``/proc/self/clear_refs``) above its resident set after imports and a small warm-up, before
  the model is built.

The measured process runs with glibc's ``MALLOC_MMAP_THRESHOLD_=65536`` (fixed, so freed tensor
memory goes back to the system instead of staying in the heap), ``MALLOC_TRIM_THRESHOLD_=0``
and ``MALLOC_ARENA_MAX=2``; ``--default-malloc`` leaves glibc's defaults. The optimizer is the
trainer's fused AdamW, which the planner traces too (``--optimizer loop``: the for-loop form).

    .venv/bin/python benchmarks/bench_plan.py --out plan.json        # the default rows (slow)
    .venv/bin/python benchmarks/bench_plan.py --models tiny --contexts 1024 --sp 1 --quick
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import itertools
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve()
MIB = 2**20

#: Model shapes (HF config fields over the Llama defaults of ``hardware._llama``).
SHAPES = {
    "smollm2-135m": None,  # MODEL_PRESETS["smollm2-135m"]
    # 4 blocks of dim 384: 6 query heads over 3 KV heads, so SP=3 is valid.
    "llama-4x384": dict(
        hidden_size=384,
        num_hidden_layers=4,
        num_attention_heads=6,
        num_key_value_heads=3,
        intermediate_size=1024,
        vocab_size=32000,
        rope_scaling=None,
    ),
    # The test's shape: 2 blocks of dim 128, a small vocabulary.
    "tiny": dict(
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=256,
        vocab_size=4096,
        rope_scaling=None,
    ),
}

#: The default rows (over 30 minutes on the loaded 2-core machine, most of it SmolLM2's): every lever on the 4-block shape (traced
#: whole) at 2K and 8K, micro-batch 2, SP=3; SmolLM2-135M (30 blocks: extrapolated from 3 and 4)
#: at 2K-4K and SP=3.
DEFAULT_ROWS = [
    ("smollm2-135m", 2048, "selective", False, 1, 1),
    *[("llama-4x384", c, ac, False, 1, 1) for c in (2048, 8192) for ac in ("none", "selective", "full")],
    ("llama-4x384", 8192, "selective", True, 1, 1),
    ("llama-4x384", 4096, "selective", False, 1, 2),
    ("llama-4x384", 6144, "selective", False, 3, 1),
    ("llama-4x384", 6144, "full", True, 3, 1),
    ("smollm2-135m", 3072, "selective", False, 3, 1),
    ("smollm2-135m", 2048, "full", False, 1, 1),
    ("smollm2-135m", 4096, "selective", True, 1, 1),
    ("smollm2-135m", 2048, "none", False, 1, 1),
]  # fmt: skip


def model_args(name: str):  # noqa: ANN201
    from longtune.model.args import ModelArgs
    from longtune.plan.hardware import MODEL_PRESETS, _llama

    shape = SHAPES[name]
    cfg = MODEL_PRESETS[name] if shape is None else _llama(1, 1, 1, 1, 1, **shape)
    return ModelArgs.from_hf_config(cfg)


# ---- measured: one process (or rank) per row ------------------------------------------------


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _step(args, spec: dict, context: int) -> tuple:  # noqa: ANN001
    """Build the model the trainer's way, make the optimizer state, run one tracked step.

    Returns:
        (the tracker, seconds to build, seconds of the step).
    """
    import torch
    import torch.distributed as dist

    from longtune.model.llama import Transformer
    from longtune.parallel.dims import ParallelDims
    from longtune.parallel.parallelize import is_fsdp_sharded, parallelize
    from longtune.plan.trace import _first_rows_supervised, make_optimizer_state, tracked_step

    rank, world = dist.get_rank(), dist.get_world_size()
    sp, mbs = spec["sp"], spec["mbs"]
    t0 = time.perf_counter()
    dims = ParallelDims.build(world, sp, -1, n_heads=args.n_heads, n_kv_heads=args.n_kv_heads)
    with torch.device("meta"):
        model = Transformer(args)
    levers = {"tiled_mlp": True} if spec["tiled"] else {}
    parallelize(model, dims.build_mesh("cpu"), spec["ac"], param_dtype=None, **levers)
    model.to_empty(device="cpu")
    if not is_fsdp_sharded(model):
        model.tie_weights()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            getattr(p, "_local_tensor", p).normal_(0.0, 0.02)
    model.init_buffers(device="cpu")
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    fused = spec["optimizer"] == "fused"
    opt = torch.optim.AdamW(trainable, lr=1e-5, foreach=False, fused=fused)
    make_optimizer_state(opt, trainable)

    local = context // sp
    g = torch.Generator().manual_seed(1 + rank)
    ids = torch.randint(0, args.vocab_size, (mbs, local), generator=g)
    pos = torch.arange(rank % sp * local, (rank % sp + 1) * local).expand(mbs, local)
    labels = torch.randint(0, args.vocab_size, (mbs, local), generator=g)
    t1 = time.perf_counter()
    with _first_rows_supervised(None):  # as the trace: every row supervised
        tracker = tracked_step(model, opt, ids, pos, labels)
    return tracker, t1 - t0, time.perf_counter() - t1


def worker(spec: dict) -> None:
    """Warm up, take the baseline, run the row's step; print this rank's figures as JSON."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    if "RANK" in os.environ:
        dist.init_process_group("gloo")
    else:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    args = model_args(spec["model"])
    # Warm-up: the same step with 1 block of dim 64 at 256 tokens a rank, so the runtime's
    # one-time allocations (lazy imports, thread pools, gloo, kernels) are not counted.
    small = dataclasses.replace(args, dim=64, head_dim=8, n_layers=1, ffn_dim=64, vocab_size=256)
    _step(small, spec, 256 * spec["sp"])
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    baseline_kb = _status_kb("VmRSS")
    tracker, build_s, step_s = _step(args, spec, spec["context"])
    hwm_kb = _status_kb("VmHWM")
    out = dict(
        rank=dist.get_rank(),
        tracked=tracker.peak,
        tracked_by=tracker.peak_by_label,
        rss_growth=(hwm_kb - baseline_kb) * 1024,
        baseline_rss=baseline_kb * 1024,
        step_s=round(step_s, 2),
        build_s=round(build_s, 2),
    )
    print("RESULT " + json.dumps(out), flush=True)
    dist.destroy_process_group()


def measure(spec: dict, malloc_env: bool, timeout: float) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent.parent)}
    if malloc_env:
        env.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0", MALLOC_ARENA_MAX="2")
    cmd = [sys.executable]
    if spec["sp"] > 1:
        cmd += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={spec['sp']}"]
    cmd += [str(HERE), "--worker", json.dumps(spec)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"worker failed for {spec}:\n{r.stderr[-3000:]}")
    rows = [json.loads(line[7:]) for line in r.stdout.splitlines() if line.startswith("RESULT ")]
    return sorted(rows, key=lambda x: x["rank"])


# ---- predicted, and the table -----------------------------------------------------------------


def predicted(spec: dict) -> dict:
    from longtune.plan.hardware import cpu_device
    from longtune.plan.planner import predict
    from longtune.plan.trace import Layout

    layout = Layout(sp=spec["sp"], ac=spec["ac"], tiled_mlp=spec["tiled"], micro_batch=spec["mbs"])
    p = predict(
        model_args(spec["model"]),
        layout,
        context=spec["context"],
        device=cpu_device(),
        nodes=1,
        gpus_per_node=spec["sp"],
        param_dtype=None,
    )
    return dict(tensor_peak=p.tensor_peak, device_bytes=p.device_bytes, segment=p.peak_segment)


HEADER = (
    f"{'model':<13} {'ctx':>6} {'ac':<9} {'tiled':<5} {'sp':>2} {'mbs':>3} "
    f"{'pred MiB':>9} {'tracked MiB':>11} {'ratio':>6} {'RSS+ MiB':>9} {'ratio':>6} {'step s':>7}"
)


def line(spec: dict, pred: dict, ranks: list[dict]) -> str:
    tracked = max(r["tracked"] for r in ranks)
    rss = max(r["rss_growth"] for r in ranks)
    p = pred["tensor_peak"]
    return (
        f"{spec['model']:<13} {spec['context']:>6} {spec['ac']:<9} {'on' if spec['tiled'] else 'off':<5} "
        f"{spec['sp']:>2} {spec['mbs']:>3} {p / MIB:>9.1f} {tracked / MIB:>11.1f} {p / tracked:>6.3f} "
        f"{rss / MIB:>9.1f} {p / rss:>6.3f} {max(r['step_s'] for r in ranks):>7.1f}"
    )  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--models", nargs="+", choices=sorted(SHAPES), help="a grid instead of the default rows")  # fmt: skip
    ap.add_argument("--contexts", nargs="+", type=int, default=[2048, 4096, 8192])
    ap.add_argument("--long", action="store_true", help="add 16K to the contexts")
    ap.add_argument("--ac", nargs="+", default=["none", "selective", "full"])
    ap.add_argument("--tiled", nargs="+", choices=["off", "on"], default=["off", "on"])
    ap.add_argument("--sp", nargs="+", type=int, default=[1, 3])
    ap.add_argument("--mbs", nargs="+", type=int, default=[1])
    ap.add_argument("--quick", action="store_true", help="tiny shape, 1K, SP=1: two rows (the test)")  # fmt: skip
    ap.add_argument("--optimizer", choices=["fused", "loop"], default="fused")
    ap.add_argument("--default-malloc", action="store_true", help="glibc's malloc defaults")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per row")
    ap.add_argument("--jobs", type=int, default=1, help="rows measured at once (times then overlap)")  # fmt: skip
    ap.add_argument("--out", type=Path, help="JSON of every row")
    a = ap.parse_args()
    if a.worker:
        worker(json.loads(a.worker))
        return
    if a.quick:
        rows = [("tiny", 1024, ac, False, 1, 1) for ac in ("none", "full")]
        a.jobs = 2
    elif a.models:
        contexts = a.contexts + [16384] * a.long
        grid = itertools.product(
            a.models, contexts, a.ac, [t == "on" for t in a.tiled], a.sp, a.mbs
        )
        rows = [r for r in grid if r[1] % r[4] == 0]
    else:
        rows = DEFAULT_ROWS + [("llama-4x384", 16384, "selective", True, 1, 1)] * a.long
    keys = ("model", "context", "ac", "tiled", "sp", "mbs")
    malloc = "glibc defaults" if a.default_malloc else "MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=0 MALLOC_ARENA_MAX=2"  # fmt: skip
    print(f"bench_plan: {len(rows)} rows; optimizer {a.optimizer}; measured with {malloc}", flush=True)  # fmt: skip
    print(HEADER, flush=True)
    records, start = [], time.perf_counter()
    specs = [dict(zip(keys, row, strict=True), optimizer=a.optimizer) for row in rows]

    with ThreadPoolExecutor(a.jobs) as pool:
        pending = []
        for spec in specs:
            pred = predicted(spec)
            pending.append(
                (spec, pred, pool.submit(measure, spec, not a.default_malloc, a.timeout))
            )
        for spec, pred, future in pending:
            try:
                ranks = future.result()
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                print(f"{spec['model']} {spec['context']} {spec['ac']} sp={spec['sp']}: failed: {e}", flush=True)  # fmt: skip
                records.append(dict(spec=spec, predicted=pred, error=str(e)[-2000:]))
                continue
            print(line(spec, pred, ranks), flush=True)
            records.append(dict(spec=spec, predicted=pred, ranks=ranks))
            if a.out:
                a.out.write_text(json.dumps(records, indent=1))
    print(f"bench_plan: {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
