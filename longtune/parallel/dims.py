"""Parallel degrees of a run and the device mesh they define (one object, passed explicitly)."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


class ParallelConfigError(ValueError):
    """The parallel degrees do not fit the world size or the model."""


class PeerLostError(RuntimeError):
    """Another rank of the job died or stopped answering (killed, out of memory, node lost)."""


# What gloo and NCCL say when a peer is gone: connections closed, or a collective timed out.
_PEER_FAILURE_TEXT = (
    "Connection closed by peer",
    "Connection reset by peer",
    "Broken pipe",
    "imed out",
    "NCCL communicator was aborted",
    "Watchdog caught collective operation timeout",
)


def is_peer_failure(exc: BaseException) -> bool:
    """True when ``exc`` is a collective failing because another rank is gone."""
    return isinstance(exc, dist.DistError) or any(t in str(exc) for t in _PEER_FAILURE_TEXT)


@dataclass(frozen=True)
class ParallelDims:
    """Data-parallel x sequence-parallel layout over ``world_size`` ranks.

    Rank ``r`` sits at ``(dp_rank, sp_rank) = divmod(r, sp)``: the ranks of one SP group are
    consecutive (they exchange activations every layer, so they should share a node). Build it
    with :meth:`build`, the one place where the degrees are checked.
    """

    dp: int
    sp: int
    world_size: int

    @classmethod
    def build(
        cls, world_size: int, sp: int, dp: int = -1, *, n_heads: int, n_kv_heads: int
    ) -> ParallelDims:
        """Check the degrees against the world size and the model's heads; resolve ``dp=-1``.

        Valid: ``sp`` divides the world size and the query heads, and the KV heads divide by
        ``sp`` (scattered) or ``sp`` divides by them (repeated); ``dp * sp == world_size``.

        Args:
            world_size: processes in the job.
            sp: sequence-parallel degree (``parallel.sp``).
            dp: data-parallel degree (``parallel.dp``), -1 for ``world_size / sp``.
            n_heads: the model's query heads.
            n_kv_heads: the model's key/value heads.

        Raises:
            ParallelConfigError: one message with the world size, the degrees asked for, the
                model's head counts and the valid SP degrees for this model and world size.
        """
        problem = None
        if sp < 1 or world_size % sp:
            problem = f"parallel.sp={sp} does not divide the world size {world_size}"
        elif n_heads % sp:
            problem = f"parallel.sp={sp} does not divide the {n_heads} query heads"
        elif n_kv_heads % sp and sp % n_kv_heads:
            problem = (
                f"parallel.sp={sp} neither divides the {n_kv_heads} KV heads (to scatter them) "
                "nor is a multiple of them (to repeat them)"
            )
        elif dp != -1 and dp * sp != world_size:
            problem = f"parallel.dp={dp} x parallel.sp={sp} = {dp * sp} is not the world size"
        if problem is not None:
            valid = cls.valid_sp_degrees(world_size, n_heads, n_kv_heads)
            raise ParallelConfigError(
                f"invalid parallel layout: {problem} (world size {world_size}, parallel.sp={sp}, "
                f"parallel.dp={dp}; the model has {n_heads} query heads and {n_kv_heads} KV "
                f"heads). Valid parallel.sp on {world_size} ranks for this model: "
                f"{', '.join(map(str, valid))}; leave parallel.dp=-1 (= world size / sp)"
            )
        return cls(dp=world_size // sp, sp=sp, world_size=world_size)

    @staticmethod
    def valid_sp_degrees(world_size: int, n_heads: int, n_kv_heads: int) -> list[int]:
        """The SP degrees a model with these heads can use on ``world_size`` ranks."""
        return [
            sp
            for sp in range(1, world_size + 1)
            if world_size % sp == 0
            and n_heads % sp == 0
            and (n_kv_heads % sp == 0 or sp % n_kv_heads == 0)
        ]

    def coords(self, rank: int) -> tuple[int, int]:
        """``(dp_rank, sp_rank)`` of a global rank."""
        return divmod(rank, self.sp)

    def build_mesh(self, device_type: str) -> DeviceMesh:
        return init_device_mesh(device_type, (self.dp, self.sp), mesh_dim_names=("dp", "sp"))


def device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def init_distributed(timeout_s: float = 300.0) -> tuple[int, int, torch.device]:
    """Start the default process group (NCCL on GPU, gloo on CPU) and return rank, world, device.

    Works as one plain process (a world of one on a local TCP store) or under ``torchrun``.

    Args:
        timeout_s: how long a collective waits for a peer before failing (``parallel.timeout_s``):
            a rank that died makes the others exit with an error instead of hanging.
    """
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        timeout = timedelta(seconds=timeout_s)
        if "RANK" in os.environ:  # torchrun (or another launcher) set the rendezvous
            dist.init_process_group(backend=backend, timeout=timeout)
        else:  # a plain process: a world of one on a private local store
            dist.init_process_group(
                backend=backend,
                init_method=f"tcp://127.0.0.1:{_free_port()}",
                rank=0,
                world_size=1,
                timeout=timeout,
            )
    rank, world = dist.get_rank(), dist.get_world_size()
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    return rank, world, device


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
