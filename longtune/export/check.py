"""Write a trained model as a Hugging Face folder, then check what was written.

:func:`export_and_check` checks the folder on what is on disk: every tensor equals the trained
one cast to its export dtype, ``transformers`` loads it and gives the native model's logits on a
probe, the tokenizer loads. The result is a JSON record; a failed check raises.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from longtune.fsutil import atomic_write_text
from longtune.model.args import ModelArgs
from longtune.model.convert import load_model
from longtune.model.hf import HFSource, save_model
from longtune.model.llama import Transformer

PROBE_TEXT = "Long-context fine-tuning check: the quick brown fox jumps over the lazy dog."


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
    atomic_write_text(check_path, json.dumps(check, indent=2))
    if not check["passed"]:
        raise RuntimeError(f"export self-check failed: {check}")
    return check
