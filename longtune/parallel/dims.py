"""Parallel degrees of a run and the device mesh they define (one object, passed explicitly)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


class ParallelConfigError(ValueError):
    """The parallel degrees do not fit the world size or the model."""


@dataclass(frozen=True)
class ParallelDims:
    """Data-parallel x sequence-parallel layout over ``world_size`` ranks.

    Rank ``r`` sits at ``(dp_rank, sp_rank) = divmod(r, sp)``: the ranks of one SP group are
    consecutive (they exchange activations every layer, so they should share a node).
    """

    dp: int
    sp: int
    world_size: int

    def __post_init__(self) -> None:
        if self.sp < 1 or self.dp < 1 or self.dp * self.sp != self.world_size:
            raise ParallelConfigError(
                f"parallel degrees dp={self.dp} x sp={self.sp} must multiply to the world size "
                f"{self.world_size}; pick sp dividing {self.world_size} and leave dp=-1"
            )

    @classmethod
    def from_config(cls, dp: int, sp: int, world_size: int) -> ParallelDims:
        if sp < 1 or world_size % sp:
            raise ParallelConfigError(
                f"parallel.sp={sp} must divide the world size {world_size} "
                f"(valid: {[d for d in range(1, world_size + 1) if world_size % d == 0]})"
            )
        return cls(dp=world_size // sp if dp == -1 else dp, sp=sp, world_size=world_size)

    def coords(self, rank: int) -> tuple[int, int]:
        """``(dp_rank, sp_rank)`` of a global rank."""
        return divmod(rank, self.sp)

    def check_model(self, n_heads: int, n_kv_heads: int) -> None:
        """Fail early when the SP degree cannot split the model's heads."""
        if self.sp == 1:
            return
        if n_heads % self.sp:
            valid = [d for d in range(1, n_heads + 1) if n_heads % d == 0]
            raise ParallelConfigError(
                f"parallel.sp={self.sp} does not divide the {n_heads} attention heads; "
                f"valid degrees: {valid}"
            )
        if n_kv_heads % self.sp and self.sp % n_kv_heads:
            raise ParallelConfigError(
                f"parallel.sp={self.sp} neither divides nor is a multiple of the {n_kv_heads} "
                "KV heads"
            )

    def build_mesh(self, device_type: str) -> DeviceMesh:
        return init_device_mesh(device_type, (self.dp, self.sp), mesh_dim_names=("dp", "sp"))


def device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def init_distributed() -> tuple[int, int, torch.device]:
    """Start the default process group (NCCL on GPU, gloo on CPU) and return rank, world, device.

    Works as one plain process (a world of one on a local TCP store) or under ``torchrun``.
    """
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if "RANK" in os.environ:  # torchrun (or another launcher) set the rendezvous
            dist.init_process_group(backend=backend)
        else:  # a plain process: a world of one on a private local store
            dist.init_process_group(
                backend=backend,
                init_method=f"tcp://127.0.0.1:{_free_port()}",
                rank=0,
                world_size=1,
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
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
