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
