"""Memory per rank under sequence parallelism: one training step at a fixed context, SP = 1, N, ...

Each SP degree runs under ``torchrun`` (gloo on CPU, NCCL on GPU) with the trainer's own pieces:
the model built on the meta device, ``parallelize`` (Ulysses, selective activation
checkpointing, FSDP2 over the SP ranks), AdamW. A warm-up step allocates gradients and optimizer
state; then one full step (forward, backward, optimizer) runs at a shorter context ``L0`` and
one at the measured context ``L``, each after resetting the peak-memory counter. ``L0`` is the
same for every degree: an eighth of ``L``, but at least one full loss chunk (1024 tokens) per
rank at the largest degree, so the loss's fixed-size chunk buffers are in both peaks. Reported per rank:

- ``base``: resident memory before the measured step (weights, gradients, optimizer state,
  runtime) — it shrinks with the FSDP shard, not with the context;
- ``peak``: peak resident memory during the step at ``L`` (CPU: ``VmHWM`` after ``clear_refs``,
  with glibc returning freed blocks to the system, ``--allocator live``, so that RSS follows the
  live tensors: with glibc's default, freed heap stays resident and the figures depend on the
  order of allocations more than on the context; GPU: ``torch.cuda.max_memory_allocated``);
- ``grows``: ``peak(L) - peak(L0)``, the part of the peak that grows with the context
  (activations, attention, communication buffers); what does not depend on the context
  (optimizer-step temporaries, loss chunk buffers) cancels. Under SP=N it should be about 1/N of
  SP=1's: the check printed is ``grows(N) <= 1.2 / N * grows(1)``.

With ``--tiled-mlp off on`` every degree runs without and with the tiled MLP
(``model.tiled_mlp``: the MLP and its norm over the tokens in tiles, the other norms tiled), and
the table gives tiled / untiled of ``peak`` and ``grows``. With ``--transformers`` the same step
of ``transformers``' ``LlamaForCausalLM`` (one process, gradient checkpointing on, SDPA,
full-sequence causal attention) is measured too, for reference, and every row's ``peak`` and
``grows`` is also given as a ratio to transformers'.

    .venv/bin/python benchmarks/bench_sp.py                               # SmolLM2 shape, SP 1, 3
    .venv/bin/python benchmarks/bench_sp.py --shape smollm2-8h --degrees 1 2 4
    .venv/bin/python benchmarks/bench_sp.py --context 16384 --transformers
    .venv/bin/python benchmarks/bench_sp.py --shape smollm2-8h --keep-exchanges  # the other policy
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_sp.py --context 16384 --degrees 1 \
        --tiled-mlp off on --transformers                    # tiled MLP against untiled

Shapes: ``smollm2`` is SmolLM2-135M (9 query / 3 KV heads, so SP degrees 1, 3, 9);
``smollm2-8h`` is the same size with 8 query / 2 KV heads of dimension 72 (SP 1, 2, 4, 8).
Random weights; random tokens packed as documents of ``--doc-len`` tokens, loss on every token.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

SHAPES = {
    "smollm2": dict(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, ffn_dim=1536),
    "smollm2-8h": dict(dim=576, n_layers=30, n_heads=8, n_kv_heads=2, ffn_dim=1536),
}
COMMON = dict(vocab_size=49152, rope_theta=100000.0, norm_eps=1e-5, tie_embeddings=True)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def measure_protocol(
    step: Callable[[int], float],
    opts: argparse.Namespace,
    layout: int | str,
    rank: int,
    tiled: bool = False,
) -> None:
    """Warm up at ``L0``, measure one step at ``L0`` and one at ``L``, append the record."""
    import torch

    on_gpu = torch.cuda.is_available()

    def measured(length: int) -> tuple[int, int, float]:
        """(memory before, peak during, seconds) of one step at ``length``."""
        if on_gpu:
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        else:
            _reset_peak()
            before = _status_kib("VmRSS") * 1024
        seconds = step(length)
        peak = torch.cuda.max_memory_allocated() if on_gpu else _status_kib("VmHWM") * 1024
        return before, peak, seconds

    step(opts.short)  # warm-up: gradients and optimizer state exist from here on
    _, peak_short, _ = measured(opts.short)
    base, peak, seconds = measured(opts.context)
    record = {
        "sp": layout,
        "tiled": tiled,
        "rank": rank,
        "base": base,
        "peak": peak,
        "grows": peak - peak_short,
        "seconds": seconds,
    }
    with open(opts.out, "a") as f:
        f.write(json.dumps(record) + "\n")


def worker(opts: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    from longtune.model.args import ModelArgs
    from longtune.model.llama import Transformer, positions_from_cu_seqlens
    from longtune.parallel.dims import ParallelDims, init_distributed
    from longtune.parallel.parallelize import parallelize

    rank, world, device = init_distributed()
    tiled = opts.tiled_mlp == ["on"]  # a worker gets one setting
    args = ModelArgs(**SHAPES[opts.shape], **COMMON)
    dims = ParallelDims.build(
        world, world, n_heads=args.n_heads, n_kv_heads=args.n_kv_heads
    )  # all ranks in one SP group
    on_gpu = device.type == "cuda"
    with torch.device("meta"):
        model = Transformer(args)
    parallelize(
        model,
        dims.build_mesh(device.type),
        opts.ac,
        torch.bfloat16 if on_gpu else None,
        keep_exchanges=opts.keep_exchanges,
        tiled_mlp=tiled,
    )
    model.to_empty(device=device)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    model.init_buffers(device=device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=on_gpu)

    def step(length: int) -> float:
        g = torch.Generator().manual_seed(length)
        padded = -(-length // world) * world  # as the loader pads: a document with no loss
        ids = torch.randint(0, args.vocab_size, (1, padded + 1), generator=g)
        labels = ids[:, 1:].clone()
        labels[:, length:] = -100
        bounds = [*range(0, length, opts.doc_len), length] + ([padded] if padded > length else [])
        cu = torch.tensor(bounds, dtype=torch.int32)
        pos = positions_from_cu_seqlens(cu, padded)[None]
        lo, hi = rank * padded // world, (rank + 1) * padded // world
        t0 = time.perf_counter()
        loss = model(
            ids[:, lo:hi].to(device),
            position_ids=pos[:, lo:hi].to(device),
            cu_seqlens=cu.to(device),
            max_seqlen=int((cu[1:] - cu[:-1]).max()),
            labels=labels[:, lo:hi].to(device),
        )
        (loss / length).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if on_gpu:
            torch.cuda.synchronize()
        dist.barrier()
        return time.perf_counter() - t0

    measure_protocol(step, opts, world, rank, tiled=tiled)
    dist.destroy_process_group()


def transformers_worker(opts: argparse.Namespace) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = {**SHAPES[opts.shape], **COMMON}
    config = LlamaConfig(
        vocab_size=shape["vocab_size"],
        hidden_size=shape["dim"],
        intermediate_size=shape["ffn_dim"],
        num_hidden_layers=shape["n_layers"],
        num_attention_heads=shape["n_heads"],
        num_key_value_heads=shape["n_kv_heads"],
        rope_theta=shape["rope_theta"],
        rms_norm_eps=shape["norm_eps"],
        tie_word_embeddings=True,
        max_position_embeddings=max(opts.context, 8192),
    )
    on_gpu = torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(device, torch.bfloat16 if on_gpu else torch.float32)
    model.config._attn_implementation = "sdpa"
    model.gradient_checkpointing_enable()
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=on_gpu)

    def step(length: int) -> float:
        ids = torch.randint(0, shape["vocab_size"], (1, length), device=device)
        t0 = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if on_gpu:
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    measure_protocol(step, opts, "transformers", 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="smollm2")
    parser.add_argument("--degrees", type=int, nargs="+", default=None)
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--doc-len", type=int, default=2048)
    parser.add_argument("--ac", choices=("none", "selective", "full"), default="selective")
    parser.add_argument("--transformers", action="store_true", help="also measure transformers")
    parser.add_argument(
        "--tiled-mlp",
        nargs="+",
        choices=("off", "on"),
        default=["off"],
        help="model.tiled_mlp for each degree (off on: both, and their ratio)",
    )
    parser.add_argument(
        "--keep-exchanges",
        action="store_true",
        help="selective checkpointing keeps the all-to-all outputs (parallel.keep_exchanges)",
    )
    parser.add_argument(
        "--allocator",
        choices=("live", "default"),
        default="live",
        help="CPU: live = glibc gives freed blocks back (MALLOC_MMAP_THRESHOLD_=131072), so RSS "
        "follows the live tensors; default = glibc as is (RSS keeps freed heap)",
    )
    parser.add_argument("--short", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--worker", choices=("longtune", "transformers"), help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.worker == "longtune":
        return worker(opts)
    if opts.worker == "transformers":
        return transformers_worker(opts)

    degrees = opts.degrees or ([1, 3] if opts.shape == "smollm2" else [1, 2, 4])
    out = Path(tempfile.mkdtemp(prefix="bench_sp-")) / "results.jsonl"
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    if opts.allocator == "live":
        env.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
    short = max(opts.context // 8, 1024 * max(degrees))
    same = ["--shape", opts.shape, "--context", str(opts.context), "--doc-len", str(opts.doc_len)]
    same += ["--short", str(short)]
    same += ["--ac", opts.ac, "--out", str(out)] + (
        ["--keep-exchanges"] if opts.keep_exchanges else []
    )
    script = str(Path(__file__).resolve())
    for sp in degrees:
        for tiled in opts.tiled_mlp:
            torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
            cmd = [*torchrun, f"--nproc-per-node={sp}", script, "--worker", "longtune", *same]
            subprocess.run([*cmd, "--tiled-mlp", tiled], env=env, check=True)
    if opts.transformers:
        subprocess.run(
            [sys.executable, script, "--worker", "transformers", *same], env=env, check=True
        )

    records = [json.loads(line) for line in out.read_text().splitlines()]
    print(
        f"\n{opts.shape} ({SHAPES[opts.shape]}), context {opts.context} tokens (L0 = {short}) in "
        f"documents of {opts.doc_len}, activation checkpointing {opts.ac}"
        f"{' keeping the exchanges' if opts.keep_exchanges else ''} (transformers: full); "
        f"CPU allocator: {opts.allocator}"
    )
    print_table(records)


def print_table(records: list[dict]) -> None:
    """The markdown table: per layout and rank, memory and its ratios (``grows`` to SP=1 of the
    same tiling; with both tilings, tiled to untiled; with transformers, to transformers)."""
    gib = 2**30
    hf = next((r for r in records if r["sp"] == "transformers"), None)
    one = {r.get("tiled", False): r["grows"] for r in records if r["sp"] == 1 and r["rank"] == 0}
    untiled = {
        (r["sp"], r["rank"]): r for r in records if r["sp"] != "transformers" and not r["tiled"]
    }
    print(
        "| layout | tiled MLP | rank | base GiB | peak GiB | grows GiB | grows / SP=1 | limit 1.2/N "
        "| tiled / untiled peak, grows | / transformers peak, grows | s |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in records:
        is_sp = isinstance(r["sp"], int)
        tiled = r.get("tiled", False)
        ref = one.get(tiled) if is_sp else None
        ratio = f"{r['grows'] / ref:.3f}" if ref else "—"
        limit = f"{1.2 / r['sp']:.3f}" if is_sp else "—"
        twin = untiled.get((r["sp"], r["rank"])) if tiled else None
        vs_untiled = (
            f"{r['peak'] / twin['peak']:.3f}, {r['grows'] / twin['grows']:.3f}" if twin else "—"
        )
        vs_hf = (
            f"{r['peak'] / hf['peak']:.3f}, {r['grows'] / hf['grows']:.3f}"
            if hf and r is not hf
            else "—"
        )
        layout = f"SP={r['sp']}" if is_sp else "transformers"
        print(
            f"| {layout} | {'on' if tiled else 'off'} | {r['rank']} | {r['base'] / gib:.2f} | "
            f"{r['peak'] / gib:.2f} | {r['grows'] / gib:.2f} | {ratio} | {limit} | {vs_untiled} | "
            f"{vs_hf} | {r['seconds']:.1f} |"
        )


if __name__ == "__main__":
    main()
