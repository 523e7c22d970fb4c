"""The fine-tuning run: a thin loop that reads top to bottom.

Order of a run (everything that can be wrong with the input fails before any process group or
large allocation):

1. resolve and validate the config; validate every data line; read the model's config.json;
   check the parallel degrees against the world size and the model's heads;
2. start the process group (gloo on CPU, NCCL on GPU; a world of one without torchrun);
3. tokenize + pack (rank 0 first, others reuse its cache), build the per-rank loader;
4. load the model, apply activation checkpointing and FSDP2, build AdamW and the schedule;
5. resume from the newest complete checkpoint (``checkpoint.resume=auto``);
6. train: micro-batches of one optimizer step are fetched together so the loss can be divided
   by the supervised-token count of the whole global batch; gradient clipping; NaN stop;
   metrics, periodic eval and checkpoints;
7. export ``hf/`` and check it by loading it back in ``transformers``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from longtune.parallel.dims import PeerLostError
from longtune.train.config import (
    FLAG_ALIASES,
    ConfigError,
    JobConfig,
    config_to_dict,
    field_docs,
    load_config,
    resolve_grad_accum,
    save_config,
)

logger = logging.getLogger("longtune.train")

SOURCE_SUBDIR = "source"
EXPORT_SUBDIR = "hf"
EXPORT_CHECK = "export_check.json"


class TrainingDivergedError(RuntimeError):
    """The loss or gradient norm became NaN or infinite."""


@dataclass
class RunResult:
    """What a finished (or failed) run left behind."""

    status: str
    """``completed`` or ``failed``."""
    run_dir: Path
    export_dir: Path | None = None
    final_step: int = 0
    metrics: list[dict[str, Any]] = field(default_factory=list)
    """Every record of ``metrics.jsonl`` (train steps and eval records)."""
    export_check: dict[str, Any] | None = None
    error: str | None = None

    @property
    def eval_losses(self) -> list[float]:
        return [m["eval_loss"] for m in self.metrics if m.get("kind") == "eval"]


# ---------------------------------------------------------------------------------------------
# Preflight: everything checkable without a process group or a big allocation
# ---------------------------------------------------------------------------------------------


def preflight(cfg: JobConfig, world_size: int) -> Any:
    """Validate data, model config and parallel layout; returns the checked ``ParallelDims``."""
    from longtune.data import validate_files
    from longtune.model.args import ModelArgs
    from longtune.parallel.dims import ParallelDims

    model_dir = Path(cfg.model.path)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"model.path={cfg.model.path!r} is not a Hugging Face checkpoint folder "
            "(no config.json)"
        )
    for key, paths in (("data.train", cfg.data.train), ("data.eval", cfg.data.eval)):
        for p in paths:
            if not Path(p).exists():
                raise FileNotFoundError(f"{key}: {p} does not exist")
    errors = validate_files(list(cfg.data.train) + list(cfg.data.eval), cfg.data.task_type)
    if errors:
        raise errors[0]
    args = ModelArgs.from_hf_config(json.loads((model_dir / "config.json").read_text()))
    dims = ParallelDims.build(
        world_size,
        cfg.parallel.sp,
        cfg.parallel.dp,
        n_heads=args.n_heads,
        n_kv_heads=args.n_kv_heads,
    )
    _check_resume(cfg)
    return dims


def _check_resume(cfg: JobConfig) -> None:
    """Refuse a start that would mix a new run with the checkpoints of an older one."""
    from longtune.train.checkpoint import checkpoint_info, find_latest_checkpoint

    run_dir = Path(cfg.output.dir)
    latest = find_latest_checkpoint(run_dir) if (run_dir / "checkpoints").is_dir() else None
    resume = cfg.checkpoint.resume
    if resume == "never" and latest is not None:
        raise ConfigError(
            f"checkpoint.resume=never, but output.dir={run_dir} already holds checkpoints "
            f"(newest: {latest.name}); use another output.dir, delete {run_dir / 'checkpoints'}, "
            "or continue it with checkpoint.resume=auto"
        )
    if resume not in ("auto", "never"):
        start = checkpoint_info(resume)["step"]  # raises on an incomplete checkpoint
        if latest is not None and checkpoint_info(latest)["step"] > start:
            raise ConfigError(
                f"checkpoint.resume={resume} is at step {start}, but output.dir={run_dir} "
                f"holds a newer checkpoint ({latest.name}) that the new run would mix with; "
                "resume into another output.dir or move the newer checkpoints away"
            )


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def _all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def _peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def _copy_source(model_dir: Path, run_dir: Path) -> None:
    """Keep config.json, tokenizer files and the tensor layout of the source model in the run,
    so checkpoints can be exported without the original folder."""
    from longtune.model.convert import copy_meta_files, read_hf_source

    _, src = read_hf_source(model_dir)
    dst = run_dir / SOURCE_SUBDIR
    copy_meta_files(model_dir, dst)
    (dst / "hf_source.json").write_text(json.dumps(src.to_json(), indent=1))


def _run_source(run_dir: Path):  # noqa: ANN202
    from longtune.model.convert import HFSource

    d = run_dir / SOURCE_SUBDIR
    return HFSource.from_json(json.loads((d / "hf_source.json").read_text()), d)


def _truncate_metrics(path: Path, last_step: int, total_steps: int) -> None:
    """Drop records that a run resuming at ``last_step`` will produce again: every record past
    it, and the final eval (it follows the last checkpoint). Rewritten atomically; a line torn
    by a crash mid-write is dropped."""
    if not path.exists():
        return

    def keep(rec: dict[str, Any]) -> bool:
        if rec["step"] > last_step:
            return False
        return not (rec.get("kind") == "eval" and rec["step"] == total_steps and last_step > 0)

    kept = [line for line in _metric_lines(path) if keep(json.loads(line))]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def _metric_lines(path: Path) -> list[str]:
    lines = []
    for line in path.read_text().splitlines():
        try:
            json.loads(line)
        except json.JSONDecodeError:  # a record torn by a crash while it was being written
            continue
        lines.append(line)
    return lines


def run_training(cfg: JobConfig, *, _fault: Any = None) -> RunResult:
    """Run a fine-tuning job described by ``cfg`` (one process, or one rank under torchrun).

    Args:
        cfg: the validated job config.
        _fault: test hook, called as ``_fault(step, loss_sum)`` and returning the loss sum to
            use (used to inject a NaN).

    Returns:
        The run's result (rank 0 has the export check; every rank has the status).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    dims = preflight(cfg, world_size)

    from longtune.parallel.dims import PeerLostError, init_distributed, is_peer_failure

    rank, world, device = init_distributed(cfg.parallel.timeout_s)
    try:
        return _run(cfg, rank, world, dims, device, _fault)
    except Exception as e:
        if world == 1 or not is_peer_failure(e):
            raise
        detail = str(e).strip().splitlines()[0][:300]
        raise PeerLostError(
            f"rank {rank} of {world}: another rank died or stopped answering ({detail}); the "
            f"newest complete checkpoint in {Path(cfg.output.dir) / 'checkpoints'} is intact: "
            "rerun the same command to resume"
        ) from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _run(
    cfg: JobConfig, rank: int, world: int, dims: Any, device: torch.device, fault: Any
) -> RunResult:
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        set_model_state_dict,
    )

    from longtune.data import IGNORE_INDEX, PackedLoader, build_packed_dataset
    from longtune.model.args import ModelArgs
    from longtune.model.convert import load_model
    from longtune.model.llama import Transformer
    from longtune.parallel.parallelize import parallelize
    from longtune.train.checkpoint import find_latest_checkpoint, load_checkpoint, save_checkpoint
    from longtune.train.metrics import MetricsWriter, ProgressLine, setup_logging
    from longtune.train.schedule import build_lr_scheduler

    run_dir = Path(cfg.output.dir)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    setup_logging(run_dir, rank)
    dp_rank, sp_rank = dims.coords(rank)
    torch.manual_seed(cfg.train.seed)

    # ---- data: rank 0 tokenizes (and fills the cache) first, the others then read the cache.
    def build(paths: list[str]):  # noqa: ANN202
        return build_packed_dataset(
            paths,
            cfg.model.path,
            cfg.data.task_type,
            cfg.data.context_length,
            loss_on=cfg.data.loss_on,
            overlength=cfg.data.overlength,
            cache_dir=cfg.data.cache_dir,
        )

    datasets = {}
    for turn in (0, 1):
        if (rank == 0) == (turn == 0):
            datasets["train"] = build(cfg.data.train)
            datasets["eval"] = build(cfg.data.eval) if cfg.data.eval else None
        dist.barrier()
    mbs = cfg.train.micro_batch_size

    def make_loader(dataset):  # noqa: ANN001, ANN202
        return PackedLoader(
            dataset,
            micro_batch_size=mbs,
            dp_rank=dp_rank,
            dp_size=dims.dp,
            sp_rank=sp_rank,
            sp_size=dims.sp,
            seed=cfg.train.seed,
        )

    loader = make_loader(datasets["train"])
    eval_loader = make_loader(datasets["eval"]) if datasets["eval"] is not None else None
    accum = resolve_grad_accum(cfg, dims.dp)
    total_steps = total_optimizer_steps(cfg.train.duration, len(loader), accum)
    steps_per_epoch = len(loader) / accum
    if cfg.optim.warmup_steps > total_steps:
        raise ConfigError(
            f"optim.warmup_steps={cfg.optim.warmup_steps} is longer than the run "
            f"({total_steps} optimizer steps for train.duration={cfg.train.duration}); "
            "lower it or train longer"
        )

    # ---- model, parallelism, optimizer
    on_gpu = device.type == "cuda"
    if cfg.model.dtype == "auto":
        compute_dtype = torch.bfloat16 if on_gpu else torch.float32
    else:
        compute_dtype = getattr(torch, cfg.model.dtype)
    # Only rank 0 reads the checkpoint; the others build on the meta device and receive their
    # shards by broadcast once the model is sharded, so no rank but 0 ever holds it whole.
    args = ModelArgs.from_hf_config(json.loads((Path(cfg.model.path) / "config.json").read_text()))
    full_state = None
    if rank == 0:
        full_state = load_model(cfg.model.path, dtype=torch.float32, device="cpu").state_dict()
        if not (run_dir / SOURCE_SUBDIR / "hf_source.json").exists():
            _copy_source(Path(cfg.model.path), run_dir)
    with torch.device("meta"):
        model = Transformer(args)
    mesh = dims.build_mesh(device.type)
    parallelize(
        model,
        mesh,
        cfg.model.activation_checkpointing,
        param_dtype=None if compute_dtype == torch.float32 else compute_dtype,
    )
    model.to_empty(device=device)
    if args.tie_embeddings and model.output.weight is not model.tok_embeddings.weight:
        raise RuntimeError("tied embeddings were untied while sharding the model")
    set_model_state_dict(
        model,
        full_state if rank == 0 else {},
        options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True),
    )
    del full_state
    model.init_buffers(device=device)
    model.train()
    opt = cfg.optim
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=opt.lr,
        betas=tuple(opt.betas),
        eps=opt.eps,
        weight_decay=opt.weight_decay,
        fused=on_gpu,
        foreach=None if on_gpu else True,
    )
    scheduler = build_lr_scheduler(
        optimizer, opt.schedule, opt.warmup_steps, total_steps, opt.min_lr_ratio
    )

    # ---- resume
    step, tokens_seen, elapsed_before = 0, 0, 0.0
    ckpt = None
    if cfg.checkpoint.resume == "auto":
        found = [str(find_latest_checkpoint(run_dir) or "")] if rank == 0 else [None]
        dist.broadcast_object_list(found, src=0)
        ckpt = Path(found[0]) if found[0] else None
    elif cfg.checkpoint.resume != "never":
        ckpt = Path(cfg.checkpoint.resume)
    if ckpt is not None:
        extra = load_checkpoint(ckpt, model=model, optimizer=optimizer, scheduler=scheduler)
        step, tokens_seen = extra["step"], extra["tokens_seen"]
        elapsed_before = extra["elapsed_s"]
        loader.load_state_dict(extra["loader"])
        logger.info("resumed from %s at step %d", ckpt, step)
    if rank == 0:
        # A fresh start (no checkpoint) drops every earlier record, the step-0 eval included.
        _truncate_metrics(run_dir / "metrics.jsonl", step if ckpt is not None else -1, total_steps)
        save_config(cfg, run_dir / "config.yaml")
    dist.barrier()

    metrics = MetricsWriter(
        run_dir, rank, tensorboard=cfg.output.tensorboard, mlflow=cfg.output.mlflow
    )
    if rank == 0 and ckpt is None:
        metrics.log_params({k: v for s in config_to_dict(cfg).values() for k, v in s.items()})
    progress = ProgressLine(total_steps, rank)
    logger.info(
        "training %s: %d params, %d steps (%.1f per epoch), %d micro-batches x %d seq x %d tokens "
        "per rank per step, world %d (dp %d, sp %d), %s on %s",
        cfg.model.path,
        args.num_params(),
        total_steps,
        steps_per_epoch,
        accum,
        mbs,
        cfg.data.context_length,
        world,
        dims.dp,
        dims.sp,
        compute_dtype,
        device,
    )

    def loss_sum_of(batch: dict[str, Any]) -> torch.Tensor:
        """Summed token loss of one micro-batch (this rank's slice)."""
        b = {k: v.to(device, non_blocking=True) for k, v in batch.items() if torch.is_tensor(v)}
        return model(
            b["input_ids"],
            position_ids=b["position_ids"],
            cu_seqlens=b["cu_seqlens"],
            max_seqlen=batch["max_seqlen"],
            labels=b["labels"],
        )

    def evaluate() -> dict[str, float] | None:
        if eval_loader is None:
            return None
        model.eval()
        n = len(eval_loader)
        if cfg.train.eval_batches > 0:
            n = min(n, cfg.train.eval_batches)
        n_seq = len(eval_loader.dataset)
        loss_sum, count = 0.0, 0
        with torch.no_grad():
            for i in range(n):
                b = eval_loader.batch(0, i)
                # The last step of an epoch is filled up with sequences from its start; score
                # each eval sequence once, whatever the number of ranks.
                first = (i * dims.dp + dp_rank) * mbs
                for j in range(mbs):
                    if first + j >= n_seq:
                        b["labels"][j] = IGNORE_INDEX
                loss_sum += float(loss_sum_of(b))
                count += int((b["labels"] != IGNORE_INDEX).sum())  # this rank's slice
        loss_sum, count = _all_reduce_sum([loss_sum, count], device)
        model.train()
        loss = loss_sum / max(count, 1)
        return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), "eval_tokens": count}

    def log_eval(at: int) -> None:
        result = evaluate()
        if result is not None:
            metrics.log(at, {"kind": "eval", **result})
            logger.info(
                "eval at step %d: loss %.4f, ppl %.2f", at, result["eval_loss"], result["eval_ppl"]
            )

    if step == 0:
        log_eval(0)
    t_start = time.monotonic()
    progress.start(step)
    while step < total_steps:
        t0 = time.monotonic()
        batches = [next(loader) for _ in range(accum)]
        local_count = sum(b["num_supervised"] for b in batches)
        (global_count,) = _all_reduce_sum([local_count / dims.sp], device)
        scale = world / max(global_count, 1.0)
        loss_sum = 0.0
        for b in batches:
            part = loss_sum_of(b)
            if fault is not None:
                part = fault(step + 1, part)
            (part * scale).backward()
            loss_sum += float(part.detach())
        (loss_sum,) = _all_reduce_sum([loss_sum], device)
        loss = loss_sum / max(global_count, 1.0)
        grad_norm = torch.nn.utils.clip_grad_norm_(
            model.parameters(), cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
        )
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        grad_norm = float(grad_norm)
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            samples = [None] * world
            dist.all_gather_object(samples, [s for b in batches for s in b["sample_ids"]])
            raise TrainingDivergedError(
                f"non-finite loss {loss} / grad norm {grad_norm} at step {step + 1} "
                f"(packed sequences per rank: {samples}); stopped without writing a checkpoint. "
                "Lower optim.lr, check the data of these samples, or resume from the last "
                "checkpoint"
            )
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        step_tokens = accum * mbs * cfg.data.context_length * dims.dp
        tokens_seen += step_tokens
        dt = time.monotonic() - t0
        metrics.log(
            step,
            {
                "kind": "train",
                "loss": loss,
                "lr": lr,
                "grad_norm": grad_norm,
                "tokens": step_tokens,
                "supervised_tokens": int(global_count),
                "tokens_seen": tokens_seen,
                "tokens_per_s": step_tokens / dt,
                "peak_memory_gb": _peak_memory_gb(device),
                "elapsed_s": elapsed_before + time.monotonic() - t_start,
                "epoch": batches[-1]["epoch"],
            },
        )
        progress.update(step, loss, step_tokens, lr=lr)
        if cfg.train.eval_every > 0 and step % cfg.train.eval_every == 0 and step < total_steps:
            log_eval(step)
        if step == total_steps or (cfg.checkpoint.every > 0 and step % cfg.checkpoint.every == 0):
            save_checkpoint(
                run_dir,
                step,
                model=model,
                optimizer=optimizer,
                scheduler=scheduler,
                extra={
                    "step": step,
                    "tokens_seen": tokens_seen,
                    "elapsed_s": elapsed_before + time.monotonic() - t_start,
                    "loader": loader.state_dict(),
                },
                keep_last=cfg.checkpoint.keep_last,
            )
    log_eval(step)

    # ---- export. Gathering the full state is the last collective: the process group is then
    # closed on every rank together, and rank 0 exports alone, so a long export of a large
    # model cannot trip a collective's timeout on the other ranks.
    full = get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    dist.barrier()
    dist.destroy_process_group()
    result = RunResult(status="completed", run_dir=run_dir, final_step=step)
    if rank == 0:
        export_dir = run_dir / EXPORT_SUBDIR
        result.export_dir = export_and_check(
            full, args, _run_source(run_dir), export_dir, run_dir / EXPORT_CHECK
        )
        result.export_check = json.loads((run_dir / EXPORT_CHECK).read_text())
        logger.info("exported %s (self-check: %s)", export_dir, result.export_check)
    metrics.close()
    result.metrics = read_metrics(run_dir)
    return result


def total_optimizer_steps(duration: Any, micro_batches_per_epoch: int, accum: int) -> int:
    """Optimizer steps of a run: ``Nst`` as given; ``Nep`` = the steps that consume N epochs of
    micro-batches (the last step may reach into the next epoch)."""
    if duration.unit == "st":
        return duration.value
    return max(1, math.ceil(duration.value * micro_batches_per_epoch / accum))


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in _metric_lines(path)]


# ---------------------------------------------------------------------------------------------
# Export with a self-check in transformers
# ---------------------------------------------------------------------------------------------


def export_and_check(
    state: dict[str, torch.Tensor],
    args: Any,
    source: Any,
    export_dir: Path,
    check_path: Path,
    dtype: str | None = None,
) -> Path:
    """Write the HF folder, then check it.

    Checks, each on what was written to disk: every tensor equals the trained one cast to its
    export dtype (exactly); ``transformers``' ``LlamaForCausalLM`` loaded from the folder gives
    the same logits as the native model on a probe (float32, relative error < 1e-4); the
    tokenizer loads. The drift of the export-dtype rounding from the un-rounded trained weights
    is recorded too. One model is held at a time. The result goes to ``check_path``; a failed
    check raises.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from longtune.export.hf import save_model
    from longtune.model.convert import load_model
    from longtune.model.llama import Transformer

    state = {k.removeprefix("_orig_mod."): v for k, v in state.items()}
    save_model(None, export_dir, source=source, dtype=dtype, state_dict=state)

    written = load_model(export_dir)  # tensors as stored
    mismatched = [
        k for k, v in written.state_dict().items() if not torch.equal(v, state[k].to(v.dtype))
    ]
    del written
    tokenizer = AutoTokenizer.from_pretrained(export_dir)
    probe_text = "Long-context fine-tuning check: the quick brown fox jumps over the lazy dog."
    ids = torch.tensor([tokenizer(probe_text)["input_ids"]])
    with torch.no_grad():
        hf = AutoModelForCausalLM.from_pretrained(
            export_dir, dtype=torch.float32, attn_implementation="eager"
        ).eval()
        ref = hf(ids).logits.double()
        del hf

        def rel(logits: torch.Tensor) -> float:
            return float((logits.double() - ref).norm() / ref.norm())

        err_written = rel(load_model(export_dir, dtype=torch.float32)(ids))
        trained = Transformer(args)
        trained.load_state_dict({k: v.float() for k, v in state.items()})
        trained.tie_weights()
        err_unrounded = rel(trained.eval()(ids))
        del trained

    check = {
        "probe_tokens": int(ids.numel()),
        "tensors_equal_trained": not mismatched,
        "mismatched_tensors": mismatched,
        "rel_err_vs_transformers": err_written,
        "rel_err_trained_weights_unrounded": err_unrounded,
        "tokenizer_loaded": True,
        "chat_template": bool(getattr(tokenizer, "chat_template", None)),
    }
    check["passed"] = not mismatched and err_written < 1e-4
    check_path.write_text(json.dumps(check, indent=2))
    if not check["passed"]:
        raise RuntimeError(f"export self-check failed: {check}")
    return export_dir


def export_checkpoint(ckpt_dir: str | Path, out_dir: str | Path, dtype: str | None = None) -> Path:
    """``longtune export RUN_DIR/checkpoints/step-N OUT``: an HF folder from a training checkpoint.

    The run folder's ``source/`` (config.json, tokenizer files, tensor layout of the model the run
    started from) supplies everything but the weights. Runs in one process. The self-check
    result goes beside the folder, to ``OUT.export_check.json``.
    """
    from longtune.model.args import ModelArgs
    from longtune.model.llama import Transformer
    from longtune.train.checkpoint import checkpoint_info, load_checkpoint

    ckpt_dir = Path(ckpt_dir)
    checkpoint_info(ckpt_dir)  # raises on an incomplete checkpoint
    run_dir = ckpt_dir.parent.parent
    if not (run_dir / SOURCE_SUBDIR / "hf_source.json").is_file():
        raise FileNotFoundError(
            f"{ckpt_dir} is not inside a longtune run folder (no {run_dir / SOURCE_SUBDIR})"
        )
    source = _run_source(run_dir)
    args = ModelArgs.from_hf_config(source.config)
    model = Transformer(args)
    load_checkpoint(ckpt_dir, model=model, optimizer=None, scheduler=None, restore_rng=False)
    model.tie_weights()
    out = Path(out_dir)
    check = out.with_name(out.name + ".export_check.json")
    return export_and_check(model.state_dict(), args, source, out, check, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# Entry points: CLI and Python API
# ---------------------------------------------------------------------------------------------

TRAIN_HELP = """usage: longtune train [CONFIG.yaml] [--section.key=value ...] [--flag value ...]

Fine-tune a Llama-family model. Settings come from defaults, then CONFIG.yaml, then flags
(flags win). Run under torchrun for several processes (gloo on CPU, NCCL on GPU).

Common flags: {aliases}

All settings (--section.key=value):
{fields}
"""


def train_main(argv: list[str]) -> int:
    """``longtune train``: parse, validate, run. Returns the exit code."""
    if any(a in ("-h", "--help") for a in argv):
        aliases = ", ".join(f"--{k} ({v})" for k, v in FLAG_ALIASES.items())
        fields = "\n".join(f"  {k}: {doc}" for k, doc in field_docs().items())
        print(TRAIN_HELP.format(aliases=aliases, fields=fields))
        return 0
    path = argv[0] if argv and not argv[0].startswith("-") else None
    overrides = argv[1:] if path else argv
    try:
        cfg = load_config(path, overrides)
        result = run_training(cfg)
    except (ValueError, FileNotFoundError, NotImplementedError) as e:
        # ConfigError, DataValidationError, ParallelConfigError, UnsupportedModelError, ...
        print(f"longtune train: error: {e}", file=sys.stderr)
        return 2
    except TrainingDivergedError as e:
        print(f"longtune train: stopped: {e}", file=sys.stderr)
        return 3
    except PeerLostError as e:
        print(f"longtune train: stopped: {e}", file=sys.stderr)
        return 1
    if result.export_dir is not None:
        print(f"done: {result.final_step} steps; Hugging Face checkpoint in {result.export_dir}")
    return 0


def finetune(
    model: str,
    train_data: str | list[str],
    task_type: str = "chat",
    context_length: int = 8192,
    duration: str = "1ep",
    learning_rate: float = 1e-5,
    output_dir: str = "runs/longtune",
    eval_data: str | list[str] | None = None,
    config: str | None = None,
    **more: Any,
) -> RunResult:
    """Fine-tune ``model`` on ``train_data`` and export a Hugging Face checkpoint.

    Args:
        model: HF checkpoint folder of a Llama-family model.
        train_data: JSONL / text file(s) or folder(s).
        task_type: chat, instruction or text.
        context_length: tokens per packed sequence.
        duration: ``3ep`` (epochs) or ``500st`` (optimizer steps).
        learning_rate: peak learning rate.
        output_dir: run folder (``config.yaml``, ``metrics.jsonl``, ``checkpoints/``, ``hf/``).
        eval_data: optional held-out data, evaluated at start, every ``eval_every`` steps
            and at the end.
        config: optional YAML file; the arguments here override it.
        **more: any other setting as ``section__key=value`` or ``"section.key": value``
            (e.g. ``train__grad_accum=4``, ``optim__warmup_steps=10``).

    Returns:
        The run's :class:`RunResult` (status, metrics, export path, export self-check); a run
        stopped by a NaN/Inf loss comes back with ``status="failed"`` and the reason in
        ``error``.

    Raises:
        ConfigError, DataValidationError, FileNotFoundError: bad settings or data, found
            before anything was started.
    """
    as_list = lambda x: [x] if isinstance(x, str) else list(x)  # noqa: E731
    overrides = [
        f"--model.path={model}",
        f"--data.train={','.join(as_list(train_data))}",
        f"--data.task_type={task_type}",
        f"--data.context_length={context_length}",
        f"--train.duration={duration}",
        f"--optim.lr={learning_rate}",
        f"--output.dir={output_dir}",
    ]
    if eval_data:
        overrides.append(f"--data.eval={','.join(as_list(eval_data))}")
    for key, value in more.items():
        if isinstance(value, list | tuple):
            value = ",".join(str(v) for v in value)
        overrides.append(f"--{key.replace('__', '.')}={value}")
    cfg = load_config(config, overrides)
    try:
        return run_training(cfg)
    except TrainingDivergedError as e:
        # The run started and stopped on a NaN: report it like a finished run, with its metrics.
        return RunResult(
            status="failed",
            run_dir=Path(cfg.output.dir),
            metrics=read_metrics(cfg.output.dir),
            error=str(e),
        )


def clean_run_dir(run_dir: str | Path) -> None:
    """Remove a run folder (tests and the demo start fresh with it)."""
    shutil.rmtree(run_dir, ignore_errors=True)
