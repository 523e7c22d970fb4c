"""Everything checkable before a run starts: no process group, no big allocation before this.

:func:`preflight` checks, in order: the model's ``config.json``, that every data file exists
and every line is valid, that the output and cache folders are writable and the output folder
is new, empty or a run, the parallel layout against the world size and the model's heads, the
model folder (tokenizer, safetensors headers, vocabulary fit), the attention backend on this
device, and the start against the run folder's checkpoints: never mixed with an older run's,
never resumed with other settings than the run was trained with (the rules of what may change
on a resume are :func:`check_resume_config`'s).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from longtune.assets import cache_dir as default_cache_dir
from longtune.checkpoint import (
    check_checkpoint_model,
    checkpoint_info,
    find_latest_checkpoint,
    read_rank_states,
)
from longtune.data import validate_files
from longtune.data.tokenize import file_fingerprint
from longtune.data.validation import expand_paths
from longtune.export.gguf import check_gguf_source
from longtune.fsutil import check_writable
from longtune.model.args import ModelArgs
from longtune.model.attention import check_backend
from longtune.model.checks import read_model_config
from longtune.model.convert import check_model_folder
from longtune.model.llama import Transformer
from longtune.model.lora import add_lora, check_record
from longtune.parallel.dims import ParallelDims, device_type
from longtune.plan.check import Planned, check_run_isolated
from longtune.run_dir import RunDir, check_run_folder
from longtune.train.config import (
    ConfigError,
    JobConfig,
    flat_settings,
    load_config,
    lora_spec,
    resolve_grad_accum,
)

logger = logging.getLogger("longtune.train")


@dataclass(frozen=True)
class Checked:
    """What the preflight established: the layout, the model and the checkpoint to resume."""

    dims: ParallelDims
    args: ModelArgs
    """The model's arguments, from its config.json."""
    compute_dtype: torch.dtype
    resume_from: Path | None
    """The checkpoint named by ``checkpoint.resume`` (``auto``: found again by the trainer,
    whose ranks must agree on one)."""
    data_files: dict[str, str]
    """Every train and eval data file (absolute) -> the SHA-256 of its content."""
    plan: Planned
    """The memory plan: the resolved checkpointing and tiling, the predicted peak."""


def compute_dtype(setting: str, device_type: str) -> torch.dtype:
    """The dtype a run computes in: ``model.dtype``, with ``auto`` = bfloat16 on CUDA, else
    float32."""
    if setting == "auto":
        return torch.bfloat16 if device_type == "cuda" else torch.float32
    return getattr(torch, setting)


def preflight(cfg: JobConfig, world_size: int) -> Checked:
    """Validate data, model, parallel layout and the start against the run folder.

    Args:
        cfg: the validated config.
        world_size: the number of processes of the job.

    Returns:
        What was checked.

    Raises:
        ConfigError, DataValidationError, FileNotFoundError, ValueError: one line naming the
            setting, file or line.
    """
    _, args = read_model_config(cfg.model.path)
    for key, paths in (("data.train", cfg.data.train), ("data.eval", cfg.data.eval)):
        for p in paths:
            if not Path(p).exists():
                raise FileNotFoundError(f"{key}: {p} does not exist")
    d = cfg.data
    errors = validate_files(
        [*d.train, *d.eval], d.task_type, data_format=d.format, columns=d.columns
    )
    if errors:
        raise errors[0]
    check_writable(cfg.output.dir, "output.dir")
    check_run_folder(RunDir(cfg.output.dir))  # never writes among a user's files
    check_writable(cfg.data.cache_dir or default_cache_dir() / "tokens", "data.cache_dir")
    sp = resolve_sp(cfg, world_size)
    heads = dict(n_heads=args.n_heads, n_kv_heads=args.n_kv_heads)
    if sp != "auto":  # a bad layout is refused before the planner runs
        ParallelDims.build(world_size, sp, cfg.parallel.dp, **heads)
    check_model_folder(cfg.model.path)  # tokenizer, safetensors headers, vocabulary fit
    if "gguf" in cfg.export.formats:
        check_gguf_source(cfg.model.path)  # refused now, not after training
    dtype = compute_dtype(cfg.model.dtype, device_type())
    check_backend(cfg.model.attention, device_type(), dtype=dtype)
    check_offload(cfg, device_type())
    planned = check_run_isolated(  # the auto levers, a layout that cannot fit: before any weight
        args,
        world=world_size,
        sp=sp,
        micro_batch=cfg.train.micro_batch_size,
        context=cfg.data.context_length,
        ac=cfg.model.activation_checkpointing,
        tiled_mlp=cfg.model.tiled_mlp,
        offload=cfg.model.offload_activations,
        cpu_offload=cfg.parallel.cpu_offload,
        compute_dtype=dtype,
        device_type=device_type(),
        lora=lora_spec(cfg),
        enforce=cfg.train.plan_check,
    )
    dims = ParallelDims.build(world_size, planned.sp, cfg.parallel.dp, **heads)
    data_files = data_fingerprints(cfg)
    resume_from = _check_start(cfg, dims, args, data_files)
    return Checked(dims, args, dtype, resume_from, data_files, planned)


def resolve_sp(cfg: JobConfig, world_size: int) -> int | str:
    """``parallel.sp``, with ``auto`` resolved where ``parallel.dp`` leaves no choice
    (``world_size / dp``); ``auto`` otherwise (the planner chooses)."""
    p = cfg.parallel
    if p.sp != "auto" or p.dp == -1:
        return p.sp
    if world_size % p.dp:
        raise ConfigError(
            f"parallel.dp={p.dp} does not divide the world size {world_size} (with "
            "parallel.sp=auto the sequence-parallel degree is world size / parallel.dp); "
            "set parallel.dp to a divisor of the world size, or -1"
        )
    return world_size // p.dp


def check_offload(cfg: JobConfig, device: str) -> None:
    """The offloads move tensors between a GPU and its host: refused on a CPU-only run.
    Activation offload moves what checkpointing keeps: refused without checkpointing."""
    m = cfg.model
    if m.offload_activations == "true" and m.activation_checkpointing == "none":
        raise ConfigError(
            "model.offload_activations=true moves the block inputs activation checkpointing "
            "keeps to host memory, and model.activation_checkpointing=none keeps none; set it "
            "to selective, full or auto"
        )
    if device == "cuda":
        return
    if cfg.model.offload_activations == "true":
        raise ConfigError(
            "model.offload_activations=true moves activations from a GPU to host memory, and this "
            "run has no GPU; leave it at false (or auto)"
        )
    if cfg.parallel.cpu_offload:
        raise ConfigError(
            "parallel.cpu_offload=true keeps a GPU run's parameters and optimizer state in host "
            "memory, and this run has no GPU; leave it at false"
        )


def data_fingerprints(cfg: JobConfig) -> dict[str, str]:
    """Every train and eval data file (absolute, folders expanded) -> the SHA-256 of its
    content: what a resume compares, so that data edited in place is never trained on as if it
    were the run's own."""
    files = expand_paths(cfg.data.train, cfg.data.task_type, cfg.data.format)
    if cfg.data.eval:
        files += expand_paths(cfg.data.eval, cfg.data.task_type, cfg.data.format)
    return {os.path.abspath(f): file_fingerprint(f) for f in files}


def _check_start(
    cfg: JobConfig, dims: ParallelDims, args: ModelArgs, data_files: dict[str, str]
) -> Path | None:
    """Refuse a start that would mix a new run with the checkpoints of an older one, or resume
    a run with settings it was not trained with; returns an explicitly named checkpoint."""
    run = RunDir(cfg.output.dir)
    latest = find_latest_checkpoint(run.checkpoints, skipped=[])  # said in the run's log
    resume = cfg.checkpoint.resume
    if resume == "never" and latest is not None:
        raise ConfigError(
            f"checkpoint.resume=never, but output.dir={run.path} already holds checkpoints "
            f"(newest: {latest.name}); use another output.dir, delete {run.checkpoints}, "
            "or continue it with checkpoint.resume=auto"
        )
    ckpt = latest if resume == "auto" else None
    if resume not in ("auto", "never"):
        ckpt = Path(resume)
        start = checkpoint_info(ckpt)["step"]  # raises on an incomplete checkpoint
        if latest is not None and checkpoint_info(latest)["step"] > start:
            raise ConfigError(
                f"checkpoint.resume={resume} is at step {start}, but output.dir={run.path} "
                f"holds a newer checkpoint ({latest.name}) that the new run would mix with; "
                "resume into another output.dir or move the newer checkpoints away"
            )
    if ckpt is not None:
        _check_same_settings(cfg, ckpt, dims, data_files)
        spec = lora_spec(cfg)
        with torch.device("meta"):
            model = Transformer(args)
            if spec is not None:
                add_lora(model, spec)
        check_checkpoint_model(ckpt, model)  # another model: refused before anything starts
        if spec is not None:  # adapters for another base model: refused too
            record = read_rank_states(ckpt, require=("lora",))["lora"]
            try:
                check_record(record, spec, cfg.model.path, "model.path")
            except ValueError as e:
                raise ConfigError(f"cannot resume {ckpt}: {e}") from None
    return None if resume in ("auto", "never") else ckpt


def _check_same_settings(
    cfg: JobConfig, ckpt: Path, dims: ParallelDims, data_files: dict[str, str]
) -> None:
    """Compare the new settings and data with those of the run that wrote ``ckpt`` (its
    config.yaml, and the data its checkpoint recorded)."""
    run = RunDir.of_checkpoint(ckpt)
    if not run.config.is_file():
        logger.warning("%s has no %s: resuming without comparing settings", run.path, run.config)
        return
    try:
        old = load_config(str(run.config), [])
    except ConfigError as e:
        raise ConfigError(f"cannot read the settings of the run being resumed: {e}") from None
    new_batch = cfg.train.micro_batch_size * resolve_grad_accum(cfg, dims.dp) * dims.dp
    state = read_rank_states(ckpt, require=("train",))["train"]
    changes = data_changes(state["data_files"], data_files)
    check_resume_config(old, cfg, state["batch_sequences"], new_batch, run.path, changes)


def data_changes(old: dict[str, str], new: dict[str, str]) -> list[str]:
    """What differs between two :func:`data_fingerprints`, one phrase per file."""
    changes = []
    for file in sorted(old.keys() | new.keys()):
        if file not in new:
            changes.append(f"{file} (no longer in the data)")
        elif file not in old:
            changes.append(f"{file} (new in the data)")
        elif old[file] != new[file]:
            changes.append(f"{file} (its content changed)")
    return changes


# ---------------------------------------------------------------------------------------------
# Resuming a run: what may change
# ---------------------------------------------------------------------------------------------

#: Settings a resumed run may change freely: where and how the job runs, what it writes, how
#: often it evaluates and saves. Everything else is compared with the run's own config.yaml
#: (the model.lora settings too: they change what is trained).
RESUME_FREE_SECTIONS = ("parallel", "checkpoint", "output", "export")
RESUME_FREE_KEYS = (
    "model.activation_checkpointing",
    "model.tiled_mlp",
    "model.offload_activations",
    "train.plan_check",
    "model.attention",
    "train.compile",
    "data.cache_dir",
    "data.tokenize_processes",
    "train.eval_every",
    "train.eval_batches",
)
#: May change as long as the global batch (sequences per optimizer step) stays the same.
RESUME_BATCH_KEYS = ("train.grad_accum", "train.batch_tokens")
#: Optimizer settings and the run's length: fixed for a run (refused on resume, like the data
#: and model settings, but with another way out: a new run from the exported model).
RESUME_TRAINING_SECTIONS = ("optim",)
RESUME_TRAINING_KEYS = ("train.duration",)


def check_resume_config(
    old: JobConfig,
    new: JobConfig,
    old_batch: int,
    new_batch: int,
    run_dir: str | Path,
    changed_data: Sequence[str] = (),
) -> None:
    """Refuse to resume a run with settings or data that differ from the ones it was trained
    with.

    Args:
        old: the run's own config (its ``config.yaml``).
        new: the config of the resuming start.
        old_batch: sequences per optimizer step when the checkpoint was written.
        new_batch: sequences per optimizer step now (micro-batch x grad_accum x dp).
        run_dir: the run folder (for the message).
        changed_data: data files whose content changed, added or gone since the checkpoint
            (:func:`data_changes`).

    Raises:
        ConfigError: one message listing every refused difference (old → new) and what to do.
    """
    data_model: list[str] = []
    training: list[str] = []
    before_all = flat_settings(old)
    for key, value in flat_settings(new).items():
        section, before = key.partition(".")[0], before_all[key]
        if value == before or section in RESUME_FREE_SECTIONS or key in RESUME_FREE_KEYS:
            continue
        if key in RESUME_BATCH_KEYS:
            continue  # judged by the global batch below
        change = f"{key}: {_show(before)} → {_show(value)}"
        if section in RESUME_TRAINING_SECTIONS or key in RESUME_TRAINING_KEYS:
            training.append(change)
        else:
            data_model.append(change)
    data_model += [f"data file {change}" for change in changed_data]
    if old_batch != new_batch:
        data_model.append(
            f"global batch: {old_batch} → {new_batch} sequences per optimizer step "
            "(micro_batch_size x grad_accum x data-parallel ranks; change grad_accum or "
            "batch_tokens only together with the number of ranks)"
        )
    if not data_model and not training:
        return
    parts = []
    if data_model:
        parts.append(f"{', '.join(data_model)} (these change the data or the model)")
    if training:
        parts.append(
            f"{', '.join(training)} (optimizer settings and the length of a run are fixed)"
        )
    run = RunDir(run_dir)
    raise ConfigError(
        f"cannot resume {run.path} with changed settings: {'; '.join(parts)}. Resume with the "
        f"run's own settings ({run.config}), or start a new run from its exported model "
        f"(--model {run.export}, or `longtune export` a checkpoint first) in another output "
        "folder"
    )


def _show(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(str(v) for v in value) or "[]"
    return str(value)
