"""What makes a layout's traced peak: every allocation alive at that moment, by what made it.

The planner (``longtune.plan.trace.trace_step``) traces one training step of a model of
``--blocks`` blocks on fake tensors, on one rank; this script runs the same trace with the
tracker also noting, for each allocation, the op and shape that made it, the segment and phase
it was made in, and the longtune source lines that called the op; at each new peak it keeps the
list of live allocations. It prints the peak, where it happened, and that list, largest first.
This is how the levers of ``docs/planner.md`` ("Against ALST's published figures") were found:

    .venv/bin/python benchmarks/plan_peak_tensors.py llama-3.1-8b --context 1048576
    .venv/bin/python benchmarks/plan_peak_tensors.py smollm2-135m --context 4096 --ac selective

The blocks' inputs that activation checkpointing keeps appear as ``forward`` allocations made in
``fwd_first`` / ``fwd_mid`` (activation offload moves them to the host in the planner's
prediction); parameters and optimizer state appear as ``held``.
"""

from __future__ import annotations

import argparse
import traceback
import weakref
from dataclasses import dataclass

import torch

GIB = 2**30


@dataclass
class Made:
    """Where an allocation came from."""

    op: str
    shape: tuple[int, ...]
    dtype: str
    segment: str
    phase: str
    where: str


@dataclass
class Peak:
    bytes: int
    segment: str
    phase: str
    op: str
    live: list[tuple[int, str, Made | None]]
    """(bytes, label, what made it) of every allocation alive at the peak."""


def _caller_lines(depth: int = 3) -> str:
    frames = [
        f
        for f in traceback.extract_stack()
        if "longtune/" in f.filename and "/plan/" not in f.filename
    ]
    return " <- ".join(
        f"{f.filename.rsplit('longtune/', 1)[-1]}:{f.lineno}" for f in frames[::-1][:depth]
    )


def traced_peak(
    model: str, context: int, blocks: int, ac: str, tiled: bool, dtype: torch.dtype | None
) -> Peak:
    """Trace the step (``trace_step``'s own code) and return its peak with what was alive."""
    import longtune.plan.trace as trace
    from longtune.plan.command import model_args
    from longtune.plan.memory import MemoryTracker

    made: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # by allocation, not id()
    found: list[Peak] = []

    class Noting(MemoryTracker):
        op = "held"

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
            self.op = str(func)
            return super().__torch_dispatch__(func, types, args, kwargs)

        def _attach(self, t: torch.Tensor, alloc) -> None:  # noqa: ANN001
            if alloc not in made:
                where = _caller_lines() if alloc.nbytes >= 2**20 else ""
                dt = str(t.dtype).removeprefix("torch.")
                made[alloc] = Made(
                    self.op, tuple(t.shape), dt, str(self.segment), self.phase, where
                )
            super()._attach(t, alloc)

        def _peak_check(self) -> None:
            super()._peak_check()
            if not found or self.current > found[-1].bytes:
                live = [(a.nbytes, a.label, made.get(a)) for a in self._live]
                found.append(Peak(self.current, str(self.segment), self.phase, self.op, live))

    layout = trace.Layout(sp=1, ac=ac, tiled_mlp=tiled, micro_batch=1)
    real = trace.MemoryTracker
    trace.MemoryTracker = Noting
    try:
        trace.trace_step(
            model_args(model), layout, world=1, context=context, n_layers=blocks, param_dtype=dtype
        )
    finally:
        trace.MemoryTracker = real
    return found[-1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="a preset name or a model folder (config.json)")
    p.add_argument("--context", type=int, default=131072)
    p.add_argument("--blocks", type=int, default=4, help="blocks in the traced model")
    p.add_argument("--ac", default="full", choices=["none", "selective", "full"])
    p.add_argument("--tiled", default="on", choices=["on", "off"], help="tiled MLP and norms")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--min-gib", type=float, default=0.25, help="list allocations at least this big")
    opts = p.parse_args()
    dtype = torch.bfloat16 if opts.dtype == "bfloat16" else None
    peak = traced_peak(opts.model, opts.context, opts.blocks, opts.ac, opts.tiled == "on", dtype)
    print(
        f"{opts.model}, {opts.blocks} blocks, {opts.context} tokens, ac={opts.ac}, tiled "
        f"{opts.tiled}: peak {peak.bytes / GIB:.2f} GiB in {peak.segment} ({peak.phase}) at "
        f"{peak.op}"
    )
    shown = 0
    for nbytes, label, m in sorted(peak.live, key=lambda x: -x[0]):
        if nbytes < opts.min_gib * GIB:
            continue
        shown += nbytes
        what = (
            f"{m.op} {list(m.shape)} {m.dtype}, made in {m.segment} ({m.phase}) {m.where}"
            if m
            else "?"
        )
        print(f"{nbytes / GIB:9.2f}  {label:11} {what}")
    print(f"listed {shown / GIB:.2f} GiB of {peak.bytes / GIB:.2f}")


if __name__ == "__main__":
    main()
