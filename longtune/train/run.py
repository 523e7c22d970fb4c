"""A fine-tuning run from start to end: the preflight, the process group, the trainer's steps,
and what the run folder records about how it ended.

Order (everything that can be wrong with the input fails before any process group or large
allocation):

1. the run folder is locked if it already is a run (global rank 0;
   :mod:`~longtune.train.keeper`), then :func:`~longtune.train.preflight.preflight`;
2. the folder is created, marked and locked, and recorded as ``running``;
3. ``init_distributed`` (gloo on CPU, NCCL on GPU; a world of one without torchrun), then the
   :class:`~longtune.train.trainer.Trainer`'s ``build``, ``resume``, ``train``, ``finish``;
4. the end is recorded once: ``succeeded``, ``failed`` (with the reason of
   :func:`~longtune.train.result.failure_reason`) or ``cancelled``; the process group is closed
   in every case.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch.distributed as dist

from longtune.parallel.dims import PeerLostError, init_distributed, is_peer_failure
from longtune.run_dir import RunDir
from longtune.train.config import JobConfig
from longtune.train.keeper import RunKeeper
from longtune.train.preflight import Checked, preflight
from longtune.train.result import RunResult, end_of_run, failure_reason
from longtune.train.signals import RunCancelled, StopSignals, signal_name
from longtune.train.trainer import Trainer


def run_training(
    cfg: JobConfig,
    *,
    stop: StopSignals | None = None,
    keeper: RunKeeper | None = None,
    _fault: Any = None,
) -> RunResult:
    """Run a fine-tuning job described by ``cfg`` (one process, or one rank under torchrun).

    Global rank 0 locks the run folder and keeps its ``status.json``.

    Args:
        cfg: the validated job config.
        stop: the installed SIGTERM/SIGINT handling (the CLI installs it before importing
            torch); None installs one for this call, whose second signal raises instead of
            exiting the process.
        keeper: the run folder's keeper, if the caller made one (the CLI, to refuse a locked
            folder before importing torch); None makes one.
        _fault: test hook, see :class:`~longtune.train.trainer.Trainer`.

    Returns:
        The run's result (rank 0 has the export check; every rank has the status).

    Raises:
        RunLockedError: another run writes into ``output.dir`` (nothing was written).
        RunCancelled: stopped by SIGTERM / SIGINT (in the loop: after a checkpoint).
        TrainingDivergedError: the loss became NaN/Inf (no checkpoint of that step).
        ConfigError, DataValidationError, FileNotFoundError: bad settings or data, found
            before any process group or big allocation.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    keeper = keeper or RunKeeper.of(cfg.output.dir)
    signals = contextlib.nullcontext(stop) if stop is not None else StopSignals(hard_exit=False)
    with signals as stop:
        stop.on_hard_exit = lambda signum, message: keeper.end(
            "cancelled", signal=signal_name(signum), message=message
        )
        try:
            keeper.claim_existing()
            checked = preflight(cfg, world_size)
            keeper.claim()
            result = _train(cfg, checked, stop, keeper, _fault)
            keeper.end("succeeded")
            return result
        except BaseException as exc:
            if (
                stop.requested
                and failure_reason(exc) in ("error", "config error")
                and not isinstance(exc, RunCancelled)
            ):
                # A library interrupted half-way (torch may turn the interruption into a
                # ValueError of its own), or another rank stopped first and took the process
                # group down with it. An error with a cause of its own (a full disk, a NaN, bad
                # data, out of memory) is reported as it is.
                exc = stop.cancelled()
            state, fields = end_of_run(exc)
            keeper.end(state, **fields)
            raise exc
        finally:
            keeper.release()


def _train(
    cfg: JobConfig, checked: Checked, stop: StopSignals, keeper: RunKeeper, fault: Any
) -> RunResult:
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    try:
        # Inside: a rendezvous that times out (a peer that never came) is a lost peer too.
        rank, world, device = init_distributed(cfg.parallel.timeout_s)
        trainer = Trainer(cfg, checked, rank, device, stop=stop, keeper=keeper, fault=fault)
        trainer.build()
        trainer.resume()
        trainer.train()
        return trainer.finish()
    except Exception as e:
        if world == 1 or not is_peer_failure(e):
            raise
        detail = str(e).strip().splitlines()[0][:300]
        raise PeerLostError(
            f"rank {rank} of {world}: another rank died or stopped answering ({detail}); the "
            f"newest complete checkpoint in {RunDir(cfg.output.dir).checkpoints} is intact: "
            "rerun the same command to resume"
        ) from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
