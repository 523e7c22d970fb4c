"""The ``longtune`` command: subcommands mapped to typed functions.

Each subcommand runs a plain function (its docstring's first line is the command's help, unless
given), a library function named ``"module:function"`` being imported only when the command
runs; its arguments, with their help and defaults, are declared with ``argparse`` in
:func:`build_parser`, the one place they are described. ``train`` takes a YAML file plus ``--section.key=value``
overrides: its parser, and its ``--help`` listing every setting, come from
``longtune.train.config``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from longtune.run_dir import RunLockedError
from longtune.train.config import flag_parser, load_config
from longtune.train.keeper import RunKeeper
from longtune.train.signals import RunCancelled, StopSignals


def convert(hf_dir: str, native_dir: str, overwrite: bool = False) -> int:
    """Convert an HF Llama checkpoint folder into longtune's native (fused) format."""
    from longtune.model.convert import convert_hf_to_native

    out = convert_hf_to_native(hf_dir, native_dir, overwrite=overwrite)
    print(f"wrote native checkpoint {out}")
    return 0


def export(
    source: str,
    out: str,
    dtype: str | None = None,
    overwrite: bool = False,
    format: str = "hf",
    gguf_type: str | None = None,
    max_shard_gb: str | None = None,
    base: str | None = None,
    adapter_dir: str | None = None,
) -> int:
    """Export a checkpoint or native folder as a Hugging Face folder, or a model as a GGUF file.

    A LoRA run's checkpoint gives the merged model in OUT and the PEFT adapter folder in
    --adapter-dir (default OUT-adapter); --base names its base model folder if it moved."""
    from longtune.export.command import export as export_model

    shard_bytes = None
    if max_shard_gb is not None:
        gb = _number(max_shard_gb)
        if gb is None or not 0 < gb < 1e6:
            raise ValueError(
                f"--max-shard-gb {max_shard_gb!r} is invalid; give the largest file in GB, above "
                "0 (e.g. 5)"
            )
        shard_bytes = int(gb * 1e9)
    written = export_model(
        source,
        out,
        dtype=dtype,
        overwrite=overwrite,
        format=format,
        gguf_type=gguf_type,
        max_shard_bytes=shard_bytes,
        base=base,
        adapter_dir=adapter_dir,
    )
    print(f"wrote {'GGUF file' if format == 'gguf' else 'Hugging Face checkpoint'} {written}")
    return 0


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def runs_list(runs_dir: str = "runs", json: bool = False) -> int:
    """List the runs of a runs folder: status, progress, losses, start, wall and training time."""
    from longtune import runs

    found = runs.list(runs_dir)
    if json:
        import json as json_module

        print(json_module.dumps([r.to_json() for r in found], indent=1))
    else:
        print(runs.format_table(found) if found else f"no runs in {runs_dir}")
    return 0


def runs_show(name: str, runs_dir: str = "runs", json: bool = False) -> int:
    """Show one run: status (and why it failed), progress, losses, processes, export and check."""
    from longtune import runs

    info = runs.get(name, runs_dir)
    if json:
        import json as json_module

        print(json_module.dumps(info.to_json(), indent=1))
    else:
        print(runs.format_details(info))
    return 0


def runs_cancel(name: str, runs_dir: str = "runs", now: bool = False) -> int:
    """Stop a running run: SIGTERM to its process group; it checkpoints and ends `cancelled`."""
    from longtune import runs

    info = runs.cancel(name, runs_dir, now=now)
    if now:
        print(f"sent SIGQUIT to run {info.name}; it stops at once (now: {info.status})")
    else:
        print(
            f"sent SIGTERM to run {info.name}; it finishes its step, writes a checkpoint and "
            f"ends with status cancelled (now: {info.status})"
        )
    return 0


def runs_resume(name: str, runs_dir: str = "runs", nproc: int | None = None) -> int:
    """Start a cancelled or failed run again in its folder, from its newest checkpoint."""
    from longtune import runs

    info = runs.resume(name, runs_dir, nproc=nproc)
    print(f"restarted run {info.name} (pid {info.pid}); its output goes to {info.path}/launch.log")
    return 0


def runs_delete(name: str, runs_dir: str = "runs") -> int:
    """Delete a run that is not running: its folder, checkpoints and export included."""
    from longtune import runs

    info = runs.delete(name, runs_dir)
    print(f"deleted run {info.name} ({info.path})")
    return 0


def train(argv: list[str]) -> int:
    """``longtune train``: parse, validate, run. Returns the exit code.

    Exit codes: 0 done; 1 another rank died or stopped answering, or anything unexpected; 2 bad
    settings or data, or the output folder is in use by another run (one line on stderr,
    nothing started); 3 stopped on a NaN/Inf loss; 130 / 143 stopped by SIGINT / SIGTERM (in
    the loop: after the current step and a checkpoint).

    Args:
        argv: the arguments after ``train``.
    """
    if any(a in ("-h", "--help") for a in argv):
        flag_parser(
            "Fine-tune a Llama-family model. Settings come from defaults, then CONFIG.yaml, then "
            "flags (flags win). Run under torchrun for several processes (gloo on CPU, NCCL on GPU)."
        ).print_help()
        return 0
    # Installed first, so a Ctrl-C while torch is being imported ends without a traceback too.
    try:
        with StopSignals() as stop:
            try:
                return _train(argv, stop)
            except Exception:
                if stop.requested:  # e.g. an import interrupted half-way
                    raise stop.cancelled() from None
                raise
    except RunCancelled as e:
        if not e.logged and _reports():
            print(f"longtune train: {e}", file=sys.stderr)
        return e.exit_code


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


REFUSAL_GRACE_S = 10.0
"""How long a rank other than 0 waits after refusing a run before it exits: torchrun stops the
job's other processes when the first one exits, and rank 0, refusing the same a moment later,
must still be there to say why."""


def _reports() -> bool:
    """Whether this process says why a run did not start or stopped: global rank 0 does, the
    other ranks of a job (the same refusal, or torchrun stopping them after it) exit quietly
    with the same code."""
    return os.environ.get("RANK", "0") == "0"


def _train(argv: list[str], stop: StopSignals) -> int:
    path = argv[0] if argv and not argv[0].startswith("-") else None
    overrides = argv[1:] if path else argv
    try:
        cfg = load_config(path, overrides)
        keeper = RunKeeper.of(cfg.output.dir)
        keeper.claim_existing()  # a folder another run writes into: refused before torch loads
        # torch and the trainer are imported only once the config is known to be good.
        from longtune.parallel.dims import PeerLostError
        from longtune.train.result import StepOutOfMemory, TrainingDivergedError, failure_reason
        from longtune.train.run import run_training

        try:
            result = run_training(cfg, stop=stop, keeper=keeper)
        except TrainingDivergedError as e:
            print(f"longtune train: stopped: {e}", file=sys.stderr)
            return 3
        except PeerLostError as e:
            print(f"longtune train: stopped: {e}", file=sys.stderr)
            return 1
        except (MemoryError, RuntimeError) as e:
            if failure_reason(e) != "oom":
                raise
            if isinstance(e, StepOutOfMemory):  # says where, how much and what to change
                print(f"longtune train: stopped: {_first_line(e)}", file=sys.stderr)
                return 1
            print(
                f"longtune train: stopped: out of memory ({_first_line(e)}); the newest complete "
                "checkpoint is intact: lower data.context_length or train.micro_batch_size, or "
                "spread the sequence over more ranks (parallel.sp)",
                file=sys.stderr,
            )
            return 1
        finally:
            keeper.release()
    except (ValueError, FileNotFoundError, NotImplementedError, RunLockedError) as e:
        # ConfigError, DataValidationError, ParallelConfigError, UnsupportedModelError, ...
        if _reports():
            print(f"longtune train: error: {e}", file=sys.stderr)
        else:  # rank 0 refuses the same: give it the time to say why before torchrun stops it
            time.sleep(REFUSAL_GRACE_S)
        return 2
    except OSError as e:  # disk full, read-only folder, ...: the folder and the cause
        from longtune.fsutil import describe_os_error

        print(f"longtune train: error: {describe_os_error(e, 'run files')}", file=sys.stderr)
        return 2
    if result.export_dir is not None:
        print(f"done: {result.final_step} steps; Hugging Face checkpoint in {result.export_dir}")
    return 0


def _command(
    sub: Any, name: str, fn: Callable[..., int] | str, summary: str = "", **kw: Any
) -> argparse.ArgumentParser:
    """The subcommand ``name``, running ``fn`` (or ``"module:function"``, imported when the
    command runs, so ``--help`` stays light); the help is ``summary`` or the first line of
    ``fn``'s docstring."""
    summary = summary or str(getattr(fn, "__doc__", "")).splitlines()[0]
    parser = sub.add_parser(name, help=summary, description=summary, **kw)
    parser.set_defaults(_fn=fn)
    return parser


def build_parser() -> argparse.ArgumentParser:
    """Every subcommand but ``train`` (which parses its own flags) and its arguments.

    Returns:
        The parser; its namespace holds the command function (``_fn``) and its keyword arguments.
    """
    parser = argparse.ArgumentParser(
        prog="longtune",
        description="Long-context fine-tuning of Llama-family models: HF checkpoint in, HF checkpoint out.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_model_commands(sub)
    _add_data_commands(sub)
    _add_run_commands(sub)
    _add_plan_command(sub)
    sub.add_parser(
        "train",
        help="Fine-tune a model (YAML config + --section.key=value overrides; see `longtune train --help`).",
        add_help=False,
    )
    return parser


_DEFAULT = " (default: %(default)s)"  # argparse writes the default in
_RUNS_DIR = "the folder holding the run folders." + _DEFAULT


def _add_plan_command(sub: Any) -> None:
    """``plan``."""
    p = _command(
        sub,
        "plan",
        "longtune.plan.command:run",
        "Predict, before any run, the peak memory per rank and the speed of each layout (SP, "
        "activation checkpointing, tiled MLP, offload, micro-batch), by tracing the real "
        "training step on fake tensors.",
        epilog="Presets: smollm2-135m, llama-3.2-1b, llama-3.2-3b, llama-3.1-8b, llama-3.1-70b, "
        "llama-3.1-405b. Devices: h100-80, h200-141, a100-80, a100-40, l40s-48, cpu. "
        "Method and accuracy: docs/planner.md.",
    )
    p.add_argument("model", help="a preset name or a model folder (only config.json is read).")
    p.add_argument("--context", type=int, default=8192, help="tokens per sequence." + _DEFAULT)
    p.add_argument("--nodes", type=int, default=1, help="nodes." + _DEFAULT)
    p.add_argument("--gpus-per-node", type=int, default=1, help="GPUs per node." + _DEFAULT)
    p.add_argument("--device", default="h100-80", help="device preset." + _DEFAULT)
    p.add_argument("--device-memory", help="memory per device instead of the preset's, e.g. 80GB.")
    p.add_argument(
        "--host-memory",
        help="host memory of one node, shared by its GPUs, instead of the preset's (2 TB on "
        "H100/H200 and A100-80 servers), e.g. 1TB; 0: not checked. The offloads must fit in it.",
    )
    p.add_argument("--dtype", default="bfloat16", help="bfloat16 or float32." + _DEFAULT)
    p.add_argument("--lora-rank", type=int, default=0, help="LoRA rank (0: full fine-tuning).")
    p.add_argument("--sp", type=int, help="hold the SP degree fixed.")
    p.add_argument("--ac", help="hold activation checkpointing fixed: none, selective or full.")
    p.add_argument("--tiled-mlp", choices=("true", "false"), help="hold tiled MLP fixed.")
    p.add_argument("--micro-batch", type=int, help="hold the micro-batch fixed.")
    p.add_argument(
        "--cpu-offload",
        choices=("true", "false"),
        help="hold FSDP2's CPU offload (parallel.cpu_offload) fixed; by default it is weighed "
        "on CUDA when nothing fits without it.",
    )
    p.add_argument(
        "--longest",
        dest="find_longest",
        action="store_true",
        help="the longest context that fits, per checkpointing mode (largest SP, tiled MLP, "
        "activation offload on CUDA), and with FSDP2's CPU offload too on CUDA.",
    )
    p.add_argument("--json", dest="as_json", action="store_true", help="print JSON.")


def _add_model_commands(sub: Any) -> None:
    """``convert`` and ``export``."""
    replace = (
        "replace {} if it is an earlier longtune output (never a folder longtune did not write)."
    )
    p = _command(sub, "convert", convert)
    p.add_argument("hf_dir", help="Hugging Face checkpoint folder (config.json + safetensors).")
    p.add_argument(
        "native_dir",
        help="output folder (fused safetensors + longtune.json + hf/ metadata); must be new or empty.",
    )
    p.add_argument("--overwrite", action="store_true", help=replace.format("native_dir"))

    p = _command(
        sub,
        "export",
        export,
        epilog="GGUF (llama.cpp, Ollama): `longtune export RUN/hf model.gguf --format gguf` converts "
        "an HF folder as it is; from a checkpoint or native folder the HF export is made first in a "
        "temporary folder beside OUT, then removed. --gguf-type: auto keeps the weights' own type "
        "(f32, bf16 or f16), f32, f16, bf16, or q8_0 (8-bit, about half of f16's size); norms stay "
        "f32. Needs a byte-level BPE tokenizer (Llama 3, SmolLM2).",
    )
    p.add_argument(
        "source",
        help="a folder written by `longtune convert`, RUN_DIR/checkpoints/step-N, or (with "
        "--format gguf) a Hugging Face folder such as RUN_DIR/hf.",
    )
    p.add_argument(
        "out",
        help="output: an HF folder (safetensors, config.json, tokenizer files; must be new or "
        "empty), or with --format gguf the .gguf file to write (must not exist).",
    )
    p.add_argument(
        "--format",
        default="hf",
        help="hf (a Hugging Face folder) or gguf (one file for llama.cpp / Ollama)." + _DEFAULT,
    )
    p.add_argument(
        "--dtype",
        help="hf: write tensors in this dtype (float32, bfloat16, float16); default: as the source."
        + _DEFAULT,
    )
    p.add_argument(
        "--max-shard-gb",
        help="hf: safetensors files of at most this many GB (10^9 bytes), with an index; "
        "default: the files of the source model.",
    )
    p.add_argument(
        "--base",
        help="a LoRA run's checkpoint: the base model folder its adapters were trained on, if it "
        "moved (checked against the one the checkpoint names); default: that one.",
    )
    p.add_argument(
        "--adapter-dir",
        help="a LoRA run's checkpoint: where the PEFT adapter folder goes (OUT is the merged "
        "model); default: OUT-adapter.",
    )
    p.add_argument(
        "--gguf-type",
        help="gguf: auto, f32, f16, bf16 or q8_0; auto keeps the weights' own float type (default: "
        "auto).",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help=replace.format("out") + " With --format gguf: replace an existing GGUF file.",
    )


def _add_data_commands(sub: Any) -> None:
    """``validate`` and ``demo``."""
    d = _DEFAULT
    p = _command(
        sub,
        "validate",
        "longtune.data:validate_command",
        "Check training data and print per-file statistics; exit non-zero on invalid data.",
    )
    p.add_argument(
        "data",
        nargs="+",
        help="data files (JSONL, JSON, .gz/.zst, parquet, Arrow, text) or folders (of them, or "
        "written by datasets' save_to_disk).",
    )
    p.add_argument(
        "--model", required=True, help="HF model folder whose tokenizer and chat template are used."
    )
    p.add_argument("--task-type", default="chat", help="chat, instruction or text." + d)
    p.add_argument(
        "--context-length",
        type=int,
        default=8192,
        help="packed sequence length in tokens." + d,
    )
    p.add_argument(
        "--overlength",
        default="truncate",
        help="what to do with examples longer than the context: truncate, drop or split." + d,
    )
    p.add_argument(
        "--loss-on",
        default="all_assistant",
        help="all_assistant or last_assistant (chat only)." + d,
    )
    p.add_argument(
        "--all-errors",
        action="store_true",
        help="list every error instead of stopping at the first.",
    )
    p.add_argument(
        "--format",
        dest="data_format",
        default="auto",
        help="auto (from each file), jsonl, json, parquet, arrow or text." + d,
    )
    p.add_argument(
        "--columns",
        default="",
        metavar="NAME=COLUMN[,...]",
        help="read another column as one longtune knows, e.g. messages=dialog.",
    )

    p = _command(
        sub,
        "demo",
        "longtune.demo.run:run_demo",
        "Fine-tune the bundled SmolLM2-135M-Instruct on the bundled long-context data and export "
        "it.",
    )
    p.add_argument(
        "--output-dir",
        default="runs/demo",
        help="run folder (metrics, checkpoints, hf/ export)." + d,
    )
    p.add_argument("--steps", type=int, default=24, help="optimizer steps." + d)


def _add_run_commands(sub: Any) -> None:
    """``ui`` and ``runs list|show|cancel|resume|delete``."""
    d, runs_dir = _DEFAULT, _RUNS_DIR
    p = _command(
        sub,
        "ui",
        "longtune.ui.server:serve",
        "Serve the web UI: start, watch, compare and cancel runs from a browser.",
    )
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on; anything but a loopback address is reachable from other machines "
        "(a warning is printed)." + d,
    )
    p.add_argument("--port", type=int, default=8600, help="TCP port (0: any free port)." + d)
    p.add_argument("--runs-dir", default="runs", help=runs_dir)
    p.add_argument(
        "--allow-dir",
        dest="allow_dirs",
        action="extend",
        nargs="+",
        help="folders the UI may read models and data from; default: the current folder. The runs "
        "folder and the demo's data and model are always allowed.",
    )

    runs = sub.add_parser(
        "runs", help="List, show, cancel, resume or delete the runs of a runs folder."
    )
    actions = runs.add_subparsers(dest="_runs_command", required=True, metavar="ACTION")
    folder = argparse.ArgumentParser(add_help=False)
    folder.add_argument("--runs-dir", default="runs", help=runs_dir)
    named = argparse.ArgumentParser(add_help=False, parents=[folder])
    named.add_argument("name", help="the run's folder name.")
    p = _command(actions, "list", runs_list, parents=[folder])
    p.add_argument(
        "--json", action="store_true", help="print JSON (one object per run) instead of a table."
    )
    p = _command(actions, "show", runs_show, parents=[named])
    p.add_argument("--json", action="store_true", help="print JSON instead of text.")
    p = _command(actions, "cancel", runs_cancel, parents=[named])
    p.add_argument(
        "--now",
        action="store_true",
        help="stop at once (SIGQUIT), without a checkpoint of the current step; the newest "
        "complete checkpoint stays.",
    )
    p = _command(actions, "resume", runs_resume, parents=[named])
    p.add_argument("--nproc", type=int, help="processes (default: as it was launched, else 1)." + d)
    _command(actions, "delete", runs_delete, parents=[named])


def _end_worker(code: int) -> None:
    """End a worker started by torchrun (or another launcher) without the interpreter's teardown.

    torch keeps every process group it ever used reachable from its DTensor caches after
    ``destroy_process_group``, so their C++ objects (and gloo's threads) are destroyed during
    interpreter shutdown, where a worker can abort ("terminate called without an active
    exception") after a successful run, and the launcher then reports the whole run as failed
    (the incident: ``docs/benchmarks.md``). Everything longtune writes is closed by now; the log
    handlers and streams are flushed, and the process ends with ``code``.
    """
    import logging

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "train":
        code = train(argv[1:])
        if "RANK" in os.environ and "torch.distributed" in sys.modules:
            _end_worker(code)
        sys.exit(code)
    args = build_parser().parse_args(argv)
    kwargs = {k: v for k, v in vars(args).items() if k != "command" and not k.startswith("_")}
    fn = args._fn
    if isinstance(fn, str):
        module, name = fn.split(":")
        fn = getattr(importlib.import_module(module), name)
    try:
        code = fn(**kwargs)
    except (ValueError, FileNotFoundError, RunLockedError) as e:
        # User-facing errors (bad input, bad setting, a busy run folder): one line, no traceback.
        print(f"longtune {args.command}: error: {e}", file=sys.stderr)
        code = 2
    except OSError as e:  # disk full, read-only folder, ...: the folder and the cause
        from longtune.fsutil import describe_os_error

        print(f"longtune {args.command}: error: {describe_os_error(e, 'output')}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:  # Ctrl-C: one line, and the shell's code for SIGINT
        print(f"longtune {args.command}: interrupted", file=sys.stderr)
        code = 130
    sys.exit(code)
