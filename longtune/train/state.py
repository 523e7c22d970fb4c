"""The trainer's own state: what a run has done so far, saved in every checkpoint.

:class:`TrainState` is registered with the checkpointer next to the data loader (the data
position) and the learning-rate schedule; each is saved and loaded through its own
``state_dict`` / ``load_state_dict``, so what a checkpoint holds is said once, by the objects
that hold it.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


def capture_rng_state() -> dict[str, Any]:
    """The RNG states of Python, NumPy, torch (CPU) and, when initialized, CUDA of this process.

    Returns:
        A dict that ``torch.load(..., weights_only=True)`` can read back (no numpy objects).
    """
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "name": np_name,
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restore the RNG states captured by :func:`capture_rng_state`.

    Args:
        state: the dict from capture_rng_state (possibly after a torch.save/torch.load).
    """
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    npst = state["numpy"]
    np.random.set_state(
        (
            npst["name"],
            npst["keys"].numpy().astype(np.uint32),
            npst["pos"],
            npst["has_gauss"],
            npst["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class TrainState:
    """Counters of one rank's run, its RNG states, and what a resume must know.

    Args:
        rank: this process's global rank (RNG states are restored only on the rank that saved
            them: another rank's would make two ranks draw the same numbers).
        batch_sequences: sequences per optimizer step (micro-batch x grad_accum x dp); a
            resume may change the layout, not this.
        data_files: the data the run trains on (file -> content hash).
    """

    rank: int = 0
    batch_sequences: int = 0
    data_files: dict[str, str] = field(default_factory=dict)
    """The run's data files and the SHA-256 of each: a resume with other data is refused."""
    step: int = 0
    """Optimizer steps done."""
    tokens_seen: int = 0
    """Tokens of every rank's micro-batches so far (padding included)."""
    eval_pending: bool = False
    """An eval was due at the step a stop checkpointed: it runs first thing on resume."""
    elapsed_before: float = 0.0
    """Training seconds of earlier processes of this run."""
    segment_start: float = field(default_factory=time.monotonic)
    """When this process's stretch of training started (``time.monotonic``)."""

    @property
    def elapsed_s(self) -> float:
        """Training seconds of the whole run so far."""
        return self.elapsed_before + time.monotonic() - self.segment_start

    def state_dict(self) -> dict[str, Any]:
        """The counters, this rank's RNG states and the global batch."""
        return {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "elapsed_s": self.elapsed_s,
            "eval_pending": self.eval_pending,
            "batch_sequences": self.batch_sequences,
            "data_files": self.data_files,
            "rank": self.rank,
            "rng": capture_rng_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved state (RNG states only when this rank saved them).

        ``batch_sequences`` and ``data_files`` stay this run's: the preflight refused a resume
        that changes them.
        """
        self.step = state["step"]
        self.tokens_seen = state["tokens_seen"]
        self.elapsed_before = state["elapsed_s"]
        self.eval_pending = state["eval_pending"]
        if state["rank"] == self.rank:
            restore_rng_state(state["rng"])
