"""The fine-tuning run: a :class:`Trainer` whose named steps read top to bottom.

Order of a run (everything that can be wrong with the input fails before any process group or
large allocation):

1. :func:`preflight`: the config is already validated; every data line, the model's
   config.json, the parallel degrees against the world size and the heads, the start against
   the run folder's checkpoints;
2. ``init_distributed``: gloo on CPU, NCCL on GPU; a world of one without torchrun;
3. :meth:`Trainer.build`: data (rank 0 tokenizes first, the others reuse its cache) and the
   per-rank loaders; then model → ``parallelize`` (activation checkpointing, FSDP2) →
   optimizer and schedule;
4. :meth:`Trainer.resume` from the newest complete checkpoint (``checkpoint.resume=auto``);
5. :meth:`Trainer.train`: :meth:`~Trainer.train_step` (the micro-batches of one optimizer step
   are fetched together so the loss is divided by the supervised-token count of the whole
   global batch; clipping; NaN stop), metrics, :meth:`~Trainer.evaluate`, :meth:`~Trainer.save`;
6. :meth:`Trainer.finish`: gather the full state, close the process group, export ``hf/`` and
   check it in ``transformers`` (rank 0).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import resource
import signal
import time
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)

from longtune.api import RunResult
from longtune.assets import cache_dir as default_cache_dir
from longtune.data import (
    IGNORE_INDEX,
    DataValidationError,
    PackedDataset,
    PackedLoader,
    build_packed_dataset,
    overlength_summary,
    validate_files,
)
from longtune.export.check import (
    export_and_check,
    has_run_source,
    read_run_source,
    save_run_source,
)
from longtune.fsutil import OutputDirError, check_writable
from longtune.model.args import ModelArgs
from longtune.model.attention import check_backend
from longtune.model.checks import read_model_config
from longtune.model.convert import check_model_folder, load_model
from longtune.model.llama import Transformer
from longtune.parallel.dims import (
    ParallelDims,
    PeerLostError,
    init_distributed,
    is_peer_failure,
)
from longtune.parallel.parallelize import is_fsdp_sharded, parallelize
from longtune.run_dir import RunDir, check_run_folder, read_metrics
from longtune.train.checkpoint import (
    check_checkpoint_model,
    checkpoint_info,
    find_latest_checkpoint,
    load_checkpoint,
    read_extra,
    save_checkpoint,
)
from longtune.train.config import (
    ConfigError,
    Duration,
    JobConfig,
    check_resume_config,
    config_to_dict,
    load_config,
    resolve_grad_accum,
    save_config,
)
from longtune.train.keeper import RunKeeper
from longtune.train.metrics import MetricsWriter, ProgressLine, setup_logging
from longtune.train.schedule import build_lr_scheduler
from longtune.train.signals import RunCancelled, StopSignals, signal_name

logger = logging.getLogger("longtune.train")


class TrainingDivergedError(RuntimeError):
    """The loss or gradient norm became NaN or infinite."""


# ---------------------------------------------------------------------------------------------
# Preflight: everything checkable without a process group or a big allocation
# ---------------------------------------------------------------------------------------------


def preflight(cfg: JobConfig, world_size: int) -> ParallelDims:
    """Validate data, model config, parallel layout and the start against the run folder.

    Args:
        cfg: the validated config.
        world_size: the number of processes of the job.

    Returns:
        The checked parallel layout.
    """
    _, args = read_model_config(cfg.model.path)
    for key, paths in (("data.train", cfg.data.train), ("data.eval", cfg.data.eval)):
        for p in paths:
            if not Path(p).exists():
                raise FileNotFoundError(f"{key}: {p} does not exist")
    errors = validate_files(list(cfg.data.train) + list(cfg.data.eval), cfg.data.task_type)
    if errors:
        raise errors[0]
    check_writable(cfg.output.dir, "output.dir")
    check_run_folder(RunDir(cfg.output.dir))  # never writes among a user's files
    check_writable(cfg.data.cache_dir or default_cache_dir() / "tokens", "data.cache_dir")
    dims = ParallelDims.build(
        world_size,
        cfg.parallel.sp,
        cfg.parallel.dp,
        n_heads=args.n_heads,
        n_kv_heads=args.n_kv_heads,
    )
    check_model_folder(cfg.model.path)  # tokenizer, safetensors headers, vocabulary fit
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = cfg.model.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device_type == "cuda" else "float32"
    check_backend(cfg.model.attention, device_type, dtype=getattr(torch, dtype))
    _check_resume(cfg, dims, args)
    return dims


def _check_resume(cfg: JobConfig, dims: ParallelDims, args: ModelArgs) -> None:
    """Refuse a start that would mix a new run with the checkpoints of an older one, or resume
    a run with settings it was not trained with."""
    run = RunDir(cfg.output.dir)
    latest = find_latest_checkpoint(run.path) if run.checkpoints.is_dir() else None
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
        _check_same_settings(cfg, ckpt, dims)
        with torch.device("meta"):
            model = Transformer(args)
        check_checkpoint_model(ckpt, model)  # another model: refused before anything starts


def _check_same_settings(cfg: JobConfig, ckpt: Path, dims: ParallelDims) -> None:
    """Compare the new settings with those of the run that wrote ``ckpt`` (its config.yaml)."""
    run = RunDir(ckpt.parent.parent)
    if not run.config.is_file():
        logger.warning("%s has no %s: resuming without comparing settings", run.path, run.config)
        return
    try:
        old = load_config(str(run.config), [])
    except ConfigError as e:
        raise ConfigError(f"cannot read the settings of the run being resumed: {e}") from None
    new_batch = cfg.train.micro_batch_size * resolve_grad_accum(cfg, dims.dp) * dims.dp
    old_batch = read_extra(ckpt).get("batch_sequences")
    if old_batch is None:  # a checkpoint written before the global batch was recorded
        old_world, old_sp = checkpoint_info(ckpt)["world_size"], old.parallel.sp
        old_dp = old.parallel.dp if old.parallel.dp != -1 else old_world // old_sp
        old_batch = old.train.micro_batch_size * resolve_grad_accum(old, old_dp) * old_dp
    check_resume_config(old, cfg, old_batch, new_batch, run.path)


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def run_training(
    cfg: JobConfig,
    *,
    stop: StopSignals | None = None,
    keeper: RunKeeper | None = None,
    _fault: Any = None,
) -> RunResult:
    """Run a fine-tuning job described by ``cfg`` (one process, or one rank under torchrun).

    Global rank 0 locks the run folder and keeps its ``status.json`` (see
    :mod:`longtune.train.keeper`).

    Args:
        cfg: the validated job config.
        stop: the installed SIGTERM/SIGINT handling (the CLI installs it before importing
            torch); None installs one for this call, whose second signal raises instead of
            exiting the process.
        keeper: the run folder's keeper, if the caller made one (the CLI, to refuse a locked
            folder before importing torch); None makes one.
        _fault: test hook, called as ``_fault(step, loss_sum)`` and returning the loss sum to
            use (used to inject a NaN).

    Returns:
        The run's result (rank 0 has the export check; every rank has the status).

    Raises:
        RunLockedError: another run writes into ``output.dir`` (nothing was written).
        RunCancelled: stopped by SIGTERM / SIGINT (in the loop: after a checkpoint).
        TrainingDivergedError: the loss became NaN/Inf (no checkpoint of that step).
        ConfigError, DataValidationError, FileNotFoundError: bad settings or data, found
            before any process group or big allocation.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    keeper = keeper or RunKeeper.of(cfg.output.dir)
    signals = contextlib.nullcontext(stop) if stop is not None else StopSignals(hard_exit=False)
    with signals as stop:
        stop.on_hard_exit = lambda signum, message: keeper.end(
            "cancelled", signal=signal_name(signum), message=message
        )
        try:
            keeper.claim_existing()
            dims = preflight(cfg, world_size)
            keeper.claim()
            result = _train(cfg, dims, stop, keeper, _fault)
            keeper.end("succeeded")
            return result
        except BaseException as exc:
            if (
                stop.requested
                and failure_reason(exc) == "error"
                and not isinstance(exc, RunCancelled)
            ):
                # A library interrupted half-way, or another rank stopped first and took the
                # process group down with it. An error with a cause of its own (a full disk, a
                # NaN, bad data) is reported as it is.
                exc = stop.cancelled()
            _record_end(keeper, exc)
            raise exc
        finally:
            keeper.release()


def _train(
    cfg: JobConfig, dims: ParallelDims, stop: StopSignals, keeper: RunKeeper, fault: Any
) -> RunResult:
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    try:
        # Inside: a rendezvous that times out (a peer that never came) is a lost peer too.
        rank, world, device = init_distributed(cfg.parallel.timeout_s)
        trainer = Trainer(cfg, rank, dims, device, stop=stop, keeper=keeper, fault=fault)
        trainer.build()
        trainer.resume()
        trainer.train()
        return trainer.finish()
    except Exception as e:
        if world == 1 or not is_peer_failure(e):
            raise
        detail = str(e).strip().splitlines()[0][:300]
        raise PeerLostError(
            f"rank {rank} of {world}: another rank died or stopped answering ({detail}); the "
            f"newest complete checkpoint in {RunDir(cfg.output.dir).checkpoints} is intact: "
            "rerun the same command to resume"
        ) from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def failure_reason(exc: BaseException) -> str:
    """The ``reason`` recorded in ``status.json`` for a run that ended with ``exc``."""
    if isinstance(exc, TrainingDivergedError):
        return "nan"
    if isinstance(exc, torch.OutOfMemoryError | MemoryError):
        return "oom"
    if isinstance(exc, DataValidationError):
        return "data error"
    if isinstance(exc, OutputDirError) or (
        isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError)
    ):
        return "output error"  # a full disk, a read-only folder
    if isinstance(exc, ValueError | FileNotFoundError | NotImplementedError):
        return "config error"
    return "error"


def _record_end(keeper: RunKeeper, exc: BaseException) -> None:
    if isinstance(exc, RunCancelled):
        fields = {"signal": signal_name(exc.signum), "message": str(exc)}
        keeper.end("cancelled", checkpoint=exc.checkpoint, **fields)
        return
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if failure_reason(exc) == "error":
        text = f"{type(exc).__name__}: {text}"
    keeper.end("failed", reason=failure_reason(exc), error=text)


class Trainer:
    """One rank's part of a run. Call :meth:`build`, :meth:`resume`, :meth:`train`,
    :meth:`finish` in this order (what :func:`run_training` does).

    Args:
        cfg: the validated config.
        rank: this process's global rank.
        dims: the parallel layout (from :func:`preflight`).
        device: this rank's device.
        stop: the installed SIGTERM/SIGINT handling.
        keeper: the run folder's lock and status (acts on global rank 0 only).
        fault: test hook, see :func:`run_training`.
    """

    def __init__(
        self,
        cfg: JobConfig,
        rank: int,
        dims: ParallelDims,
        device: torch.device,
        *,
        stop: StopSignals,
        keeper: RunKeeper,
        fault: Any = None,
    ) -> None:
        self.cfg = cfg
        self.rank, self.world, self.device = rank, dims.world_size, device
        self.run = RunDir(cfg.output.dir)
        self.dims = dims
        self.dp_rank, self.sp_rank = self.dims.coords(rank)
        self.stop, self.keeper, self.fault = stop, keeper, fault
        self.step = 0
        self.tokens_seen = 0
        self.elapsed_before = 0.0
        self.t_start = time.monotonic()
        self.stopping = False
        """Every rank agreed to stop (a SIGTERM/SIGINT reached one of them)."""
        self.last_checkpoint: Path | None = None
        self.resume_from: Path | None = None  # the checkpoint this run resumes from (build)
        self.evaluated_step = -1
        self.eval_pending = False
        """An eval was due at the step a stop checkpointed: it runs first thing on resume."""

    # ---- build: data, then model -> parallelize -> optimizer ------------------------------

    def build(self) -> None:
        """Logging into the run folder (rank 0 created it), then data, model and optimizer."""
        dist.barrier()
        setup_logging(self.run.path, self.rank)
        torch.manual_seed(self.cfg.train.seed)
        self.build_data()
        self.resume_from = self._checkpoint_to_resume()
        if self.resume_from is not None:
            # Refused here, before any weight is read, when the data position cannot carry
            # over exactly to this layout (the loader names both layouts).
            self.loader.resume_position(self._loader_state(self.resume_from))
        self.build_model()
        self.build_optimizer()

    def _checkpoint_to_resume(self) -> Path | None:
        cfg = self.cfg.checkpoint
        if cfg.resume == "auto":
            found = [str(find_latest_checkpoint(self.run.path) or "")] if self.rank == 0 else [None]
            dist.broadcast_object_list(found, src=0)
            return Path(found[0]) if found[0] else None
        return None if cfg.resume == "never" else Path(cfg.resume)

    def _loader_state(self, ckpt: Path) -> dict[str, Any]:
        """The loader state this rank resumes from (rank 0's where the checkpoint had fewer
        ranks, as :func:`load_checkpoint` does)."""
        own = (ckpt / f"rank-{self.rank}.pt").is_file()
        return read_extra(ckpt, self.rank if own else 0)["loader"]

    def build_data(self) -> None:
        """Tokenize and pack (rank 0 first: it fills the cache the others read), the loaders,
        and the run's length in optimizer steps."""
        cfg = self.cfg
        datasets: dict[str, PackedDataset | None] = {}
        for turn in (0, 1):
            if (self.rank == 0) == (turn == 0):
                datasets["train"] = self._dataset(cfg.data.train)
                datasets["eval"] = self._dataset(cfg.data.eval) if cfg.data.eval else None
            dist.barrier()
        self.mbs = cfg.train.micro_batch_size
        self.loader = self._loader(datasets["train"])
        self.eval_loader = self._loader(datasets["eval"]) if datasets["eval"] else None
        logger.info("training data: %s", overlength_summary(datasets["train"].stats))
        self.accum = resolve_grad_accum(cfg, self.dims.dp)
        self.total_steps = total_optimizer_steps(cfg.train.duration, len(self.loader), self.accum)
        self.steps_per_epoch = len(self.loader) / self.accum
        if cfg.optim.warmup_steps > self.total_steps:
            raise ConfigError(
                f"optim.warmup_steps={cfg.optim.warmup_steps} is longer than the run "
                f"({self.total_steps} optimizer steps for train.duration={cfg.train.duration}); "
                "lower it or train longer"
            )

    def _dataset(self, paths: list[str]) -> PackedDataset:
        d = self.cfg.data
        return build_packed_dataset(
            paths,
            self.cfg.model.path,
            d.task_type,
            d.context_length,
            loss_on=d.loss_on,
            overlength=d.overlength,
            cache_dir=d.cache_dir,
        )

    def _loader(self, dataset: PackedDataset) -> PackedLoader:
        return PackedLoader(
            dataset,
            micro_batch_size=self.mbs,
            dp_rank=self.dp_rank,
            dp_size=self.dims.dp,
            sp_rank=self.sp_rank,
            sp_size=self.dims.sp,
            seed=self.cfg.train.seed,
        )

    def build_model(self) -> None:
        """Build on the meta device, shard, then fill the shards from rank 0's copy.

        Only rank 0 reads the checkpoint; the others receive their shards by broadcast once the
        model is sharded, so no rank but 0 ever holds the whole model.
        """
        cfg, device = self.cfg, self.device
        if cfg.model.dtype == "auto":
            self.compute_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        else:
            self.compute_dtype = getattr(torch, cfg.model.dtype)
        config_json = json.loads((Path(cfg.model.path) / "config.json").read_text())
        self.args = args = ModelArgs.from_hf_config(config_json)
        full_state = None
        if self.rank == 0:
            full_state = load_model(cfg.model.path, dtype=torch.float32, device="cpu").state_dict()
            if not has_run_source(self.run):
                save_run_source(cfg.model.path, self.run)
        with torch.device("meta"):
            model = Transformer(args, attention=cfg.model.attention)
        mesh = self.dims.build_mesh(device.type)
        parallelize(
            model,
            mesh,
            cfg.model.activation_checkpointing,
            param_dtype=None if self.compute_dtype == torch.float32 else self.compute_dtype,
            compile=cfg.train.compile == "true"
            or (cfg.train.compile == "auto" and device.type == "cuda"),
            keep_exchanges=cfg.parallel.keep_exchanges,
        )
        model.to_empty(device=device)
        if not is_fsdp_sharded(model):
            model.tie_weights()  # to_empty gives each module its own tensor; FSDP keeps ties
        if args.tie_embeddings and model.output.weight is not model.tok_embeddings.weight:
            raise RuntimeError("tied embeddings were untied while sharding the model")
        set_model_state_dict(
            model,
            full_state if self.rank == 0 else {},
            options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True),
        )
        del full_state
        model.init_buffers(device=device)
        model.train()
        self.model = model

    def build_optimizer(self) -> None:
        """AdamW (fused: one kernel per parameter and no optimizer-wide temporaries, on CPU
        and GPU) and the warmup + decay schedule."""
        opt = self.cfg.optim
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(),
            lr=opt.lr,
            betas=tuple(opt.betas),
            eps=opt.eps,
            weight_decay=opt.weight_decay,
            fused=True,
        )
        self.scheduler = build_lr_scheduler(
            self.optimizer, opt.schedule, opt.warmup_steps, self.total_steps, opt.min_lr_ratio
        )

    # ---- resume ---------------------------------------------------------------------------

    def resume(self) -> None:
        """Load the checkpoint to resume from (if any), then open the metrics and progress."""
        cfg, rank = self.cfg, self.rank
        ckpt = self.resume_from
        if ckpt is not None:
            extra = load_checkpoint(
                ckpt, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler
            )
            self.step, self.tokens_seen = extra["step"], extra["tokens_seen"]
            self.elapsed_before = extra["elapsed_s"]
            self.loader.load_state_dict(extra["loader"])
            self.eval_pending = extra.get("eval_pending", False)
            self.last_checkpoint = ckpt
            logger.info("resumed from %s at step %d", ckpt, self.step)
        self.keeper.progress(self.step, self.total_steps)
        if rank == 0:
            # A fresh start (no checkpoint) drops every earlier record, the step-0 eval included.
            last = self.step if ckpt is not None else -1
            _truncate_metrics(self.run, last, self.total_steps)
            save_config(cfg, self.run.config)
        dist.barrier()
        self.metrics = MetricsWriter(
            self.run.path, rank, tensorboard=cfg.output.tensorboard, mlflow=cfg.output.mlflow
        )
        if rank == 0 and ckpt is None:
            params = {k: v for s in config_to_dict(cfg).values() for k, v in s.items()}
            self.metrics.log_params(params)
        self.progress = ProgressLine(self.total_steps, rank)
        logger.info(
            "training %s: %d params, %d steps (%.1f per epoch), %d micro-batches x %d seq x %d "
            "tokens per rank per step, world %d (dp %d, sp %d), %s on %s",
            cfg.model.path,
            self.args.num_params(),
            self.total_steps,
            self.steps_per_epoch,
            self.accum,
            self.mbs,
            cfg.data.context_length,
            self.world,
            self.dims.dp,
            self.dims.sp,
            self.compute_dtype,
            self.device,
        )

    # ---- the loop -------------------------------------------------------------------------

    def train(self) -> None:
        """Optimizer steps until the run's length; eval and checkpoints on their schedule.

        A SIGTERM/SIGINT inside the loop is only recorded; every rank learns of it from the
        reductions of a step (:meth:`train_step`), and all stop after the same step with a
        checkpoint (:meth:`cancel`).
        """
        cfg = self.cfg
        if self.step == 0 or self.eval_pending:
            self.log_eval(self.step)
            self.eval_pending = False  # done: later checkpoints must not ask for it again
        self.t_start = time.monotonic()
        self.progress.start(self.step)
        with self.stop.deferred():
            while self.step < self.total_steps:
                record = self.train_step()
                if record is None:  # asked to stop before this step began
                    break
                self.metrics.log(self.step, record)
                self.progress.update(self.step, record["loss"], record["tokens"], lr=record["lr"])
                self.keeper.progress(self.step)
                if self.stopping:
                    break
                every = cfg.train.eval_every
                if every > 0 and self.step % every == 0 and self.step < self.total_steps:
                    self.log_eval(self.step)
                every = cfg.checkpoint.every
                if self.step == self.total_steps or (every > 0 and self.step % every == 0):
                    self.save()
            if not self.stopping:  # a signal during the last checkpoint: agree once more
                self.stopping = self._all_reduce_sum([self._stop_flag()])[0] > 0
            if self.stopping:
                self.cancel()
        self.log_eval(self.step)

    def train_step(self) -> dict[str, Any] | None:
        """One optimizer step over ``grad_accum`` micro-batches; returns its metrics record.

        The stop flag rides on the step's two reductions: raised at the first (before any
        work), the step is skipped and None returned; at the second, the step is finished and
        ``self.stopping`` set. Every rank sees the same sums, so every rank decides the same.
        """
        t0 = time.monotonic()
        position = self.loader.state_dict()
        batches = [next(self.loader) for _ in range(self.accum)]
        local_count = sum(b["num_supervised"] for b in batches)
        # Every rank of an SP group counts the same sequence: sum the integers (exact in float64),
        # then divide.
        count_sum, stop = self._all_reduce_sum([local_count, self._stop_flag()])
        global_count = float(round(count_sum / self.dims.sp))
        if stop > 0:
            self.loader.load_state_dict(position)  # these micro-batches were not used
            self.stopping = True
            return None
        # FSDP averages gradients over the world: scale so the result is the global-mean grad.
        scale = self.world / max(global_count, 1.0)
        loss_sum = 0.0
        for b in batches:
            part = self.loss_sum_of(b)
            if self.fault is not None:
                part = self.fault(self.step + 1, part)
            (part * scale).backward()
            loss_sum += float(part.detach())
        loss_sum, stop = self._all_reduce_sum([loss_sum, self._stop_flag()])
        self.stopping = stop > 0
        loss = loss_sum / max(global_count, 1.0)
        clip = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        grad_norm = float(grad_norm)
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            self._diverged(loss, grad_norm, batches)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        step_tokens = self.accum * self.mbs * self.cfg.data.context_length * self.dims.dp
        self.tokens_seen += step_tokens
        return {
            "kind": "train",
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": step_tokens,
            "supervised_tokens": int(global_count),
            "tokens_seen": self.tokens_seen,
            "tokens_per_s": step_tokens / (time.monotonic() - t0),
            "peak_memory_gb": _peak_memory_gb(self.device),
            "elapsed_s": self._elapsed(),
            "epoch": batches[-1]["epoch"],
        }

    def _diverged(self, loss: float, grad_norm: float, batches: list[dict[str, Any]]) -> None:
        samples: list[Any] = [None] * self.world
        dist.all_gather_object(samples, [s for b in batches for s in b["sample_ids"]])
        raise TrainingDivergedError(
            f"non-finite loss {loss} / grad norm {grad_norm} at step {self.step + 1} "
            f"(packed sequences per rank: {samples}); stopped without writing a checkpoint. "
            "Lower optim.lr, check the data of these samples, or resume from the last "
            "checkpoint"
        )

    def loss_sum_of(self, batch: dict[str, Any]) -> torch.Tensor:
        """Summed token loss of one micro-batch (this rank's slice)."""
        b = {
            k: v.to(self.device, non_blocking=True) for k, v in batch.items() if torch.is_tensor(v)
        }
        return self.model(
            b["input_ids"],
            position_ids=b["position_ids"],
            cu_seqlens=b["cu_seqlens"],
            max_seqlen=batch["max_seqlen"],
            labels=b["labels"],
        )

    def evaluate(self) -> dict[str, float] | None:
        """Loss over the eval set (each packed sequence scored once), or None without one."""
        if self.eval_loader is None:
            return None
        self.model.eval()
        n = len(self.eval_loader)
        if self.cfg.train.eval_batches > 0:
            n = min(n, self.cfg.train.eval_batches)
        n_seq = len(self.eval_loader.dataset)
        loss_sum, count = 0.0, 0
        with torch.no_grad():
            for i in range(n):
                b = self.eval_loader.batch(0, i)
                # The last step of an epoch is filled up with sequences from its start; score
                # each eval sequence once, whatever the number of ranks.
                first = (i * self.dims.dp + self.dp_rank) * self.mbs
                for j in range(self.mbs):
                    if first + j >= n_seq:
                        b["labels"][j] = IGNORE_INDEX
                loss_sum += float(self.loss_sum_of(b))
                count += int((b["labels"] != IGNORE_INDEX).sum())  # this rank's slice
        loss_sum, count = self._all_reduce_sum([loss_sum, count])
        self.model.train()
        loss = loss_sum / max(count, 1)
        return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), "eval_tokens": count}

    def log_eval(self, at: int) -> None:
        """Evaluate and record the result at step ``at``."""
        result = self.evaluate()
        self.evaluated_step = at
        if result is not None:
            self.metrics.log(at, {"kind": "eval", **result})
            logger.info(
                "eval at step %d: loss %.4f, ppl %.2f", at, result["eval_loss"], result["eval_ppl"]
            )

    def save(self) -> Path:
        """Write the checkpoint of the current step (collective); returns its folder."""
        self.last_checkpoint = save_checkpoint(
            self.run.path,
            self.step,
            model=self.model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            extra={
                "step": self.step,
                "tokens_seen": self.tokens_seen,
                "elapsed_s": self._elapsed(),
                "loader": self.loader.state_dict(),
                # Sequences per optimizer step: a resume may change the layout, not this.
                "batch_sequences": self.mbs * self.accum * self.dims.dp,
                "eval_pending": self.eval_pending,
            },
            keep_last=self.cfg.checkpoint.keep_last,
        )
        return self.last_checkpoint

    def cancel(self) -> NoReturn:
        """Stop on every rank after the agreed step: checkpoint it (unless it just was), say
        so in one line, raise :class:`RunCancelled`."""
        saved = (
            self.last_checkpoint is not None and self.last_checkpoint.name == f"step-{self.step}"
        )
        every = self.cfg.train.eval_every
        due = every > 0 and self.step % every == 0 and self.step < self.total_steps
        self.eval_pending = due and self.evaluated_step != self.step
        if self.step > 0 and not saved:
            self.save()
        signum = self.stop.signum or signal.SIGTERM
        where = f"after step {self.step} of {self.total_steps}"
        if self.last_checkpoint is not None:
            message = (
                f"cancelled by {signal_name(signum)} {where}; checkpoint {self.last_checkpoint}; "
                "rerun the same command to resume"
            )
        else:
            message = f"cancelled by {signal_name(signum)} before the first step; nothing to keep"
        logger.warning(message)
        exc = RunCancelled(signum, message, str(self.last_checkpoint or "") or None)
        exc.logged = True
        raise exc

    # ---- the end --------------------------------------------------------------------------

    def finish(self) -> RunResult:
        """Gather the full state, close the process group, export and check ``hf/`` (rank 0).

        Gathering is the last collective: the process group is then closed on every rank
        together, and rank 0 exports alone, so a long export of a large model cannot trip a
        collective's timeout on the other ranks.
        """
        full = get_model_state_dict(
            self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        dist.barrier()
        dist.destroy_process_group()
        result = RunResult(status="succeeded", run_dir=self.run.path, final_step=self.step)
        if self.rank == 0:
            source = read_run_source(self.run)
            check = export_and_check(
                full, self.args, source, self.run.export, self.run.export_check, overwrite=True
            )
            result.export_dir, result.export_check = self.run.export, check
            logger.info("exported %s (self-check: %s)", self.run.export, check)
        self.metrics.close()
        result.metrics = read_metrics(self.run)
        return result

    # ---- helpers --------------------------------------------------------------------------

    def _all_reduce_sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def _stop_flag(self) -> float:
        return 1.0 if self.stop.requested else 0.0

    def _elapsed(self) -> float:
        return self.elapsed_before + time.monotonic() - self.t_start


def _peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def total_optimizer_steps(duration: Duration, micro_batches_per_epoch: int, accum: int) -> int:
    """Optimizer steps of a run: ``Nst`` as given; ``Nep`` = the steps that consume N epochs of
    micro-batches (the last step may reach into the next epoch).

    Args:
        duration: the run's ``train.duration``.
        micro_batches_per_epoch: the loader's micro-batches per epoch (per rank).
        accum: micro-batches per optimizer step.

    Returns:
        The optimizer steps of the run.
    """
    if duration.unit == "st":
        return duration.value
    return max(1, math.ceil(duration.value * micro_batches_per_epoch / accum))


def _truncate_metrics(run: RunDir, last_step: int, total_steps: int) -> None:
    """Drop records that a run resuming at ``last_step`` will produce again: every record past
    it, and the final eval (it follows the last checkpoint). Rewritten atomically; a line torn
    by a crash mid-write is dropped."""
    if not run.metrics.exists():
        return

    def keep(rec: dict[str, Any]) -> bool:
        if rec["step"] > last_step:
            return False
        return not (rec.get("kind") == "eval" and rec["step"] == total_steps and last_step > 0)

    kept = [rec for rec in read_metrics(run) if keep(rec)]
    tmp = run.metrics.with_name(run.metrics.name + ".tmp")
    tmp.write_text("".join(json.dumps(rec) + "\n" for rec in kept))
    os.replace(tmp, run.metrics)
