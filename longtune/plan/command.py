"""``longtune plan``: will a run fit, with which layout, and how long a context can go."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from longtune.model.args import ModelArgs
from longtune.plan.hardware import DEVICES, GIB, HOST_HEADROOM, MODEL_PRESETS, Device, cpu_device
from longtune.plan.planner import AC_ORDER, Prediction, longest, parse_memory, plan
from longtune.plan.trace import Layout


def model_args(model: str) -> ModelArgs:
    """A preset's shape, or a model folder's (its ``config.json`` only)."""
    if model in MODEL_PRESETS:
        return ModelArgs.from_hf_config(MODEL_PRESETS[model])
    config = Path(model) / "config.json"
    if not config.is_file():
        raise ValueError(
            f"{model!r} is neither a model folder with a config.json nor a preset; presets: "
            + ", ".join(MODEL_PRESETS)
        )
    return ModelArgs.from_hf_config(json.loads(config.read_text()))


def device_of(name: str, memory: str | None, host_memory: str | None = None) -> Device:
    if name not in DEVICES:
        raise ValueError(f"--device {name!r} is not one of {', '.join(DEVICES)}")
    device = cpu_device() if name == "cpu" else DEVICES[name]
    if memory is not None:
        device = Device(**{**asdict(device), "memory": parse_memory(memory)})
    if host_memory is not None:
        device = Device(**{**asdict(device), "host_memory": parse_memory(host_memory, zero=True)})
    return device


def run(
    model: str,
    context: int,
    nodes: int = 1,
    gpus_per_node: int = 1,
    device: str = "h100-80",
    device_memory: str | None = None,
    host_memory: str | None = None,
    dtype: str = "bfloat16",
    lora_rank: int = 0,
    sp: int | None = None,
    ac: str | None = None,
    tiled_mlp: str | None = None,
    micro_batch: int | None = None,
    cpu_offload: str | None = None,
    find_longest: bool = False,
    as_json: bool = False,
) -> int:
    """Predict each layout's peak memory per rank and speed; print them, best first."""
    from longtune.model.lora import LoraSpec

    args = model_args(model)
    dev = device_of(device, device_memory, host_memory)
    if ac is not None and ac not in AC_ORDER:
        raise ValueError(f"--ac {ac!r} is not one of {', '.join(AC_ORDER)}")
    if dtype not in ("bfloat16", "float32"):
        raise ValueError(f"--dtype {dtype!r} is not one of bfloat16, float32")
    fixed: dict[str, Any] = {
        k: v for k, v in {"sp": sp, "ac": ac, "micro_batch": micro_batch}.items() if v is not None
    }
    if tiled_mlp is not None:
        fixed["tiled_mlp"] = tiled_mlp == "true"
    if cpu_offload is not None:
        if cpu_offload == "true" and not dev.cuda:
            raise ValueError("--cpu-offload true needs a CUDA device (FSDP2's CPU offload)")
        fixed["cpu_offload"] = cpu_offload == "true"
    lora = LoraSpec(rank=lora_rank, alpha=2.0 * lora_rank) if lora_rank > 0 else None
    param_dtype = torch.bfloat16 if dtype == "bfloat16" else None
    world = nodes * gpus_per_node
    t0 = time.monotonic()
    if find_longest:
        rows = _longest_rows(args, dev, nodes, gpus_per_node, param_dtype, lora, fixed, world)
        out: Any = [{"context": n, **(p.to_json() if p else {})} for n, p in rows]
        if as_json:
            print(json.dumps(out, indent=2))
        else:
            _print_longest(model, dev, world, gpus_per_node, rows, time.monotonic() - t0)
        return 0
    found = plan(
        args,
        context=context,
        device=dev,
        nodes=nodes,
        gpus_per_node=gpus_per_node,
        param_dtype=param_dtype,
        lora=lora,
        fixed=fixed,
    )
    if as_json:
        print(json.dumps([p.to_json() for p in found], indent=2))
    else:
        _print_plan(model, dev, world, gpus_per_node, context, found, time.monotonic() - t0)
    return 0


def _longest_rows(
    args: ModelArgs,
    dev: Device,
    nodes: int,
    gpus_per_node: int,
    param_dtype: torch.dtype | None,
    lora: object | None,
    fixed: dict[str, Any],
    world: int,
) -> list[tuple[int, Prediction | None]]:
    """The longest context per layout: the largest SP degree of the world that the heads
    allow (memory falls with it), each checkpointing mode, tiled MLP and activation offload on;
    on CUDA without and with FSDP2's CPU offload."""
    from longtune.plan.planner import sp_degrees

    sp = fixed.get("sp") or max(s for s in sp_degrees(args, world))
    acs = [fixed["ac"]] if "ac" in fixed else ["selective", "full"]
    if "cpu_offload" in fixed:
        cpu_offloads = [fixed["cpu_offload"]]
    else:
        cpu_offloads = [False, True] if dev.cuda else [False]
    rows = []
    for cpu_offload in cpu_offloads:
        for ac in acs:
            layout = Layout(
                sp=sp,
                ac=ac,
                tiled_mlp=fixed.get("tiled_mlp", True),
                offload=dev.cuda,
                micro_batch=fixed.get("micro_batch", 1),
                cpu_offload=cpu_offload,
            )
            kw = dict(device=dev, nodes=nodes, gpus_per_node=gpus_per_node)
            rows.append(longest(args, layout, param_dtype=param_dtype, lora=lora, **kw))
    return rows


def _gib(n: int) -> str:
    return f"{n / GIB:.1f}"


def _host(dev: Device, gpus_per_node: int) -> str:
    if not dev.host_memory:
        return ""
    share = dev.host_memory * (1 - HOST_HEADROOM) / gpus_per_node
    return f", {_gib(share)} GiB of host memory per GPU for offloads"


def _print_plan(
    model: str,
    dev: Device,
    world: int,
    gpus_per_node: int,
    context: int,
    found: list[Prediction],
    took: float,
) -> None:
    print(
        f"{model} at {context} tokens on {world} x {dev.name} ({_gib(dev.memory)} GiB each"
        f"{_host(dev, gpus_per_node)}); {len(found)} layouts traced in {took:.0f} s"
    )
    print(
        f"{'layout':52} {'peak GiB':>9} {'fits':>5} {'margin':>8} {'host GiB':>9} {'step s':>8} "
        f"{'tokens/s':>10}"
    )
    for p in found:
        fits = "yes" if p.fits else "host" if p.margin_bytes >= 0 else "no"
        print(
            f"{p.layout.describe():52} {_gib(p.device_bytes):>9} {fits:>5} "
            f"{_gib(p.margin_bytes):>8} {_gib(p.host_bytes):>9} {p.step_s:>8.2f} "
            f"{p.tokens_per_s:>10.0f}"
        )
    if found:
        _print_breakdown(found[0])


def _print_breakdown(p: Prediction) -> None:
    print(f"\nbest: {p.layout.describe()}; per rank at its peak ({p.peak_segment}):")
    for name, n in sorted(p.by_phase.items(), key=lambda kv: -kv[1]):
        print(f"  {_LABELS.get(name, name):48} {_gib(n):>8} GiB")
    for name, n in p.terms.items():
        print(f"  + {name:46} {_gib(n):>8} GiB")
    print(f"  largest tensor: {_gib(p.largest[0])} GiB, {p.largest[1]}")
    if p.host_bytes:
        what = " and ".join(
            ["offloaded activations"] * p.layout.offload
            + ["FSDP2's CPU offload (shards, gradients, optimizer)"] * p.layout.cpu_offload
        )
        print(f"  host memory for {what}: {_gib(p.host_bytes)} GiB")


_LABELS = {
    "parameters": "parameters (shards and gathered)",
    "optimizer": "optimizer state",
    "inputs": "the micro-batch",
    "forward": "made in forward (activations kept, loss grads)",
    "backward": "made in backward (gathered gradients, temporaries)",
    "gradients": "gradient shards",
    "optimizer step": "made by the optimizer step",
}


def _print_longest(
    model: str,
    dev: Device,
    world: int,
    gpus_per_node: int,
    rows: list[tuple[int, Prediction | None]],
    took: float,
) -> None:
    print(
        f"{model} on {world} x {dev.name} ({_gib(dev.memory)} GiB each"
        f"{_host(dev, gpus_per_node)}), in {took:.0f} s:"
    )
    for n, p in rows:
        if p is None:
            print("  nothing fits")
            continue
        print(
            f"  {p.layout.describe():52} longest context {n:>9} tokens, peak "
            f"{_gib(p.device_bytes)} GiB, host {_gib(p.host_bytes)} GiB, "
            f"{p.tokens_per_s:.0f} tokens/s"
        )
