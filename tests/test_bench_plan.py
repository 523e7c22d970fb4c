"""``benchmarks/bench_plan.py --quick``: the planner's predicted tensor peak against the tracked
peak of the same step on real tensors, built the trainer's way in a fresh process (two rows of
a tiny shape at 1K tokens, SP=1)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_bench_plan_quick_rows_predict_the_tracked_peak(tmp_path):
    out = tmp_path / "plan.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_plan.py"), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert len(rows) == 2 and all("ranks" in r for r in rows), proc.stdout
    for row in rows:
        predicted = row["predicted"]["tensor_peak"]
        tracked = row["ranks"][0]["tracked"]
        assert abs(predicted - tracked) <= 0.10 * tracked, (row["spec"], predicted, tracked)


def test_plan_peak_tensors_lists_what_the_traced_peak_is_made_of():
    """``benchmarks/plan_peak_tensors.py`` (how the levers in docs/planner.md were found): its
    peak is the planner's traced peak of the same step, and the allocations it lists as alive
    there add up to it, each with what made it."""
    import importlib.util

    from longtune.plan.command import model_args
    from longtune.plan.trace import Layout, trace_step

    spec = importlib.util.spec_from_file_location(
        "plan_peak_tensors", REPO / "benchmarks" / "plan_peak_tensors.py"
    )
    script = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = script  # its dataclasses look their module up
    spec.loader.exec_module(script)
    peak = script.traced_peak("smollm2-135m", 512, 3, "selective", False, None)
    layout = Layout(sp=1, ac="selective", tiled_mlp=False, micro_batch=1)
    planned = trace_step(
        model_args("smollm2-135m"), layout, world=1, context=512, n_layers=3, param_dtype=None
    )
    assert peak.bytes == planned.peak
    assert sum(n for n, _, _ in peak.live) == peak.bytes
    assert all(made is not None for _, _, made in peak.live)
