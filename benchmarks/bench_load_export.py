"""Memory of loading and exporting a model of more than 1 GB: per-process peak over the baseline.

``export``: a float32 HF checkpoint (~2 GB, generated once) is turned into a one-rank training
checkpoint (DCP, as a run writes it), then exported by ``longtune export`` as a user runs it,
each case in a fresh process, with the peak resident memory (``VmHWM``) read over the resident
memory just before the export started:

- ``stream, 0.1 GB shards``: the streamed write alone, ``max_shard_bytes=0.1e9``;
- ``stream + tensor check``: the write and the tensor-by-tensor check of what was written;
- ``longtune export``: the command as a user runs it (write, tensor check, logits probe when two
  float32 copies fit in memory, which here they do);
- with ``--before REV``: the same command at an earlier commit (a git worktree), side by side.

Every export's tensors are compared with the source checkpoint's (byte for byte per file when the
layout is the same). Run: ``python benchmarks/bench_load_export.py export [--before a9bddd3]``.
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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_checkpoint(work: Path) -> tuple[Path, Path]:
    """A random float32 HF folder of ~2 GB and a run folder holding one checkpoint of it."""
    hf, run = work / "hf-2gb", work / "run"
    if (run / "checkpoints" / "step-1" / "COMPLETE").exists():
        return hf, run / "checkpoints" / "step-1"
    code = f"""
    import sys, torch
    sys.path.insert(0, {str(ROOT / "tests")!r})
    from helpers import make_hf_checkpoint
    from pathlib import Path
    from longtune.checkpoint import save_checkpoint
    from longtune.model.convert import load_model
    from longtune.model.hf import read_hf_source
    hf = make_hf_checkpoint(Path({str(hf)!r}), vocab_size=32000, hidden_size=2048,
        intermediate_size=5632, num_hidden_layers=8, num_attention_heads=16,
        num_key_value_heads=4, max_shard_size="600MB")
    run = Path({str(run)!r})
    read_hf_source(hf)[1].save(run / "source")
    save_checkpoint(run / "checkpoints", 1, model=load_model(hf), optimizer=None, states={{}},
        keep_last=1)
    """
    subprocess.run([sys.executable, "-c", textwrap.dedent(code)], check=True, cwd=ROOT)
    return hf, run / "checkpoints" / "step-1"


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
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-load-export-"))
    work.mkdir(parents=True, exist_ok=True)
    hf, ckpt = make_checkpoint(work)
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
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("export", help="peak memory of exporting a ~2 GB checkpoint")
    p.add_argument("--work", help="folder for the generated model and outputs (kept)")
    p.add_argument("--before", help="also run `longtune export` at this earlier commit")
    args = parser.parse_args()
    export_bench(args)


if __name__ == "__main__":
    main()
