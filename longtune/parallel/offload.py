"""Activation offload: the block inputs activation checkpointing keeps, in host memory.

With activation checkpointing, what a block keeps for the backward pass is its input (plus,
under selective checkpointing, the attention kernel's output): ``tokens x dim`` per block, the
one activation term that still grows with the number of blocks (ALST, arXiv 2506.13996, §3.3:
"activation checkpoint offload to CPU"). :class:`OffloadingCheckpointWrapper` is the
checkpoint wrapper of one block that moves that input to host memory as the forward pass
leaves the block and brings it back when the backward pass recomputes the block:

- forward: a :class:`HostStash` starts copying the input to pinned host memory on a side CUDA
  stream while the block runs on it as usual; the checkpoint's closure reads the input from the
  stash, which lets go of the device tensor once the block has it, so that memory is free when
  the forward pass leaves the block and the copy is done (``record_stream`` holds the
  allocator back until then);
- backward: the recompute of block ``i`` takes its input back (already on the device when the
  prefetch of block ``i + 1``'s recompute brought it, on the side stream) and starts the copy of
  block ``i - 1``'s, so each transfer overlaps the backward of the block after it.

The last block keeps its input on the device (the backward pass needs it first, right away;
the planner counts it so); its recompute starts the copy back of the block before's. The numerics do not change: the recompute reads the same values
from a copy. Without CUDA the stash is a copy in the same memory (no saving: what the tests on
CPU check is the bookkeeping, that the checkpoint no longer holds the input and gradients are
unchanged); the trainer refuses the setting on CPU.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
from torch.utils._python_dispatch import _disable_current_modes


class HostStash:
    """One block input, on the host between the forward pass and the block's recompute.

    Args:
        x: the block input (on the device).
        stream: the side stream of the copies (None without CUDA).
        prev: the stash of the block before this one in the same forward pass: its copy back
            is started when this one is taken (the backward pass goes the other way).
    """

    def __init__(
        self, x: torch.Tensor, stream: torch.cuda.Stream | None, prev: HostStash | None
    ) -> None:
        self.live: torch.Tensor | None = x
        self.requires_grad = x.requires_grad
        self.device = x.device
        self.stream = stream
        self.prev = prev
        self.host: torch.Tensor | None = None
        self.back: torch.Tensor | None = None
        self.ready: torch.cuda.Event | None = None

    def take(self) -> torch.Tensor:
        """The input: the first call (the forward pass) gets the tensor itself; a later one (the
        recompute) a device copy of the host's, with the same ``requires_grad``."""
        if self.live is not None:
            x, self.live = self.live, None
            return x
        # Out of the recompute's dispatch modes: selective checkpointing matches the ops it
        # replays against the forward pass's, which had no copies.
        with _disable_current_modes():
            return self._fetch()

    def _fetch(self) -> torch.Tensor:
        if self.back is None:
            self.prefetch()
        x, self.back, self.host = self.back, None, None
        if self.ready is not None:  # the side stream's copy, used by the compute stream
            current = torch.cuda.current_stream(self.device)
            current.wait_event(self.ready)
            x.record_stream(current)
        if self.prev is not None:
            self.prev.prefetch()
            self.prev = None
        return x.detach().requires_grad_(self.requires_grad)

    def offload(self, x: torch.Tensor) -> None:
        """Copy ``x`` (the input the forward pass just used) to the host."""
        x = x.detach()
        if self.stream is None:
            self.host = x.clone()
            return
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            self.host = torch.empty(x.shape, dtype=x.dtype, device="cpu", pin_memory=True)
            self.host.copy_(x, non_blocking=True)
        x.record_stream(self.stream)  # its memory is not reused before the copy is done

    def prefetch(self) -> None:
        """Start the copy back to the device (no-op once started)."""
        if self.back is not None or self.host is None:
            return
        with _disable_current_modes():
            self._copy_back()

    def _copy_back(self) -> None:
        if self.stream is None:
            self.back = self.host.to(self.device, copy=True)
            return
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            self.back = self.host.to(self.device, non_blocking=True)
            self.ready = self.stream.record_event()


class ActivationOffloader:
    """What the blocks of one model share: the side stream, and the stash of the last block
    whose forward ran (so each stash knows the one before it)."""

    def __init__(self) -> None:
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self.last: HostStash | None = None

    def stash(self, x: torch.Tensor, first: bool) -> HostStash:
        stream = None
        if x.device.type == "cuda":
            if x.device not in self._streams:
                self._streams[x.device] = torch.cuda.Stream(x.device)
            stream = self._streams[x.device]
        found = HostStash(x, stream, None if first else self.last)
        self.last = found
        return found


class OffloadingCheckpointWrapper(CheckpointWrapper):
    """``checkpoint_wrapper``'s module (the same state-dict names) whose block input is kept
    on the host (see the module docstring)."""

    def __init__(
        self,
        block: nn.Module,
        offloader: ActivationOffloader,
        index: int,
        last: bool,
        **checkpoint_kwargs: Any,
    ) -> None:
        super().__init__(block, **checkpoint_kwargs)
        self._offloader = offloader
        self._index = index
        self._keep = last  # the last block's input is needed first: it stays on the device

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return super().forward(x, *args, **kwargs)
        block = self._checkpoint_wrapped_module
        if self._keep:  # its recompute starts the copy back of the block before's input
            prev = self._offloader.last if self._index > 0 else None
            self._offloader.last = None  # (the stashes of this pass are the graph's now)
            runs = []

            def run_last(*a: Any, **k: Any) -> torch.Tensor:
                if runs and prev is not None:
                    prev.prefetch()
                runs.append(True)
                return block(*a, **k)

            return self.checkpoint_fn(run_last, x, *args, **kwargs)
        stash = self._offloader.stash(x, first=self._index == 0)

        def run(*a: Any, **k: Any) -> torch.Tensor:  # holds the stash, not the input
            return block(stash.take(), *a, **k)

        stash.offload(x)  # on the side stream, while the block computes
        return self.checkpoint_fn(run, *args, **kwargs)
