"""Export a trained model as a Hugging Face folder and check what was written.

A run folder's ``source/`` holds the source model's config.json, tokenizer files and tensor
layout (``hf_source.json``), so a run or any of its checkpoints can be exported without the
original model folder. :func:`export_and_check` writes the folder and then checks it on what is
on disk: every tensor equals the trained one cast to its export dtype, ``transformers`` loads it
and gives the native model's logits on a probe, the tokenizer loads. The result is a JSON
record; a failed check raises.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from longtune.export.hf import save_model
from longtune.fsutil import OutputDirError, check_output_dir
from longtune.model.args import ModelArgs
from longtune.model.convert import HFSource, copy_meta_files, load_model, read_hf_source
from longtune.model.llama import Transformer
from longtune.run_dir import RunDir
from longtune.train.checkpoint import checkpoint_info, load_checkpoint

SOURCE_LAYOUT = "hf_source.json"
PROBE_TEXT = "Long-context fine-tuning check: the quick brown fox jumps over the lazy dog."


def save_run_source(model_dir: str | Path, run: RunDir) -> None:
    """Copy config.json, tokenizer files and the tensor layout of the source model into the run.

    Args:
        model_dir: the HF checkpoint folder the run starts from.
        run: the run folder.
    """
    _, src = read_hf_source(model_dir)
    copy_meta_files(Path(model_dir), run.source)
    (run.source / SOURCE_LAYOUT).write_text(json.dumps(src.to_json(), indent=1))


def has_run_source(run: RunDir) -> bool:
    """True when the run's ``source/`` was written."""
    return (run.source / SOURCE_LAYOUT).is_file()


def read_run_source(run: RunDir) -> HFSource:
    """The run's source model description (what :func:`save_run_source` wrote).

    Args:
        run: the run folder.

    Returns:
        The HFSource, its non-weight files in ``run.source``.
    """
    return HFSource.from_json(json.loads((run.source / SOURCE_LAYOUT).read_text()), run.source)


def export_and_check(
    state: dict[str, torch.Tensor],
    args: ModelArgs,
    source: HFSource,
    export_dir: Path,
    check_path: Path,
    dtype: str | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write the HF folder, then check it.

    Checks, each on what was written to disk: every tensor equals the trained one cast to its
    export dtype (exactly); ``transformers``' ``LlamaForCausalLM`` loaded from the folder gives
    the same logits as the native model on a probe (float32, relative error < 1e-4); the
    tokenizer loads. The drift of the export-dtype rounding from the un-rounded trained weights
    is recorded too. One model is held at a time.

    Args:
        state: the full (gathered) native state dict.
        args: the model's arguments.
        source: config, tokenizer files and tensor layout of the source model.
        export_dir: the HF folder to write.
        check_path: where the check's JSON record goes.
        dtype: write tensors in this dtype; default: each in its source dtype.
        overwrite: replace ``export_dir`` if longtune wrote it before (see
            :func:`longtune.fsutil.atomic_dir`; a folder longtune did not write is refused).

    Returns:
        The check record (also written to ``check_path``).

    Raises:
        RuntimeError: when the check fails (the record is written first).
    """
    state = {k.removeprefix("_orig_mod."): v for k, v in state.items()}
    save_model(None, export_dir, source=source, dtype=dtype, state_dict=state, overwrite=overwrite)

    written = load_model(export_dir)  # tensors as stored
    mismatched = [
        k for k, v in written.state_dict().items() if not torch.equal(v, state[k].to(v.dtype))
    ]
    del written
    tokenizer = AutoTokenizer.from_pretrained(export_dir)
    ids = torch.tensor([tokenizer(PROBE_TEXT)["input_ids"]])
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
    return check


def export_checkpoint(
    ckpt_dir: str | Path, out_dir: str | Path, dtype: str | None = None, overwrite: bool = False
) -> Path:
    """``longtune export RUN_DIR/checkpoints/step-N OUT``: an HF folder from a training checkpoint.

    The run folder's ``source/`` (config.json, tokenizer files, tensor layout of the model the run
    started from) supplies everything but the weights. Runs in one process. The self-check
    result goes beside the folder, to ``OUT.export_check.json``.

    Args:
        ckpt_dir: a complete checkpoint ``RUN/checkpoints/step-N``.
        out_dir: the HF folder to write.
        dtype: write tensors in this dtype; default: each in its source dtype.
        overwrite: replace ``out_dir`` if longtune wrote it before.

    Returns:
        ``out_dir``.
    """
    ckpt_dir = Path(ckpt_dir)
    run = RunDir(ckpt_dir.parent.parent)
    out = Path(out_dir)
    check = out.with_name(out.name + ".export_check.json")
    check_output_dir(out, [ckpt_dir, run.source], overwrite)
    if check.exists() and not _is_export_check(check):
        raise OutputDirError(
            f"{check} exists and was not written by longtune (the export's self-check goes "
            "there); move it or choose another output folder"
        )
    checkpoint_info(ckpt_dir)  # raises on an incomplete or unsafe checkpoint
    if not has_run_source(run):
        raise FileNotFoundError(
            f"{ckpt_dir} is not inside a longtune run folder (no {run.source / SOURCE_LAYOUT})"
        )
    source = read_run_source(run)
    args = ModelArgs.from_hf_config(source.config)
    model = Transformer(args)
    load_checkpoint(ckpt_dir, model=model, optimizer=None, scheduler=None, restore_rng=False)
    model.tie_weights()
    export_and_check(model.state_dict(), args, source, out, check, dtype=dtype, overwrite=overwrite)
    return out


def _is_export_check(path: Path) -> bool:
    """True for a self-check record written by :func:`export_and_check`."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and "tensors_equal_trained" in record
