"""Resumable training checkpoints that survive ``kill -9`` at any instant, read without running
code from them.

- :mod:`~longtune.checkpoint.store`: writing and reading one checkpoint (DCP for model and
  optimizer, a small file per rank for the registered states) and the :class:`Checkpointer`
  that holds what a run registers;
- :mod:`~longtune.checkpoint.manifest`: the ``COMPLETE`` manifest, checksums, and which
  checkpoints exist and can be trusted;
- :mod:`~longtune.checkpoint.dcp_safe`: DCP's pickled metadata and values read under an
  allowlist.

The package knows a checkpoints folder, not a run: where that folder lies is the run folder's
business (``longtune.run_dir``).
"""

from longtune.checkpoint.dcp_safe import UnsafeCheckpointError
from longtune.checkpoint.manifest import checkpoint_info, find_latest_checkpoint
from longtune.checkpoint.store import (
    Checkpointer,
    CheckpointLoadError,
    CheckpointTensors,
    Stateful,
    check_checkpoint_model,
    load_checkpoint,
    read_rank_states,
    save_checkpoint,
)

__all__ = [
    "CheckpointLoadError",
    "CheckpointTensors",
    "Checkpointer",
    "Stateful",
    "UnsafeCheckpointError",
    "check_checkpoint_model",
    "checkpoint_info",
    "find_latest_checkpoint",
    "load_checkpoint",
    "read_rank_states",
    "save_checkpoint",
]
