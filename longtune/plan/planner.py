"""Which layouts of a run fit a device, how fast each would go, and the longest context.

For each layout (:class:`~longtune.plan.trace.Layout`: SP degree, activation checkpointing,
tiled MLP, activation offload, micro-batch) the real step is traced on fake tensors for models
of 3 and 4 blocks (:func:`~longtune.plan.trace.trace_step`) and extrapolated to the model's
blocks segment by segment (tested against whole-model traces). What fake tensors cannot see is
added as named terms (:func:`device_terms`, with their sources in ``docs/planner.md``). The
step time is a model too: the traced FLOPs at :data:`~longtune.plan.hardware.MFU` of the
device's bf16 peak, FSDP's traffic overlapped with it, Ulysses' all-to-alls and what offload
cannot hide added.
"""

from __future__ import annotations

import ctypes
import math
import multiprocessing
import os
import signal
import sys
import threading
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from longtune.model.args import ModelArgs
from longtune.plan.hardware import GIB, HOST_ADAMW_PARAMS_PER_S, HOST_HEADROOM, MFU, Device
from longtune.plan.trace import (
    Layout,
    StepTrace,
    extrapolate_segments,
    peak_segment,
    trace_step,
)

AC_ORDER = ("none", "selective", "full")  # fastest first
CUDA_CONTEXT = 512 * 2**20
"""The CUDA context with cuBLAS and cuDNN handles: ~0.5 GiB on H100 with PyTorch 2.x."""
NCCL_BUFFERS = 512 * 2**20
"""NCCL's communicator buffers (channels x peers x NCCL_BUFFSIZE of 4 MiB), for a world > 1."""
FRAGMENTATION = 0.05
"""Allocator headroom: reserved-but-unallocated memory as a share of the tensor peak."""
HOST_SIDE = ("parameters", "gradients", "optimizer", "optimizer step")
"""What FSDP2's CPU offload keeps in host memory: the parameter and gradient shards, the
optimizer state, and the optimizer step's work (it runs on the CPU)."""


@dataclass
class Prediction:
    """One layout's predicted memory and speed on one rank."""

    layout: Layout
    device_bytes: int
    """Predicted peak of the device's memory (tensors + terms)."""
    fits: bool
    margin_bytes: int
    step_s: float
    tokens_per_s: float
    tensor_peak: int
    """The traced tensor peak, extrapolated to every block."""
    peak_segment: str
    by_phase: dict[str, int]
    """The tensor peak by what made it (parameters, optimizer, forward, backward...)."""
    terms: dict[str, int] = field(default_factory=dict)
    host_bytes: int = 0
    """Host memory this rank's offloads hold (activation offload, FSDP2's CPU offload)."""
    host_limit: int = 0
    """Host memory this rank may use: its share of the node's, less headroom (0: not checked)."""
    largest: tuple[int, str] = (0, "")
    whole_model_trace: bool = False

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "layout": asdict(self.layout)}


def sp_degrees(args: ModelArgs, world: int) -> list[int]:
    """The valid SP degrees on ``world`` ranks (see ``ParallelDims.build``)."""
    out = []
    for sp in range(1, world + 1):
        if world % sp or args.n_heads % sp:
            continue
        if args.n_kv_heads % sp and sp % args.n_kv_heads:
            continue
        out.append(sp)
    return out


def device_terms(args: ModelArgs, layout: Layout, context: int, device: Device, world: int) -> dict:
    """What the trace cannot see, by name, in bytes (see ``docs/planner.md``)."""
    if not device.cuda:
        return {}
    heads = args.n_heads // layout.sp
    terms = {
        "cuda_context": CUDA_CONTEXT,
        # FlashAttention's backward accumulates dq in float32 over the whole sequence (Ulysses
        # gives each rank all tokens of heads/sp heads); the CPU kernel of the trace has none.
        "attention_dq_accumulator": layout.micro_batch * context * heads * args.head_dim * 4,
    }
    if world > 1:
        terms["nccl_buffers"] = NCCL_BUFFERS
    return terms


def predict(
    args: ModelArgs,
    layout: Layout,
    *,
    context: int,
    device: Device,
    nodes: int,
    gpus_per_node: int,
    param_dtype: torch.dtype | None,
    lora: object | None = None,
    supervised: float = 1.0,
    documents: int = 1,
    whole: bool = False,
) -> Prediction:
    """Trace and predict one layout (see the module docstring).

    Args:
        whole: trace the whole model instead of 3 and 4 blocks (slower; the check of the
            extrapolation).
    """
    world = nodes * gpus_per_node
    kw = dict(
        world=world,
        context=context,
        param_dtype=param_dtype,
        lora=lora,
        supervised=supervised,
        documents=documents,
        gloo=not device.cuda and world > 1,
    )
    base = Layout(**{**asdict(layout), "offload": False, "cpu_offload": False})
    sizes = (args.n_layers,) if whole or args.n_layers <= 4 else (3, 4)
    host_side = HOST_SIDE if layout.cpu_offload else ()
    if len(sizes) == 1:
        (large,) = _traces(args, base, sizes, **kw)
        segments, flops = large.segments, large.flops
    else:
        small, large = _traces(args, base, sizes, **kw)
        segments = extrapolate_segments(small, large, args.n_layers)
        flops = large.flops + (args.n_layers - 4) * (large.flops - small.flops)
    peak, by, where = peak_segment(segments, host_side)
    # The host's share: what the optimizer step holds (every shard, gradient and moment).
    on_host = segments.get("optimizer", (0, {}))[1]
    host = sum(on_host.get(label, 0) for label in host_side)
    terms = device_terms(args, layout, context, device, world)
    if layout.offload:  # every block's kept input but the two at work lives on the host
        moved = max(0, args.n_layers - 2) * large.kept_block_inputs
        terms["activation_offload"] = -min(moved, by.get("forward", 0))
        host += args.n_layers * large.kept_block_inputs
    if layout.cpu_offload:  # FSDP copies a block's shards in before gathering them
        terms["cpu_offload_staging"] = 2 * large.block_shard_bytes
    terms["fragmentation"] = int(FRAGMENTATION * peak)
    total = peak + sum(terms.values())
    step_s = _step_time(args, layout, context, device, nodes, gpus_per_node, flops, large)
    dp = world // layout.sp
    host_limit = int(device.host_memory * (1 - HOST_HEADROOM)) // gpus_per_node
    return Prediction(
        layout=layout,
        device_bytes=total,
        fits=total <= device.memory and (not host_limit or host <= host_limit),
        margin_bytes=device.memory - total,
        step_s=step_s,
        tokens_per_s=layout.micro_batch * context * dp / step_s,
        tensor_peak=peak,
        peak_segment=where,
        by_phase=by,
        terms=terms,
        host_bytes=host,
        host_limit=host_limit,
        largest=large.largest,
        whole_model_trace=whole,
    )


_TRACES: dict[tuple, StepTrace] = {}
"""Traces of this process by everything they depend on (layouts that differ by offloads only
share one)."""

TRACE_WORKERS = min(2, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)
"""Processes that trace a layout's two block counts at once (1: in this process). A trace is
single-threaded Python dispatch, so two cores trace the pair in about the time of the larger."""
_POOL: ProcessPoolExecutor | None = None
_PR_SET_PDEATHSIG = 1  # prctl(2)


def _trace_keys(args: ModelArgs, layout: Layout, sizes: tuple[int, ...], kw: dict) -> list[tuple]:
    rest = (repr(kw.get("lora")), *sorted((k, repr(v)) for k, v in kw.items()))
    return [(repr(args), layout, n, *rest) for n in sizes]


def _traces(args: ModelArgs, layout: Layout, sizes: tuple[int, ...], **kw: Any) -> list[StepTrace]:
    """The traces of ``layout`` for models of ``sizes`` blocks: cached, or traced now (two or
    more at once in :data:`TRACE_WORKERS` worker processes)."""
    keys = _trace_keys(args, layout, sizes, kw)
    if len(_TRACES) > 256:
        _TRACES.clear()
    todo = [(key, n) for key, n in zip(keys, sizes, strict=True) if key not in _TRACES]
    if TRACE_WORKERS > 1 and len(todo) > 1:
        try:
            pool = _pool()
            futures = [
                (key, pool.submit(trace_step, args, layout, n_layers=n, **kw)) for key, n in todo
            ]
            for key, future in futures:
                _TRACES[key] = future.result()
        except BaseException:  # Ctrl-C or an error: no worker goes on tracing
            stop_workers()
            raise
    else:
        for key, n in todo:
            _TRACES[key] = trace_step(args, layout, n_layers=n, **kw)
    return [_TRACES[key] for key in keys]


def _pool() -> ProcessPoolExecutor:
    global _POOL
    if _POOL is None:  # spawned: a fresh interpreter, no fork of this one's threads
        _POOL = ProcessPoolExecutor(
            TRACE_WORKERS,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_worker_start,
            # (The death signal is the starting thread's: asked for only from the main thread,
            # whose end is the process's, so that a pool made in another thread outlives it.)
            initargs=(os.getpid(), threading.current_thread() is threading.main_thread()),
        )
    return _POOL


def _worker_start(parent: int, die_with_parent: bool) -> None:
    """A trace worker leaves Ctrl-C to its parent (which answers it and ends the workers) and,
    on Linux, asks the kernel for SIGKILL when its parent dies: a parent killed outright runs
    no code of its own, and a worker in a trace would go on for minutes as an orphan."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if die_with_parent and sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # it died before the request: nobody waits for this worker
        os._exit(0)


def stop_workers() -> None:
    """End the trace workers now (they are started again when needed)."""
    global _POOL
    pool, _POOL = _POOL, None
    if pool is None:
        return
    for process in list(getattr(pool, "_processes", {}).values()):
        process.terminate()  # a trace in progress is not waited for
    pool.shutdown(wait=True, cancel_futures=True)


def _step_time(
    args: ModelArgs,
    layout: Layout,
    context: int,
    device: Device,
    nodes: int,
    gpus_per_node: int,
    flops: float,
    trace: StepTrace,
) -> float:
    """Seconds per optimizer step of one micro-batch (see the module docstring)."""
    world = nodes * gpus_per_node
    compute = flops / (device.bf16_tflops * 1e12 * MFU)
    params = args.num_params()
    fsdp_bw = (device.intra_node_gbs if nodes == 1 else device.inter_node_gbs) * 1e9
    fsdp = (2 * 2 + 4) * params * (world - 1) / world / fsdp_bw if world > 1 else 0.0
    a2a = 0.0
    if layout.sp > 1:
        tokens = layout.micro_batch * context // layout.sp
        per_exchange = (
            tokens * (2 * args.q_size + 2 * args.kv_size) * 2 * (layout.sp - 1) / layout.sp
        )
        passes = 2 + (layout.ac != "none")
        sp_bw = (
            device.intra_node_gbs if layout.sp <= gpus_per_node else device.inter_node_gbs
        ) * 1e9
        a2a = args.n_layers * passes * per_exchange / sp_bw
    offload = 0.0
    if layout.offload:
        moved = 2 * args.n_layers * trace.kept_block_inputs / (device.host_gbs * 1e9)
        offload = max(0.0, moved - compute)
    host_step = 0.0
    if layout.cpu_offload:
        # Each block's fp32 shards come in for the forward and again for the backward, the
        # gradient shards go out: overlapped with compute like FSDP's own traffic. The AdamW
        # step runs on the host's CPUs, after the backward pass.
        shards = params / world
        fsdp = max(fsdp, 3 * 4 * shards / (device.host_gbs * 1e9))
        host_step = shards / HOST_ADAMW_PARAMS_PER_S
    return max(compute, fsdp) + a2a + offload + host_step


def layouts(
    args: ModelArgs, world: int, device: Device, fixed: dict[str, Any] | None = None
) -> list[Layout]:
    """Every layout the planner weighs on ``world`` ranks, with ``fixed`` settings held."""
    fixed = fixed or {}
    out = []
    for sp in [fixed["sp"]] if "sp" in fixed else sp_degrees(args, world):
        for ac in [fixed["ac"]] if "ac" in fixed else AC_ORDER:
            for tiled in [fixed["tiled_mlp"]] if "tiled_mlp" in fixed else (False, True):
                offloads = [fixed["offload"]] if "offload" in fixed else [False]
                if "offload" not in fixed and device.cuda and ac != "none":
                    offloads.append(True)
                for offload in offloads:
                    if offload and ac == "none":  # offload moves what checkpointing keeps
                        continue
                    for mbs in [fixed["micro_batch"]] if "micro_batch" in fixed else (1, 2):
                        cpu_offload = bool(fixed.get("cpu_offload", False))
                        out.append(Layout(sp, ac, tiled, offload, mbs, cpu_offload))
    return out


def plan(
    args: ModelArgs,
    *,
    context: int,
    device: Device,
    nodes: int = 1,
    gpus_per_node: int = 1,
    param_dtype: torch.dtype | None = torch.bfloat16,
    lora: object | None = None,
    fixed: dict[str, Any] | None = None,
    supervised: float = 1.0,
    documents: int = 1,
) -> list[Prediction]:
    """Predictions for the layouts of a run, best first: those that fit by tokens/s, then the
    others by predicted memory.

    Memory falls as SP grows and as the levers go from none to selective to full
    checkpointing, tiled MLP, offload, micro-batch 1. So the SP degrees are tried from the
    smallest up, and at each the layouts that save the most first: a layout is left out when
    one that saves at least as much on every lever does not fit the device (it cannot; one
    short of host memory only rules nothing out: offload uses more of it), or when its levers
    already fit at a smaller SP (it would only be slower). FSDP2's CPU offload (slower still:
    the optimizer step runs on the host) is weighed on CUDA when no layout fits without it, or
    when ``fixed`` asks for it.
    """
    world = nodes * gpus_per_node
    kw = dict(
        context=context,
        device=device,
        nodes=nodes,
        gpus_per_node=gpus_per_node,
        param_dtype=param_dtype,
        lora=lora,
        supervised=supervised,
        documents=documents,
    )
    found: list[Prediction] = []
    fitted: set[tuple] = set()
    options = layouts(args, world, device, fixed)
    if device.cuda and "cpu_offload" not in (fixed or {}):
        options += [replace(x, cpu_offload=True) for x in options]
    groups: dict[tuple[bool, int], list[Layout]] = {}
    for x in options:
        groups.setdefault((x.cpu_offload, x.sp), []).append(x)
    for (cpu_offload, sp), group in sorted(groups.items()):
        if cpu_offload and any(p.fits for p in found):
            break
        if context % sp:
            continue
        failed: list[Layout] = []
        for layout in sorted(group, key=_saving_first):
            key = (layout.ac, layout.tiled_mlp, layout.offload, layout.micro_batch, cpu_offload)
            if key in fitted or any(_saves_as_much(f, layout) for f in failed):
                continue
            p = predict(args, layout, **kw)
            found.append(p)
            if p.fits:
                fitted.add(key)
            elif p.margin_bytes < 0:  # the device is short: a layout saving less is too
                failed.append(layout)
    return sorted(found, key=lambda p: (not p.fits, -p.tokens_per_s if p.fits else p.device_bytes))


def _saving_first(x: Layout) -> tuple:
    return (-AC_ORDER.index(x.ac), -x.tiled_mlp, -x.offload, x.micro_batch)


def _saves_as_much(a: Layout, b: Layout) -> bool:
    """Whether ``a`` turns every memory lever at least as far as ``b`` (same SP)."""
    return (
        AC_ORDER.index(a.ac) >= AC_ORDER.index(b.ac)
        and a.tiled_mlp >= b.tiled_mlp
        and a.offload >= b.offload
        and a.micro_batch <= b.micro_batch
    )


def longest(
    args: ModelArgs,
    layout: Layout,
    *,
    device: Device,
    nodes: int = 1,
    gpus_per_node: int = 1,
    param_dtype: torch.dtype | None = torch.bfloat16,
    lora: object | None = None,
    granularity: int = 1024,
    limit: int = 2**26,
    tolerance: float = 1 / 64,
) -> tuple[int, Prediction | None]:
    """The longest context (a multiple of ``granularity`` x SP) that fits with ``layout``,
    from traced predictions, to within ``tolerance`` of itself (the answer fits; one longer by
    the tolerance may too); (0, None) when none does. The length grows 4x until it does not
    fit, then the bracket closes by interpolation (memory is about linear in the context) or,
    where that gains less than half, bisection."""
    kw = dict(
        device=device,
        nodes=nodes,
        gpus_per_node=gpus_per_node,
        param_dtype=param_dtype,
        lora=lora,
    )
    unit = granularity * layout.sp

    def over(n: int) -> tuple[Prediction, int]:  # the prediction, and its bytes over the limit
        p = predict(args, layout, context=n * unit, **kw)
        host_over = p.host_bytes - p.host_limit if p.host_limit else -(2**62)
        return p, max(p.device_bytes - device.memory, host_over)

    best, f_lo = None, 0
    lo, hi, f_hi = 0, 1, 0
    while hi * unit <= limit:  # grow until it does not fit
        p, f = over(hi)
        if f > 0:
            f_hi = f
            break
        lo, best, f_lo, hi = hi, p, f, hi * 4
    if hi * unit > limit:
        return lo * unit, best
    # Memory grows about linearly with the context: interpolate between the last length that
    # fits and the first that does not (regula falsi), bisecting when that shrinks the bracket
    # by less than half.
    interpolate = True
    while hi - lo > max(1, int(lo * tolerance)):
        width = hi - lo
        if interpolate and lo and f_hi > f_lo:
            guess = lo + round(width * -f_lo / (f_hi - f_lo))
        else:
            guess = (lo + hi) // 2
        guess = min(max(guess, lo + 1), hi - 1)
        p, f = over(guess)
        if f <= 0:
            lo, best, f_lo = guess, p, f
        else:
            hi, f_hi = guess, f
        interpolate = (hi - lo) * 2 <= width
    return lo * unit, best


def parse_memory(text: str, zero: bool = False) -> int:
    """``80GB`` (10^9), ``80GiB`` (2^30), ``2TB``, ``2TiB`` or a plain byte count -> bytes
    (``zero``: 0 is allowed)."""
    t = text.strip().lower().replace(" ", "")
    scale = 1
    for suffix, size in (("tib", 2**40), ("tb", 10**12), ("gib", GIB), ("gb", 10**9),
                         ("mib", 2**20), ("mb", 10**6)):  # fmt: skip
        if t.endswith(suffix):
            t, scale = t[: -len(suffix)], size
            break
    try:
        value = float(t) * scale
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero):
        raise ValueError(f"{text!r} is not a memory size, e.g. 80GB or 75GiB")
    return int(value)
