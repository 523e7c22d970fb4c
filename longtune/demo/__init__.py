"""Bundled demo data for ``longtune demo`` (see ``data/SOURCE.md``; built by ``scripts/make_demo_data.py``)
and the demo's settings (also the web UI's new-run defaults). Imports nothing heavy."""

from pathlib import Path

DATA_DIR = Path(__file__).parent / "data"
DEMO_STEPS = 24

# Chosen to finish in a few minutes on 2 CPU cores (see docs/benchmarks.md for measured times).
DEMO_SETTINGS = {
    "context_length": 1024,
    "learning_rate": 1e-4,
    "optim__warmup_steps": 3,
    "optim__schedule": "cosine",
    "model__activation_checkpointing": "none",
    "checkpoint__every": 12,
    "train__eval_batches": 8,  # 8 packed sequences of the eval set (about 13 of its 24 examples)
}
