"""One rank's part of a fine-tuning run: a :class:`Trainer` whose named steps read top to bottom.

:func:`longtune.train.run.run_training` checks the run (:mod:`~longtune.train.preflight`),
starts the process group and calls, in order:

1. :meth:`Trainer.build`: data (rank 0 tokenizes first, the others reuse its cache) and the
   per-rank loaders; the checkpoint to resume from, whose data position is checked against this
   layout before any weight is read; then model → ``parallelize`` (sequence parallelism,
   activation checkpointing, compile, FSDP2) → optimizer and schedule → the checkpointer;
2. :meth:`Trainer.resume` from that checkpoint;
3. :meth:`Trainer.train`: :meth:`~Trainer.train_step` (the micro-batches of one optimizer step
   are fetched together so the loss is divided by the supervised-token count of the whole
   global batch; clipping; NaN stop), metrics, :meth:`~Trainer.evaluate`, :meth:`~Trainer.save`;
4. :meth:`Trainer.finish`: gather the full state, close the process group, export ``hf/`` and
   check it in ``transformers`` (rank 0).

What a checkpoint holds besides model and optimizer is registered once with the
:class:`~longtune.checkpoint.Checkpointer`: the :class:`~longtune.train.state.TrainState`
(counters, RNG), the loader (the data position) and the learning-rate schedule.
"""

from __future__ import annotations

import logging
import math
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

from longtune.checkpoint import (
    Checkpointer,
    CheckpointTensors,
    find_latest_checkpoint,
    read_rank_states,
)
from longtune.data import (
    IGNORE_INDEX,
    MixedDataset,
    PackedDataset,
    PackedLoader,
    build_packed_dataset,
    data_size,
    overlength_summary,
)
from longtune.export.check import export_and_check
from longtune.export.gguf import export_gguf
from longtune.export.lora import MergedTensors, write_peft_adapter
from longtune.model.hf import HFSource, read_hf_source
from longtune.model.llama import Transformer
from longtune.model.lora import LoraRecord, add_lora, freeze_base_dtype, init_adapters, is_adapter
from longtune.parallel.load import load_parallel_model
from longtune.parallel.parallelize import is_fsdp_sharded, parallelize
from longtune.run_dir import RunDir, read_metrics, rewrite_metrics
from longtune.train.config import (
    ConfigError,
    Duration,
    JobConfig,
    flat_settings,
    lora_spec,
    resolve_grad_accum,
    save_config,
)
from longtune.train.keeper import RunKeeper
from longtune.train.metrics import MetricsWriter, ProgressLine, setup_logging
from longtune.train.preflight import Checked
from longtune.train.result import RunResult, StepOutOfMemory, TrainingDivergedError
from longtune.train.schedule import build_lr_scheduler
from longtune.train.signals import RunCancelled, StopSignals, signal_name
from longtune.train.state import TrainState

logger = logging.getLogger("longtune.train")


class Trainer:
    """One rank's part of a run. Call :meth:`build`, :meth:`resume`, :meth:`train`,
    :meth:`finish` in this order (what :func:`~longtune.train.run.run_training` does).

    Args:
        cfg: the validated config.
        checked: what the preflight established (layout, model arguments, compute dtype).
        rank: this process's global rank.
        device: this rank's device.
        stop: the installed SIGTERM/SIGINT handling.
        keeper: the run folder's lock and status (acts on global rank 0 only).
        fault: test hook, called as ``fault(step, loss_sum)`` and returning the loss sum to use
            (used to inject a NaN).
    """

    def __init__(
        self,
        cfg: JobConfig,
        checked: Checked,
        rank: int,
        device: torch.device,
        *,
        stop: StopSignals,
        keeper: RunKeeper,
        fault: Any = None,
    ) -> None:
        self.cfg, self.rank, self.device = cfg, rank, device
        self.dims, self.args = checked.dims, checked.args
        self.compute_dtype = checked.compute_dtype
        self.plan = checked.plan
        """The memory plan of the preflight (resolved levers, predicted peak per rank)."""
        self._predicted_peak_gb = self.plan.record().get("predicted_peak_gb")
        self.lora = lora_spec(cfg)
        """The adapters of a LoRA run (None: full fine-tuning)."""
        self.world = self.dims.world_size
        self.dp_rank, self.sp_rank = self.dims.coords(rank)
        self.run = RunDir(cfg.output.dir)
        self.stop, self.keeper, self.fault = stop, keeper, fault
        self.mbs = cfg.train.micro_batch_size
        self.accum = resolve_grad_accum(cfg, self.dims.dp)
        self.state = TrainState(
            rank=rank,
            batch_sequences=self.mbs * self.accum * self.dims.dp,
            data_files=checked.data_files,
        )
        self.resume_from = checked.resume_from
        """The checkpoint this run resumes from (``checkpoint.resume=auto``: found in build)."""
        # Built by build(): data, then model, optimizer and schedule, then the checkpointer.
        self.loader: PackedLoader | None = None
        self.eval_loader: PackedLoader | None = None
        self.total_steps = 0
        self.steps_per_epoch = 0.0
        self.model: Transformer | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
        self.checkpointer: Checkpointer | None = None
        # Opened by resume().
        self.metrics: MetricsWriter | None = None
        self.progress: ProgressLine | None = None
        # The loop's bookkeeping.
        self.stopping = False
        """Every rank agreed to stop (a SIGTERM/SIGINT reached one of them)."""
        self.last_checkpoint: Path | None = None
        self.evaluated_step = -1

    # ---- build: data, then model -> parallelize -> optimizer ------------------------------

    def build(self) -> None:
        """Logging into the run folder (rank 0 created it), then data, model and optimizer."""
        dist.barrier()
        setup_logging(self.run, self.rank)
        torch.manual_seed(self.cfg.train.seed)
        self._log_plan()
        self.build_data()
        if self.cfg.checkpoint.resume == "auto":
            self.resume_from = self._agreed_latest_checkpoint()
        if self.resume_from is not None:
            # Refused here, before any weight is read, when the data position cannot carry
            # over exactly to this layout (the loader names both layouts).
            states = read_rank_states(self.resume_from, self.rank, require=("data",))
            self.loader.resume_position(states["data"])
        self.build_model()
        self.build_optimizer()
        states = {"train": self.state, "data": self.loader, "schedule": self.scheduler}
        if self.lora is not None:  # what the adapters are for: checked on resume and export
            states["lora"] = LoraRecord(self.lora, self.cfg.model.path)
        self.checkpointer = Checkpointer(
            self.run.checkpoints,
            keep_last=self.cfg.checkpoint.keep_last,
            model=self.model,
            optimizer=self.optimizer,
            states=states,
        )

    def _log_plan(self) -> None:
        plan = self.plan.record()
        if not plan["checked"]:
            logger.info("memory plan: not checked (train.plan_check=false)")
            return
        logger.info(
            "memory plan: %s, predicted peak %.3g GiB per rank of %.3g GiB (at %s); "
            "activation checkpointing %s, tiled MLP %s, activation offload %s",
            plan["layout"],
            plan["predicted_peak_gb"],
            plan["device_memory_gb"],
            plan["peak_segment"],
            plan["ac"],
            "on" if plan["tiled_mlp"] else "off",
            f"on ({plan['predicted_host_gb']:.3g} GiB of host memory)"
            if plan["offload"]
            else "off",
        )

    def _agreed_latest_checkpoint(self) -> Path | None:
        """The newest complete checkpoint as rank 0 sees it (every rank follows its choice).

        Damaged ones are named in the log; when every one is damaged, one line says that the
        run starts over from step 0.
        """
        found: list[str | None] = [None]
        if self.rank == 0:
            skipped: list[tuple[Path, str]] = []
            latest = find_latest_checkpoint(self.run.checkpoints, skipped)
            found = [str(latest or "")]
            if latest is None and skipped:
                damaged = "; ".join(f"{path.name}: {why}" for path, why in skipped[:3])
                logger.warning(
                    "no usable checkpoint in %s: every one is incomplete or damaged (%s%s); "
                    "starting the run over from step 0",
                    self.run.checkpoints,
                    damaged,
                    "; ..." if len(skipped) > 3 else "",
                )
            for path, why in skipped if latest is not None else ():
                logger.warning("skipping incomplete or corrupted checkpoint %s: %s", path, why)
        dist.broadcast_object_list(found, src=0)
        return Path(found[0]) if found[0] else None

    def build_data(self) -> None:
        """Tokenize and pack (rank 0 first: it fills the cache the others read), the loaders,
        and the run's length in optimizer steps."""
        cfg = self.cfg
        files = len(self.state.data_files)
        size_mb = sum(data_size(f) for f in self.state.data_files) / 2**20
        logger.info(
            "tokenizing and packing %d data file(s), %.1f MB, with %s's tokenizer (cached: a "
            "rerun with the same data and tokenizer reads the tokens back)",
            files,
            size_mb,
            cfg.model.path,
        )
        datasets: dict[str, PackedDataset | MixedDataset | None] = {}
        for turn in (0, 1):
            if (self.rank == 0) == (turn == 0):
                datasets["train"] = self._train_dataset()
                datasets["eval"] = self._dataset(cfg.data.eval) if cfg.data.eval else None
            dist.barrier()
        per_micro_step = self.mbs * self.dims.dp
        if len(datasets["train"]) < per_micro_step:
            raise ConfigError(
                f"train.micro_batch_size={self.mbs} on {self.dims.dp} data-parallel rank(s) takes "
                f"{per_micro_step} packed sequences per micro-step, but the training data packs "
                f"into {len(datasets['train'])} sequences of {cfg.data.context_length} tokens; "
                "lower train.micro_batch_size or add data (a micro-batch never repeats a "
                "sequence to fill itself)"
            )
        self.loader = self._loader(datasets["train"])
        self.eval_loader = self._loader(datasets["eval"]) if datasets["eval"] else None
        logger.info("training data: %s", overlength_summary(datasets["train"].stats))
        if isinstance(datasets["train"], MixedDataset):
            logger.info("data mixture: %s", datasets["train"].describe())
        self.total_steps = total_optimizer_steps(cfg.train.duration, len(self.loader), self.accum)
        self.steps_per_epoch = len(self.loader) / self.accum
        if cfg.optim.warmup_steps > self.total_steps:
            raise ConfigError(
                f"optim.warmup_steps={cfg.optim.warmup_steps} is longer than the run "
                f"({self.total_steps} optimizer steps for train.duration={cfg.train.duration}); "
                "lower it or train longer"
            )

    def _train_dataset(self) -> PackedDataset | MixedDataset:
        """The training data: packed together, or each entry on its own and mixed by
        ``data.mix``."""
        d = self.cfg.data
        if not d.mix:
            return self._dataset(d.train)
        return MixedDataset([self._dataset([p]) for p in d.train], d.mix, d.train)

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
            data_format=d.format,
            columns=d.columns,
            tokenize_processes=d.tokenize_processes,
        )

    def _loader(self, dataset: PackedDataset | MixedDataset) -> PackedLoader:
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
        """Build on the meta device, shard, then fill each rank's shards from the checkpoint.

        Every rank reads only the rows of each tensor that its shard owns
        (:func:`~longtune.parallel.load.load_parallel_model`), so no rank ever holds the whole
        model; ranks that do not all see the checkpoint's files fall back to rank 0 reading it
        and broadcasting the shards.
        """
        cfg, device = self.cfg, self.device
        if self.rank == 0 and not HFSource.saved_in(self.run.source):
            read_hf_source(cfg.model.path)[1].save(self.run.source)
        with torch.device("meta"):
            model = Transformer(self.args)
            if self.lora is not None:  # adapters in float32; the frozen base in compute dtype
                add_lora(model, self.lora)
                freeze_base_dtype(model, self.compute_dtype)
        parallelize(
            model,
            self.dims.build_mesh(device.type),
            self.plan.ac,  # the setting, or what the memory planner chose for auto
            param_dtype=None if self.compute_dtype == torch.float32 else self.compute_dtype,
            compile=cfg.train.compile == "true"
            or (cfg.train.compile == "auto" and device.type == "cuda"),
            keep_exchanges=cfg.parallel.keep_exchanges,
            tiled_mlp=self.plan.tiled_mlp,
            cpu_offload=cfg.parallel.cpu_offload,
            offload_activations=self.plan.offload,
        )
        model.to_empty(device=device)
        if not is_fsdp_sharded(model):
            model.tie_weights()  # to_empty gives each module its own tensor; FSDP keeps ties
        if self.args.tie_embeddings and model.output.weight is not model.tok_embeddings.weight:
            raise RuntimeError("tied embeddings were untied while sharding the model")
        load_parallel_model(model, cfg.model.path)  # fp32 master weights: the params' dtype
        model.init_buffers(device=device)
        model.train()
        self.model = model
        if self.lora is not None:
            self._init_adapters()

    def _init_adapters(self) -> None:
        """PEFT's initial adapters (A Kaiming-uniform, B zero), the same values on every rank
        and layout for a seed; a resume then overwrites them."""
        trainable = get_model_state_dict(
            self.model, options=StateDictOptions(ignore_frozen_params=True)
        )
        values = init_adapters(
            {n: t for n, t in trainable.items() if is_adapter(n)}, self.cfg.train.seed
        )
        n = sum(v.numel() for v in values.values())
        set_model_state_dict(  # (fills the dict it is given with the model's other tensors)
            self.model, dict(values), options=StateDictOptions(full_state_dict=True, strict=False)
        )
        logger.info(
            "LoRA rank %d (scale %.4g) on %s: %d adapter parameters (%.3f%% of the model) in "
            "float32, the frozen base in %s%s",
            self.lora.rank,
            self.lora.scale,
            ",".join(self.lora.targets),
            n,
            100 * n / self.args.num_params(),
            _stored_dtypes(self.model, frozen=True),
            "; embeddings and output trained in full" if self.lora.train_embeddings else "",
        )

    def build_optimizer(self) -> None:
        """AdamW (fused: one kernel per parameter and no optimizer-wide temporaries, on CPU
        and GPU) and the warmup + decay schedule."""
        opt = self.cfg.optim
        self.optimizer = torch.optim.AdamW(
            [p for p in self.model.parameters() if p.requires_grad],  # LoRA: adapters only
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
        cfg, rank, ckpt = self.cfg, self.rank, self.resume_from
        if ckpt is not None:
            self.checkpointer.load(ckpt)
            self.last_checkpoint = ckpt
            logger.info("resumed from %s at step %d", ckpt, self.state.step)
        self.keeper.progress(self.state.step, self.total_steps)
        if rank == 0:
            # A fresh start drops every earlier record, the step-0 eval included; a resume the
            # records it will write again: those past its step, and the final eval.
            last = self.state.step if ckpt is not None else -1
            rewrite_metrics(self.run, lambda rec: _kept_on_resume(rec, last, self.total_steps))
            save_config(cfg, self.run.config)
        dist.barrier()
        self.metrics = MetricsWriter(
            self.run, rank, tensorboard=cfg.output.tensorboard, mlflow=cfg.output.mlflow
        )
        if rank == 0 and ckpt is None:
            params = flat_settings(cfg)
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
        state = self.state
        if state.step == 0 or state.eval_pending:
            self.log_eval(state.step)
            state.eval_pending = False  # done: later checkpoints must not ask for it again
        state.segment_start = time.monotonic()
        self.progress.start(state.step)
        with self.stop.deferred():
            while state.step < self.total_steps:
                try:
                    record = self.train_step()
                except (torch.OutOfMemoryError, MemoryError) as e:
                    raise StepOutOfMemory(self._oom_message(e)) from None
                if record is None:  # asked to stop before this step began
                    break
                self.metrics.log(state.step, record)
                self.progress.update(state.step, record["loss"], record["tokens"], lr=record["lr"])
                self.keeper.progress(state.step)
                if self.stopping:
                    break
                if self._eval_due():
                    self.log_eval(state.step)
                every = self.cfg.checkpoint.every
                if state.step == self.total_steps or (every > 0 and state.step % every == 0):
                    self.save()
            if not self.stopping:  # a signal during the last checkpoint: agree once more
                self.stopping = self._all_reduce_sum([self._stop_flag()])[0] > 0
            if self.stopping:
                self.cancel()
        self.log_eval(state.step)

    def _eval_due(self) -> bool:
        """An eval is due after the current step (``train.eval_every``; the last step's eval
        comes after the loop)."""
        every, step = self.cfg.train.eval_every, self.state.step
        return every > 0 and step % every == 0 and step < self.total_steps

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
                part = self.fault(self.state.step + 1, part)
            (part * scale).backward()
            loss_sum += float(part.detach())
        loss_sum, stop = self._all_reduce_sum([loss_sum, self._stop_flag()])
        self.stopping = stop > 0
        loss = loss_sum / max(global_count, 1.0)
        grad_norm = self._clip_gradients()
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            self._diverged(loss, grad_norm, batches)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        step_tokens = self.accum * self.mbs * self.cfg.data.context_length * self.dims.dp
        self.state.step += 1
        self.state.tokens_seen += step_tokens
        return {
            "kind": "train",
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": step_tokens,
            "supervised_tokens": int(global_count),
            "tokens_seen": self.state.tokens_seen,
            "tokens_per_s": step_tokens / (time.monotonic() - t0),
            "peak_memory_gb": _peak_memory_gb(self.device),
            "predicted_peak_gb": self._predicted_peak_gb,
            "elapsed_s": self.state.elapsed_s,
            "epoch": batches[-1]["epoch"],
        }

    def _oom_message(self, exc: BaseException) -> str:
        """One line for a step that ran out of memory: where, how much, what to change."""
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        planned = self._predicted_peak_gb
        plan = f", planned {planned:.2f} GiB" if planned is not None else ""
        offload = " --model.offload_activations=true" if self.device.type == "cuda" else ""
        return (
            f"out of memory in step {self.state.step + 1} ({self.cfg.data.context_length} tokens "
            f"per sequence, {self.mbs} per micro-batch; measured peak "
            f"{_peak_memory_gb(self.device):.2f} GiB{plan}; {first}); the newest complete "
            f"checkpoint is intact ({self.last_checkpoint or 'none yet'}). Try "
            f"--model.activation_checkpointing=full --model.tiled_mlp=true{offload}, more sequence "
            "parallelism (parallel.sp), or a shorter data.context_length; `longtune plan` lists "
            "the layouts that fit"
        )

    def _clip_gradients(self) -> float:
        """Clip the global gradient norm to ``optim.grad_clip`` (0: no clipping); returns it."""
        clip = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else float("inf")
        params = [p for p in self.model.parameters() if p.requires_grad]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        return float(grad_norm)

    def _diverged(self, loss: float, grad_norm: float, batches: list[dict[str, Any]]) -> None:
        samples: list[Any] = [None] * self.world
        dist.all_gather_object(samples, [s for b in batches for s in b["sample_ids"]])
        raise TrainingDivergedError(
            f"non-finite loss {loss} / grad norm {grad_norm} at step {self.state.step + 1} "
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
            attention=self.cfg.model.attention,
        )

    def evaluate(self) -> dict[str, float] | None:
        """Loss over the eval set (each packed sequence scored once), or None without one."""
        if self.eval_loader is None:
            return None
        self.model.eval()
        n = self._eval_batches()
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

    def _eval_batches(self) -> int:
        """Micro-batches per evaluation: the eval set, or ``train.eval_batches`` of it."""
        n = len(self.eval_loader)
        return min(n, self.cfg.train.eval_batches) if self.cfg.train.eval_batches > 0 else n

    def log_eval(self, at: int) -> None:
        """Evaluate and record the result at step ``at``."""
        if self.eval_loader is not None:
            logger.info(
                "evaluating at step %d: %d micro-batch(es) of %d x %d tokens per rank, forward "
                "passes only",
                at,
                self._eval_batches(),
                self.mbs,
                self.cfg.data.context_length,
            )
        result = self.evaluate()
        self.evaluated_step = at
        if result is not None:
            self.metrics.log(at, {"kind": "eval", **result})
            logger.info(
                "eval at step %d: loss %.4f, ppl %.2f", at, result["eval_loss"], result["eval_ppl"]
            )

    def save(self) -> Path:
        """Write the checkpoint of the current step (collective); returns its folder."""
        self.last_checkpoint = self.checkpointer.save(self.state.step)
        return self.last_checkpoint

    def cancel(self) -> NoReturn:
        """Stop on every rank after the agreed step: checkpoint it (unless it just was), say
        so in one line, raise :class:`RunCancelled`."""
        step = self.state.step
        saved = self.last_checkpoint is not None and self.last_checkpoint.name == f"step-{step}"
        self.state.eval_pending = self._eval_due() and self.evaluated_step != step
        if step > 0 and not saved:
            self.save()
        signum = self.stop.signum or signal.SIGTERM
        where = f"after step {step} of {self.total_steps}"
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
        """Close the process group, then export and check ``hf/`` (rank 0) from the last
        checkpoint, which holds the final weights (the last step always writes one).

        The export streams the checkpoint from disk one tensor at a time: no process ever holds
        the whole model, and rank 0 exports alone after the group is closed, so a long export
        of a large model cannot trip a collective's timeout on the other ranks.
        """
        final = self.last_checkpoint
        if final is None or final.name != f"step-{self.state.step}":
            raise RuntimeError(f"no checkpoint of the final step {self.state.step} to export")
        dist.barrier()
        dist.destroy_process_group()
        result = RunResult(status="succeeded", run_dir=self.run.path, final_step=self.state.step)
        if self.rank == 0:
            source = HFSource.load(self.run.source)
            trained = CheckpointTensors(final)
            if self.lora is not None and self.cfg.export.lora_adapter:
                info = write_peft_adapter(
                    trained, self.lora, self.args, _abs(self.cfg.model.path), self.run.adapter, True
                )
                logger.info(
                    "exported %s (PEFT adapter, %d tensors)", self.run.adapter, info["tensors"]
                )
            check = export_and_check(
                trained
                if self.lora is None
                else MergedTensors(trained, self.cfg.model.path, self.args, self.lora),
                self.args,
                source,
                self.run.export,
                self.run.export_check,
                overwrite=True,
                max_shard_bytes=_gb_to_bytes(self.cfg.export.max_shard_gb),
            )
            result.export_dir, result.export_check = self.run.export, check
            logger.info("exported %s (self-check: %s)", self.run.export, check)
            if "gguf" in self.cfg.export.formats:
                export_gguf(self.run.export, self.run.gguf, self.cfg.export.gguf_type, True)
                logger.info("exported %s (%s)", self.run.gguf, self.cfg.export.gguf_type)
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


def _stored_dtypes(model: torch.nn.Module, frozen: bool) -> str:
    """The dtypes the (frozen or trainable) parameters are stored in, as in the log."""
    found = {str(p.dtype) for p in model.parameters() if p.requires_grad != frozen}
    return ",".join(sorted(found))


def _abs(path: str) -> str:
    return str(Path(path).resolve())


def _gb_to_bytes(gb: float | None) -> int | None:
    return None if gb is None else int(gb * 1e9)


def _peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def _kept_on_resume(record: dict[str, Any], last_step: int, total_steps: int) -> bool:
    """A metrics record that a run resuming at ``last_step`` will not write again: not past
    it, and not the final eval (which follows the last checkpoint)."""
    if record["step"] > last_step:
        return False
    return not (record.get("kind") == "eval" and record["step"] == total_steps and last_step > 0)


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
