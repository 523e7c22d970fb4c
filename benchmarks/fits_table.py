"""The README's "what fits where" table: ``longtune plan --longest`` for Llama-3.1-8B and 70B,
full fine-tuning, on 1, 8, 32 and 64 x H100-80 and 1 x H200, next to ALST's published figures.

Each configuration is one ``longtune plan MODEL --longest --ac full --json`` (full activation
checkpointing, tiled MLP, activation offload, the largest SP degree the heads allow; without and
with FSDP2's CPU offload); the table takes the longer of the two and says which. The offloads
must fit the node's host memory too (the device preset's: 2 TB on an H100 or H200 server,
shared by its GPUs; ``host GiB`` is one GPU's need of its share). Predictions,
not measurements: see ``docs/planner.md`` for what the planner counts and how far it was
checked.

    .venv/bin/python benchmarks/fits_table.py              # prints the markdown table
    .venv/bin/python benchmarks/fits_table.py --out fits.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

#: (model, nodes, GPUs per node, device) -> ALST's published longest context (arXiv 2506.13996),
#: or None where it publishes none.
CONFIGS = [
    ("llama-3.1-8b", 1, 1, "h100-80", "500K"),
    ("llama-3.1-8b", 1, 1, "h200-141", "1.2M"),
    ("llama-3.1-8b", 1, 8, "h100-80", "3.7M"),
    ("llama-3.1-8b", 4, 8, "h100-80", "15M"),
    ("llama-3.1-8b", 8, 8, "h100-80", None),
    ("llama-3.1-70b", 1, 1, "h100-80", None),
    ("llama-3.1-70b", 1, 1, "h200-141", None),
    ("llama-3.1-70b", 1, 8, "h100-80", "200K"),
    ("llama-3.1-70b", 4, 8, "h100-80", None),
    ("llama-3.1-70b", 8, 8, "h100-80", None),
]


def plan_longest(model: str, nodes: int, gpus: int, device: str) -> tuple[list[dict], float]:
    cmd = [sys.executable, "-m", "longtune", "plan", model, "--longest", "--ac", "full"]
    cmd += ["--nodes", str(nodes), "--gpus-per-node", str(gpus), "--device", device, "--json"]
    t0 = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {done.stderr.strip()[-500:]}")
    return json.loads(done.stdout), time.monotonic() - t0


def tokens(n: int) -> str:
    if n >= 10**6:
        return f"{n / 2**20:.2f}M"
    return f"{n / 1024:.0f}K" if n else "nothing fits"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="also write the rows here (JSON)")
    p.add_argument("--alst-only", action="store_true", help="only the rows ALST published")
    a = p.parse_args()
    rows = []
    print(
        "| model | GPUs | longtune (planned) | layout | peak GiB | host GiB (of) | ALST | planned in |"
    )
    print("|---|---|---:|---|---:|---:|---:|---:|")
    for model, nodes, gpus, device, alst in CONFIGS:
        if a.alst_only and alst is None:
            continue
        found, took = plan_longest(model, nodes, gpus, device)
        best = max(found, key=lambda r: r["context"])
        layout = best.get("layout") or {}
        where = "no layout" if not best["context"] else (
            f"sp={layout['sp']}" + (", CPU offload" if layout.get("cpu_offload") else "")
        )  # fmt: skip
        peak = best.get("device_bytes", 0) / 2**30
        host = best.get("host_bytes", 0) / 2**30
        limit = best.get("host_limit", 0) / 2**30
        rows.append({"model": model, "nodes": nodes, "gpus_per_node": gpus, "device": device,
                     "alst": alst, "rows": found, "seconds": took})  # fmt: skip
        print(
            f"| {model} | {nodes * gpus} x {device} | {tokens(best['context'])} | {where} | "
            f"{peak:.1f} | {host:.0f} ({limit:.0f}) | {alst or '-'} | {took:.0f} s |",
            flush=True,
        )
    if a.out:
        Path(a.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
