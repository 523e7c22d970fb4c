"""Run a function on N gloo ranks in fresh processes (multi-process tests on CPU)."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn: Callable, args: tuple, out: Any) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        result = fn(rank, world, *args)
        out.put((rank, result))
        dist.barrier()  # gloo aborts a rank whose peer tears down mid-exchange
    finally:
        dist.destroy_process_group()


def run_ranks(world: int, fn: Callable, *args: Any) -> list[Any]:
    """Call ``fn(rank, world, *args)`` on ``world`` gloo ranks; returns the results by rank.

    ``fn`` runs in forked processes. An exception
    on any rank fails the call with that rank's traceback.
    """
    # fork: no re-import per rank (tests run with OMP_NUM_THREADS=1, so no thread pool is forked)
    ctx = mp.get_context("fork")
    out = ctx.SimpleQueue()
    procs = mp.start_processes(
        _entry,
        args=(world, _free_port(), fn, args, out),
        nprocs=world,
        start_method="fork",
        join=False,
    )
    while not procs.join():  # raises with the failing rank's traceback
        pass
    results = dict(out.get() for _ in range(world))
    return [results[r] for r in range(world)]
