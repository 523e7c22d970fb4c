"""Write a trained model as a Hugging Face folder, then check what was written.

:func:`export_and_check` writes the folder one tensor at a time and checks it on what is on
disk: every tensor equals the trained one cast to its export dtype, the tokenizer loads, and —
when two copies of the model fit in memory — ``transformers`` loads the folder and gives the
native model's logits on a probe. The result is a JSON record; a failed check raises.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from longtune.fsutil import atomic_write_text
from longtune.model.args import ModelArgs
from longtune.model.convert import load_model, model_from_state
from longtune.model.hf import (
    HFSource,
    SafetensorsRows,
    hf_pieces,
    hf_shapes,
    read_hf_source,
    save_model,
)

logger = logging.getLogger(__name__)

PROBE_TEXT = "Long-context fine-tuning check: the quick brown fox jumps over the lazy dog."


def export_and_check(
    state: Mapping[str, torch.Tensor],
    args: ModelArgs,
    source: HFSource,
    export_dir: Path,
    check_path: Path,
    dtype: str | None = None,
    overwrite: bool = False,
    max_shard_bytes: int | None = None,
    logits: bool | None = None,
) -> dict[str, Any]:
    """Write the HF folder, then check it.

    Checks, each on what was written to disk: every tensor equals the trained one cast to its
    export dtype (exactly; one tensor at a time); the tokenizer loads; and the logits probe:
    ``transformers``' ``LlamaForCausalLM`` loaded from the folder gives the same logits as the
    native model on a probe (float32, relative error < 1e-4), with the drift of the export-dtype
    rounding from the un-rounded trained weights recorded too. The probe loads the whole model
    (one copy at a time), so by default it runs only when two float32 copies fit in the memory
    available; otherwise the record says it was skipped and why.

    Args:
        state: the native tensors by name (a full state dict, or a lazy mapping such as
            :class:`longtune.checkpoint.CheckpointTensors` that reads each when asked).
        args: the model's arguments.
        source: config, tokenizer files and tensor layout of the source model.
        export_dir: the HF folder to write.
        check_path: where the check's JSON record goes.
        dtype: write tensors in this dtype; default: each in its source dtype.
        overwrite: replace ``export_dir`` if longtune wrote it before (see
            :func:`longtune.fsutil.atomic_dir`; a folder longtune did not write is refused).
        max_shard_bytes: files of at most this size; default: the source's layout.
        logits: run the logits probe (True), skip it (False), or decide by memory (None).

    Returns:
        The check record (also written to ``check_path``).

    Raises:
        RuntimeError: when the check fails (the record is written first).
    """
    save_model(
        None,
        export_dir,
        source=source,
        dtype=dtype,
        state_dict=state,
        max_shard_bytes=max_shard_bytes,
        overwrite=overwrite,
    )
    mismatched = _mismatched_tensors(state, args, export_dir)
    tokenizer = AutoTokenizer.from_pretrained(export_dir)
    ids = torch.tensor([tokenizer(PROBE_TEXT)["input_ids"]])
    check: dict[str, Any] = {
        "probe_tokens": int(ids.numel()),
        "tensors_equal_trained": not mismatched,
        "mismatched_tensors": mismatched,
        "tokenizer_loaded": True,
        "chat_template": bool(getattr(tokenizer, "chat_template", None)),
    }
    skip = _why_skip_logits(args) if logits is None else (None if logits else "not asked")
    if skip is None:
        check |= _logits_probe(state, args, export_dir, ids)
        check["logits_checked"] = True
    else:
        check |= {"logits_checked": False, "logits_skipped_because": skip}
        logger.info("export %s: logits probe skipped (%s); tensors checked", export_dir, skip)
    check["passed"] = not mismatched and (
        skip is not None or check["rel_err_vs_transformers"] < 1e-4
    )
    atomic_write_text(check_path, json.dumps(check, indent=2))
    if not check["passed"]:
        raise RuntimeError(f"export self-check failed: {check}")
    return check


def _mismatched_tensors(
    state: Mapping[str, torch.Tensor], args: ModelArgs, export_dir: Path, block: int = 2**26
) -> list[str]:
    """Native tensors that differ anywhere from what was written; one trained tensor at a
    time, each HF piece of it read back by blocks of rows."""
    _, written = read_hf_source(export_dir)
    files = {name: SafetensorsRows(export_dir / name) for name in set(written.weight_map.values())}
    pieces: dict[str, list[tuple[str, int, int]]] = {}
    for key, (name, start, rows) in hf_pieces(args, "lm_head.weight" in written.weight_map).items():
        pieces.setdefault(name, []).append((key, start, rows))
    mismatched = []
    for name, parts in pieces.items():
        trained = state[name]
        if not all(
            _same_rows(files[written.weight_map[key]], key, trained.narrow(0, start, rows), block)
            for key, start, rows in parts
        ):
            mismatched.append(name)
        del trained
    return mismatched


def _same_rows(file: SafetensorsRows, key: str, trained: torch.Tensor, block: int = 2**26) -> bool:
    """Whether tensor ``key`` of ``file`` equals ``trained`` cast to its dtype, read and
    compared by blocks of about ``block`` bytes."""
    step = max(1, block // max(1, trained[0].numel() * trained.element_size()))
    for a in range(0, trained.shape[0], step):
        on_disk = file.read(key, a, min(trained.shape[0], a + step))
        if not torch.equal(on_disk, trained[a : a + step].to(on_disk.dtype)):
            return False
    return True


def _why_skip_logits(args: ModelArgs) -> str | None:
    """Why the logits probe would not fit (two float32 copies of the model in the memory
    available now), or None when it fits or the memory available is unknown."""
    need = 2 * 4 * sum(int(torch.Size(s).numel()) for s in hf_shapes(args).values())
    available = _memory_available()
    if available is None or need <= available:
        return None
    return f"it needs {need / 2**30:.1f} GiB, {available / 2**30:.1f} GiB available"


def _memory_available() -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` in bytes (None where there is none)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _logits_probe(
    state: Mapping[str, torch.Tensor], args: ModelArgs, export_dir: Path, ids: torch.Tensor
) -> dict[str, float]:
    """Logits of transformers' model read from the folder against the native model read from
    the folder and the native model of the un-rounded trained weights; one model at a time."""
    with torch.no_grad():
        hf = AutoModelForCausalLM.from_pretrained(
            export_dir, dtype=torch.float32, attn_implementation="eager"
        ).eval()
        ref = hf(ids).logits.double()
        del hf

        def rel(model: torch.nn.Module) -> float:
            logits = model(ids).double()
            return float((logits - ref).norm() / ref.norm())

        err_written = rel(load_model(export_dir, dtype=torch.float32))
        err_unrounded = rel(model_from_state(args, state, dtype=torch.float32))
    return {
        "rel_err_vs_transformers": err_written,
        "rel_err_trained_weights_unrounded": err_unrounded,
    }
