"""Memory of loading a model of ~2 GB into its FSDP2 shards, per rank, and of exporting it.

``load``: a random HF Llama checkpoint of about 2 GB in fp32 (hidden 2048, 8 layers, vocab
32000, two safetensors files and an index; generated once and kept in ``--dir``) is loaded
under ``torchrun --nproc-per-node N`` (gloo, CPU) by the trainer's own pieces: the model built
on the meta device, ``parallelize`` over ``ParallelDims`` (FSDP2 over all ranks), ``to_empty``,
then filled in one of two ways, each in its own ``torchrun`` job so that peaks do not mix:

- ``sharded``: :func:`longtune.parallel.load.load_parallel_model`, every rank reading only the
  rows of each tensor its shard owns;
- ``broadcast``: :func:`longtune.parallel.load.load_by_broadcast`, rank 0 reading the whole
  model and ``set_model_state_dict(..., broadcast_from_rank0=True)`` (the fallback, and the
  trainer's path before the sharded one).

Each rank reports its resident memory before loading (``VmRSS``, once the shards are
allocated) and its peak while loading (``VmHWM`` after writing ``5`` to ``/proc/self/clear_refs``,
which resets it to the current RSS; file pages of the memory-mapped safetensors count, as they
do for the process). Printed per rank: peak - baseline, the bound
``1.3 x (model bytes / N + largest tensor bytes)`` (a rank's shard plus one tensor in flight),
their ratio, for both ways; and a checksum of the rank's local shards, equal for both ways.

``export``: the same model, as a one-rank training checkpoint (DCP, as a run writes it, made
once beside the HF folder), exported each way below in a fresh process, with the peak resident
memory (``VmHWM``) over the resident memory just before the export started:

- ``stream, 0.1 GB shards``: the streamed write alone, ``max_shard_bytes=0.1e9``;
- ``stream + tensor check``: the write and the check of every tensor written (read back by rows);
- ``longtune export``: the command as a user runs it (write, tensor check, and the logits probe,
  which runs when two float32 copies of the model fit in the memory available — here they do);
- with ``--before REV``: ``longtune export`` at an earlier commit (a git worktree), side by side.

Every export's tensors are compared with the source's, and with ``--before`` the files of both
``longtune export`` runs byte for byte.

    .venv/bin/python benchmarks/bench_load_export.py load
    .venv/bin/python benchmarks/bench_load_export.py load --dir /data/bench-ckpt --ranks 4
    .venv/bin/python benchmarks/bench_load_export.py export --before a9bddd3
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

# about 2 GB in fp32 (492M parameters); the embedding and lm_head are the largest tensors
SHAPE = dict(
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=8,
    num_attention_heads=16,
    num_key_value_heads=4,
    vocab_size=32000,
    tie_word_embeddings=False,
)
GB = 1e9
ROOT = Path(__file__).resolve().parents[1]


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def make_checkpoint(folder: Path) -> Path:
    """A random HF Llama checkpoint of :data:`SHAPE` in fp32 in ``folder`` (kept: made once)."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from longtune.model.args import ModelArgs
    from longtune.model.hf import HF_INDEX, hf_shapes

    done = folder / "complete"
    if done.is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(**SHAPE, max_position_embeddings=4096, dtype="float32")
    config.save_pretrained(folder)
    shapes = hf_shapes(ModelArgs.from_hf_config(json.loads((folder / "config.json").read_text())))
    keys = sorted(shapes)
    halves = [keys[: len(keys) // 2], keys[len(keys) // 2 :]]
    g = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for i, part in enumerate(halves):
        fname = f"model-{i + 1:05d}-of-{len(halves):05d}.safetensors"
        tensors = {}
        for key in part:
            if key.endswith("norm.weight"):
                tensors[key] = 1.0 + 0.1 * torch.randn(shapes[key], generator=g)
            else:
                tensors[key] = 0.02 * torch.randn(shapes[key], generator=g)
            total += tensors[key].numel() * 4
        save_file(tensors, folder / fname, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(part, fname)
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / HF_INDEX).write_text(json.dumps(index, indent=2))
    done.write_text("")
    return folder


def load_worker(opts: argparse.Namespace) -> None:
    """One rank: build, shard, allocate, then load one way and record memory and time."""
    import torch
    import torch.distributed as dist

    from longtune.model.hf import read_hf_source
    from longtune.model.llama import Transformer
    from longtune.parallel.dims import ParallelDims, init_distributed
    from longtune.parallel.load import load_by_broadcast, load_parallel_model
    from longtune.parallel.parallelize import parallelize

    rank, world, device = init_distributed()
    args = read_hf_source(opts.dir)[0]
    dims = ParallelDims.build(world, 1, n_heads=args.n_heads, n_kv_heads=args.n_kv_heads)
    with torch.device("meta"):
        model = Transformer(args)
    parallelize(model, dims.build_mesh(device.type), "none", param_dtype=None)
    model.to_empty(device=device)
    dist.barrier()
    baseline = _status_bytes("VmRSS")
    _reset_peak()
    start = time.perf_counter()
    if opts.worker == "sharded":
        how = load_parallel_model(model, opts.dir)
        assert how == "sharded", how
    else:
        load_by_broadcast(model, opts.dir)
    seconds = time.perf_counter() - start
    peak = _status_bytes("VmHWM")
    local = [p.detach().to_local() for p in model.parameters()]
    record = {
        "way": opts.worker,
        "rank": rank,
        "baseline": baseline,
        "peak": peak,
        "seconds": seconds,
        "shard_bytes": sum(t.numel() * t.element_size() for t in local),
        "checksum": float(sum(t.double().sum() for t in local)),
    }
    (Path(opts.out) / f"{opts.worker}-{rank}.json").write_text(json.dumps(record))
    dist.barrier()
    dist.destroy_process_group()


def model_sizes(folder: Path) -> tuple[int, str, int]:
    """(model bytes in fp32, largest native tensor, its bytes in fp32)."""
    import torch

    from longtune.model.hf import read_hf_source
    from longtune.model.llama import Transformer

    args = read_hf_source(folder)[0]
    with torch.device("meta"):
        model = Transformer(args)
    sizes = {n: p.numel() * 4 for n, p in model.named_parameters()}
    largest = max(sizes, key=sizes.get)
    return sum(sizes.values()), largest, sizes[largest]


def run_load(opts: argparse.Namespace) -> None:
    folder = Path(opts.dir or Path(tempfile.gettempdir()) / "longtune-bench-load")
    started = time.perf_counter()
    make_checkpoint(folder)
    made = time.perf_counter() - started
    model_bytes, largest, largest_bytes = model_sizes(folder)
    files = sorted(folder.glob("*.safetensors"))
    print(
        f"checkpoint {folder}: {len(files)} files, {sum(f.stat().st_size for f in files) / GB:.2f}"
        f" GB; model {model_bytes / GB:.3f} GB in fp32; largest tensor {largest} "
        f"{largest_bytes / GB:.3f} GB (ready in {made:.0f} s)"
    )
    out = Path(tempfile.mkdtemp(prefix="bench_load-"))
    # glibc gives freed blocks back, so RSS follows the live tensors (as in bench_sp.py)
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="131072")
    script = str(Path(__file__).resolve())
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    for way in ("sharded", "broadcast"):
        cmd = [*torchrun, f"--nproc-per-node={opts.ranks}", script, "load", "--dir", str(folder)]
        subprocess.run([*cmd, "--worker", way, "--out", str(out)], env=env, check=True)
    rec = {
        (r["way"], r["rank"]): r
        for r in (json.loads(p.read_text()) for p in sorted(out.glob("*.json")))
    }
    bound = 1.3 * (model_bytes / opts.ranks + largest_bytes)
    print(
        f"\nload on {opts.ranks} ranks (gloo, CPU), fp32 shards; bound = 1.3 x (model "
        f"{model_bytes / GB:.3f} / {opts.ranks} + largest {largest_bytes / GB:.3f}) = "
        f"{bound / GB:.3f} GB"
    )
    print(
        "| rank | shard GB | sharded: base GB | peak-base GB | ratio to bound | s "
        "| broadcast: base GB | peak-base GB | ratio to bound | s | same shards |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---:|")
    for rank in range(opts.ranks):
        s, b = rec["sharded", rank], rec["broadcast", rank]
        cells = [f"{rank}", f"{s['shard_bytes'] / GB:.3f}"]
        for r in (s, b):
            grew = r["peak"] - r["baseline"]
            cells += [
                f"{r['baseline'] / GB:.3f}",
                f"{grew / GB:.3f}",
                f"{grew / bound:.2f}",
                f"{r['seconds']:.1f}",
            ]
        cells.append("yes" if s["checksum"] == b["checksum"] else "NO")
        print("| " + " | ".join(cells) + " |")


def make_run_checkpoint(hf: Path, run: Path) -> Path:
    """A run folder holding one checkpoint of the HF folder ``hf``, with a small tokenizer in
    its source (made once, in a process of its own so that this one stays small)."""
    ckpt = run / "checkpoints" / "step-1"
    if (ckpt / "COMPLETE").exists():
        return ckpt
    code = f"""
    import sys
    from pathlib import Path
    sys.path.insert(0, {str(ROOT / "tests")!r})
    from helpers import tiny_tokenizer  # the export checks that a tokenizer loads
    from longtune.checkpoint import save_checkpoint
    from longtune.model.convert import load_model
    from longtune.model.hf import read_hf_source
    hf, run = Path({str(hf)!r}), Path({str(run)!r})
    read_hf_source(hf)[1].save(run / "source")
    tiny_tokenizer(32000).save_pretrained(run / "source")
    save_checkpoint(run / "checkpoints", 1, model=load_model(hf), optimizer=None, states={{}},
        keep_last=1)
    """
    subprocess.run([sys.executable, "-c", textwrap.dedent(code)], check=True)
    return ckpt


CASE = """
import json, sys
from pathlib import Path

def rss(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

{imports}
base = rss("VmRSS")
Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
{call}
print(json.dumps({{"base": base, "peak": rss("VmHWM")}}))
"""

CASES = {
    "stream, 0.1 GB shards": (
        "from longtune.checkpoint import CheckpointTensors\n"
        "from longtune.model.hf import HFSource, save_model\n",
        "save_model(None, OUT, source=HFSource.load(RUN / 'source'), "
        "state_dict=CheckpointTensors(CKPT), max_shard_bytes=int(0.1e9))",
    ),
    "stream + tensor check": (
        "from longtune.checkpoint import CheckpointTensors\n"
        "from longtune.export.check import export_and_check\n"
        "from longtune.model.args import ModelArgs\n"
        "from longtune.model.hf import HFSource\n",
        "src = HFSource.load(RUN / 'source')\n"
        "export_and_check(CheckpointTensors(CKPT), ModelArgs.from_hf_config(src.config), src, "
        "OUT, Path(str(OUT) + '.check.json'), logits=False)",
    ),
    "longtune export": (
        "from longtune.export.command import export\n",
        "export(CKPT, OUT)",
    ),
}


def run_case(name: str, ckpt: Path, out: Path, pythonpath: Path) -> dict:
    imports, call = CASES[name]
    env = {**os.environ, "PYTHONPATH": str(pythonpath), "OMP_NUM_THREADS": "2"}
    head = f"CKPT = Path({str(ckpt)!r}); RUN = CKPT.parent.parent; OUT = Path({str(out)!r})\n"
    code = CASE.format(imports=imports + head, call=call)
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=out.parent
    )
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def tensors_of(folder: Path) -> dict[str, str]:
    """Tensor name -> SHA-256 of its bytes, over every safetensors file of an HF folder."""
    import torch
    from safetensors import safe_open

    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                t = f.get_tensor(key)
                out[key] = hashlib.sha256(
                    t.contiguous().view(-1).view(torch.uint8).numpy()
                ).hexdigest()
    return out


def files_of(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.glob("*.safetensors"))
    }


def export_bench(args: argparse.Namespace) -> None:
    hf = make_checkpoint(args.dir or Path(tempfile.gettempdir()) / "longtune-bench-load")
    work = hf.parent / (hf.name + "-export")
    ckpt = make_run_checkpoint(hf, work / "run")
    model_bytes = sum(p.stat().st_size for p in hf.glob("*.safetensors"))
    print(f"model: {model_bytes / 1e9:.2f} GB float32 ({hf}); checkpoint {ckpt}")
    rows, outs = [], {}
    todo = [(name, ROOT) for name in CASES]
    before = None
    if args.before:
        before = work / f"before-{args.before}"
        if not before.exists():
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(before), args.before],
                check=True,
                capture_output=True,
            )
        todo.append(("longtune export", before))
    for name, code_root in todo:
        label = name if code_root == ROOT else f"{name} at {args.before}"
        out = work / ("out-" + label.replace(" ", "-").replace(",", "").replace(".", ""))
        subprocess.run(["rm", "-rf", str(out), str(out) + ".check.json"], check=True)
        subprocess.run(["rm", "-f", str(out) + ".export_check.json"], check=True)
        r = run_case(name, ckpt, out, code_root)
        grew = (r["peak"] - r["base"]) / 2**30
        rows.append((label, grew, r["base"] / 2**30))
        outs[label] = out
        print(f"  {label:<40} peak - base {grew:6.2f} GiB  (base {r['base'] / 2**30:.2f} GiB)")
    source = tensors_of(hf)
    for label, out in outs.items():
        same = tensors_of(out) == source
        print(f"  {label:<40} tensors equal the source's: {same}")
    if before is not None:
        a, b = (
            files_of(outs["longtune export"]),
            files_of(outs[f"longtune export at {args.before}"]),
        )
        print(f"  files byte for byte equal to {args.before}'s export: {a == b} ({len(a)} files)")
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(before)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    load = sub.add_parser("load", help="memory per rank of loading into FSDP2 shards")
    load.add_argument("--dir", type=Path, help="checkpoint folder (made there once)")
    load.add_argument("--ranks", type=int, default=4)
    load.add_argument("--worker", choices=("sharded", "broadcast"), help=argparse.SUPPRESS)
    load.add_argument("--out", help=argparse.SUPPRESS)
    export = sub.add_parser("export", help="peak memory of exporting a checkpoint of that model")
    export.add_argument("--dir", type=Path, help="checkpoint folder (made there once)")
    export.add_argument("--before", help="also run `longtune export` at this earlier commit")
    opts = parser.parse_args()
    if opts.command == "export":
        return export_bench(opts)
    if opts.command == "load":
        if opts.worker:
            return load_worker(opts)
        return run_load(opts)
    return None


if __name__ == "__main__":
    main()
