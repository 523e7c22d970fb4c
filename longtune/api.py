"""The Python API of a fine-tuning run: :func:`finetune` and its :class:`RunResult`.

``finetune`` builds the run's :class:`~longtune.train.config.JobConfig` from typed values (the
same checks as the ``longtune train`` command line) and runs it in this process. A run that
stopped on a NaN loss or on SIGTERM / SIGINT comes back as a result with that status; bad
settings or data raise before anything starts.

Importing this module is cheap (no torch): the trainer is imported when a run starts.
"""

from __future__ import annotations

from typing import Any

from longtune.run_dir import RunDir, read_metrics
from longtune.train.config import config_from_values
from longtune.train.result import RunResult, TrainingDivergedError, end_of_run
from longtune.train.signals import RunCancelled

__all__ = ["RunResult", "finetune"]


def finetune(
    model: str,
    train_data: str | list[str],
    task_type: str | None = None,
    context_length: int | None = None,
    duration: str | None = None,
    learning_rate: float | None = None,
    output_dir: str | None = None,
    eval_data: str | list[str] | None = None,
    config: str | None = None,
    **more: Any,
) -> RunResult:
    """Fine-tune ``model`` on ``train_data`` and export a Hugging Face checkpoint.

    Arguments left at None take the config file's value, else the default of ``longtune train``.

    Args:
        model: HF checkpoint folder of a Llama-family model.
        train_data: JSONL / text file(s) or folder(s).
        task_type: chat (default), instruction or text.
        context_length: tokens per packed sequence (default 8192).
        duration: ``3ep`` (epochs) or ``500st`` (optimizer steps); default ``1ep``.
        learning_rate: peak learning rate (default 1e-5).
        output_dir: run folder (``config.yaml``, ``metrics.jsonl``, ``checkpoints/``, ``hf/``);
            default ``runs/longtune``.
        eval_data: optional held-out data, evaluated at start, every ``eval_every`` steps
            and at the end.
        config: optional YAML file; the arguments here override it.
        **more: any other setting as ``section__key=value`` or ``**{"section.key": value}``
            (e.g. ``train__grad_accum=4``, ``optim__warmup_steps=10``), as Python values; a
            group's as ``section__group__key`` (``model__lora__rank=16`` for LoRA adapters).

    Returns:
        The run's :class:`RunResult` (status, metrics, export path, export self-check); a run
        stopped by a NaN/Inf loss comes back with ``status="failed"`` and the reason in
        ``error``, one stopped by SIGTERM / SIGINT with ``status="cancelled"``.

    Raises:
        ConfigError, DataValidationError, FileNotFoundError: bad settings or data, found
            before anything was started.
    """
    given = {
        "model.path": model,
        "data.train": train_data,
        "data.task_type": task_type,
        "data.context_length": context_length,
        "train.duration": duration,
        "optim.lr": learning_rate,
        "output.dir": output_dir,
        "data.eval": eval_data,
    }
    values = {key: value for key, value in given.items() if value is not None}
    values.update({key.replace("__", "."): value for key, value in more.items()})
    cfg = config_from_values(values, config)
    # The trainer (torch, transformers) is imported only when a run starts.
    from longtune.train.run import run_training

    try:
        return run_training(cfg)
    except (TrainingDivergedError, RunCancelled) as e:
        # The run started and stopped on a NaN or a signal: report it like a finished run, with
        # the state its status.json records.
        run = RunDir(cfg.output.dir)
        metrics = read_metrics(run)
        steps = [m["step"] for m in metrics if m.get("kind") == "train"]
        return RunResult(
            status=end_of_run(e)[0],
            run_dir=run.path,
            final_step=max(steps, default=0),
            metrics=metrics,
            error=str(e),
        )
