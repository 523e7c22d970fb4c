"""The planner before a run: resolve the ``auto`` levers and refuse a layout that will not fit.

:func:`check_run` is called by the trainer's preflight, before any process group is started or
any weight is read. It traces the run's own step (:mod:`longtune.plan.trace`) for the layout
the settings fix, with every ``auto`` lever tried fastest first, on the device this process
will use; it returns the chosen layout and its prediction, or raises one line: the predicted
peak against the device's memory, and the nearest layout that fits. With ``parallel.sp=auto``
it weighs every valid SP degree with :func:`~longtune.plan.planner.plan` and takes the layout
of the most predicted tokens/s that fits.

The trace needs a fake process group of the run's world size, and a process that had one
keeps traces of it in PyTorch's caches (a DCP save of the real run then fails to validate its
plan): :func:`check_run_isolated` runs the check in a child process, which the trainer uses.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist

from longtune.model.args import ModelArgs
from longtune.plan.hardware import DEVICES, GIB, Device, cpu_device, meminfo
from longtune.plan.planner import AC_ORDER, Prediction, plan, predict, sp_degrees
from longtune.plan.trace import Layout


class PlanRefusal(ValueError):
    """The planner predicts the run will not fit (one line; a ValueError: a config error)."""


@dataclass
class Planned:
    """What the preflight's plan decided: the levers, and the plan as the run logs it."""

    sp: int
    """The sequence-parallel degree (``parallel.sp``, resolved when it was ``auto``)."""
    ac: str
    tiled_mlp: bool
    offload: bool
    """Activation offload (``model.offload_activations``)."""
    summary: dict[str, Any]

    @classmethod
    def of(cls, sp: int, ac: str, tiled_mlp: bool, offload: bool, p: Prediction | None) -> Planned:
        """The plan of a prediction (None: not checked)."""
        summary: dict[str, Any] = {
            "checked": p is not None,
            "sp": sp,
            "ac": ac,
            "tiled_mlp": tiled_mlp,
            "offload": offload,
        }
        if p is not None:
            summary |= {
                "layout": p.layout.describe(),
                "predicted_peak_gb": p.device_bytes / GIB,
                "device_memory_gb": (p.device_bytes + p.margin_bytes) / GIB,
                "peak_segment": p.peak_segment,
                "predicted_host_gb": p.host_bytes / GIB,
            }
        return cls(sp, ac, tiled_mlp, offload, summary)

    @classmethod
    def of_prediction(cls, p: Prediction) -> Planned:
        x = p.layout
        return cls.of(x.sp, x.ac, x.tiled_mlp, x.offload, p)

    def record(self) -> dict[str, Any]:
        """The plan as the run logs and records it."""
        return self.summary


def this_device(device_type: str, ranks_here: int) -> Device:
    """The device of this process as the planner sees it: a CUDA card's total memory (its
    speed constants from the preset of its name, H100's otherwise) with this machine's memory
    as its node's host memory, or this machine's available memory shared by the ranks on it."""
    if device_type != "cuda":
        cpu = cpu_device()
        return replace(cpu, memory=cpu.memory // max(1, ranks_here))
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    name = props.name.lower()
    preset = next(
        (DEVICES[k] for k, tag in (("h200-141", "h200"), ("h100-80", "h100"), ("a100-80", "a100"),
                                    ("l40s-48", "l40s")) if tag in name),
        DEVICES["h100-80"],
    )  # fmt: skip
    return replace(
        preset, name=props.name, memory=props.total_memory, host_memory=meminfo("MemTotal")
    )


def check_run(
    args: ModelArgs,
    *,
    world: int,
    sp: int | str,
    micro_batch: int,
    context: int,
    ac: str,
    tiled_mlp: str,
    compute_dtype: torch.dtype,
    offload: str = "false",
    cpu_offload: bool = False,
    device_type: str,
    lora: object | None,
    enforce: bool,
) -> Planned:
    """Resolve ``auto`` levers and check the layout (see the module docstring).

    Args:
        sp: ``parallel.sp``: a degree valid on ``world`` ranks, or ``auto``: the layout the
            planner predicts fastest over every valid degree (:func:`~longtune.plan.planner.plan`
            with the other settings held).
        ac: ``model.activation_checkpointing`` (``auto`` or a mode).
        tiled_mlp: ``model.tiled_mlp`` (``auto``, ``true``, ``false``).
        offload: ``model.offload_activations`` (``auto``, ``true``, ``false``; offload is
            tried only on CUDA and with checkpointing).
        cpu_offload: ``parallel.cpu_offload``.
        enforce: ``train.plan_check``: refuse a fixed layout predicted not to fit.

    Raises:
        PlanRefusal: nothing within the settings fits (with ``enforce``, or with an ``auto``).
    """
    auto = "auto" in (sp, ac, tiled_mlp, offload)
    if not auto and not enforce:
        return Planned.of(int(sp), ac, tiled_mlp == "true", offload == "true", None)
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    device = this_device(device_type, ranks_here)
    acs = AC_ORDER if ac == "auto" else (ac,)
    tiles = (False, True) if tiled_mlp == "auto" else (tiled_mlp == "true",)

    def offloads(a: str) -> tuple[bool, ...]:  # offload moves what checkpointing keeps
        if offload == "auto":
            return (False, True) if device.cuda and a != "none" else (False,)
        return (offload == "true",) if a != "none" or offload == "false" else ()

    param_dtype = None if compute_dtype == torch.float32 else compute_dtype
    kw = dict(
        context=context,
        device=device,
        nodes=max(1, world // ranks_here),
        gpus_per_node=min(world, ranks_here),
        param_dtype=param_dtype,
        lora=lora,
    )
    widest = max(sp_degrees(args, world)) if sp == "auto" else int(sp)
    _refuse_below_floor(args, context // widest * micro_batch, context, param_dtype, device)
    try:
        if sp == "auto":
            held = {"ac": ac, "tiled_mlp": tiled_mlp, "offload": offload}
            return _any_sp(args, world, micro_batch, cpu_offload, held, enforce, kw)
        first = None
        for a in acs:  # fastest first: less checkpointing, then no tiling, then no offload
            for t in tiles:
                for o in offloads(a):
                    p = predict(args, Layout(int(sp), a, t, o, micro_batch, cpu_offload), **kw)
                    first = first or p
                    if p.fits:
                        return Planned.of_prediction(p)
        if not enforce:
            return Planned.of_prediction(first)
        raise PlanRefusal(_refusal(args, first, world, int(sp), kw))
    finally:
        if dist.is_initialized() and dist.get_backend() == "fake":
            dist.destroy_process_group()


def _any_sp(
    args: ModelArgs,
    world: int,
    micro_batch: int,
    cpu_offload: bool,
    held: dict[str, str],
    enforce: bool,
    kw: dict[str, Any],
) -> Planned:
    """``parallel.sp=auto``: the fastest layout that fits over every valid SP degree, the
    levers of ``held`` that are not ``auto`` held (:func:`~longtune.plan.planner.plan`)."""
    fixed: dict[str, Any] = {"micro_batch": micro_batch, "cpu_offload": cpu_offload}
    for lever, value in held.items():
        if value != "auto":
            fixed[lever] = value if lever == "ac" else value == "true"
    found = plan(args, fixed=fixed, **kw)  # best first; SP 1 is always weighed
    if found[0].fits or not enforce:
        return Planned.of_prediction(found[0])
    raise PlanRefusal(_refusal_any_sp(found[0], world, kw))


def _refuse_below_floor(
    args: ModelArgs,
    tokens: int,
    context: int,
    dtype: torch.dtype | None,
    device: Device,
) -> None:
    """An absurd length is refused without tracing it (see :func:`kept_inputs_floor`)."""
    floor = kept_inputs_floor(args, tokens, dtype)
    if floor > device.memory:
        raise PlanRefusal(
            f"at {context} tokens every layout keeps at least {floor / GIB:.1f} GiB per rank "
            f"(each block's input, {args.n_layers} blocks, for the backward pass) and this device "
            f"has {device.memory / GIB:.1f} GiB; lower data.context_length, or spread the "
            "sequence over more ranks (parallel.sp)"
        )


def kept_inputs_floor(args: ModelArgs, tokens: int, dtype: torch.dtype | None) -> int:
    """Bytes every layout keeps on a rank for the backward pass, whatever its checkpointing:
    each block's input (activation offload aside). A floor, not a prediction: a context
    whose floor alone exceeds the device is refused before any trace (which takes longer the
    more loss chunks a context has)."""
    return args.n_layers * tokens * args.dim * (dtype or torch.float32).itemsize


def _refusal(args: ModelArgs, p: Prediction, world: int, sp: int, kw: dict[str, Any]) -> str:
    """The one line of a refused run, with the nearest layout that fits (more checkpointing,
    tiling, then more SP within the world)."""
    near = None
    levers = [
        (s, a, t, o)
        for s in sp_degrees(args, world)
        if s >= sp
        for a in AC_ORDER
        for t in (False, True)
        for o in ((False, True) if kw["device"].cuda and a != "none" else (False,))
    ]
    for s, a, t, o in sorted(levers, key=lambda x: (x[0], AC_ORDER.index(x[1]), x[2], x[3])):
        if kw["context"] % s:
            continue
        q = predict(args, replace(p.layout, sp=s, ac=a, tiled_mlp=t, offload=o), **kw)
        if q.fits:
            near = q
            break
    fix = (
        f"the nearest layout that fits: {_settings(near.layout)} (predicted "
        f"{near.device_bytes / GIB:.1f} GiB)"
        if near
        else "no layout on this many ranks fits: lower data.context_length or train.micro_batch_size, "
        "train LoRA (model.lora.rank), or add ranks"
    )
    return (
        f"the memory planner predicts {_shortfall(p)} for {p.layout.describe()} at "
        f"{kw['context']} tokens; {fix}; --train.plan_check=false to try anyway"
    )


def _shortfall(p: Prediction) -> str:
    """What a layout that does not fit needs, against what there is."""
    if p.margin_bytes < 0 or not p.host_limit or p.host_bytes <= p.host_limit:
        memory = p.device_bytes + p.margin_bytes
        return (
            f"{p.device_bytes / GIB:.1f} GiB per rank, and this device has {memory / GIB:.1f} GiB"
        )
    return (
        f"{p.host_bytes / GIB:.1f} GiB of host memory per rank for its offloads, and this "
        f"machine leaves {p.host_limit / GIB:.1f} GiB per rank"
    )


def _refusal_any_sp(p: Prediction, world: int, kw: dict[str, Any]) -> str:
    """The one line of a run with ``parallel.sp=auto`` that fits at no degree (``p``: the
    layout that comes closest)."""
    return (
        f"parallel.sp=auto: no layout on {world} rank(s) fits; the closest, {p.layout.describe()}, "
        f"needs {_shortfall(p)} at {kw['context']} tokens by the memory planner; lower "
        "data.context_length or "
        "train.micro_batch_size, train LoRA (model.lora.rank), let the other levers be auto, "
        "or add ranks; --train.plan_check=false to try anyway"
    )


def _settings(layout: Layout) -> str:
    return (
        f"--parallel.sp={layout.sp} --model.activation_checkpointing={layout.ac} "
        f"--model.tiled_mlp={'true' if layout.tiled_mlp else 'false'}"
        + (" --model.offload_activations=true" if layout.offload else "")
    )


def check_run_isolated(args: ModelArgs, **kw: Any) -> Planned:
    """:func:`check_run` in a child process (see the module docstring); the same result, or
    the same one-line :class:`PlanRefusal`."""
    lora = kw.get("lora")
    request = {
        "args": args.to_dict(),
        **{k: v for k, v in kw.items() if k not in ("lora", "compute_dtype")},
        "compute_dtype": str(kw["compute_dtype"]).removeprefix("torch."),
        "lora": None if lora is None else lora.to_json(),
    }
    code = "from longtune.plan.check import _child; _child()"
    done = subprocess.run(
        [sys.executable, "-c", code], input=json.dumps(request), capture_output=True, text=True
    )
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"the memory planner failed: {done.stderr.strip()[-2000:]}")
    answer = json.loads(lines[-1])
    if "refusal" in answer:
        raise PlanRefusal(answer["refusal"])
    return Planned(
        answer["sp"], answer["ac"], answer["tiled_mlp"], answer["offload"], answer["record"]
    )


def _child() -> None:
    """The child of :func:`check_run_isolated`: a request on stdin, the answer on stdout."""
    from longtune.model.lora import LoraSpec

    request = json.loads(sys.stdin.read())
    args = ModelArgs.from_dict(request.pop("args"))
    lora = request.pop("lora")
    request["lora"] = None if lora is None else LoraSpec.from_json(lora)
    request["compute_dtype"] = getattr(torch, request["compute_dtype"])
    try:
        planned = check_run(args, **request)
    except PlanRefusal as e:
        print(json.dumps({"refusal": str(e)}))
        return
    record = planned.record()
    answer = {
        "sp": planned.sp,
        "ac": planned.ac,
        "tiled_mlp": planned.tiled_mlp,
        "offload": planned.offload,
    }
    print(json.dumps(answer | {"record": record}))
