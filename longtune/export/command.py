"""``longtune export``: a Hugging Face folder from a training checkpoint or a native folder, or a
GGUF file from any of these or an HF folder."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

import torch

from longtune.checkpoint import (
    CheckpointTensors,
    check_checkpoint_model,
    checkpoint_info,
    read_rank_states,
)
from longtune.export.check import export_and_check
from longtune.export.gguf import GGUF_TYPES, check_gguf_output, export_gguf
from longtune.export.lora import MergedTensors, write_peft_adapter
from longtune.fsutil import OutputDirError, check_output_dir
from longtune.model.args import ModelArgs
from longtune.model.convert import is_native_dir, read_native_meta
from longtune.model.hf import HFSource, ShardReader, save_model
from longtune.model.llama import Transformer
from longtune.model.lora import add_lora, check_record
from longtune.run_dir import RunDir


def export(
    source: str | Path,
    out: str | Path,
    dtype: str | None = None,
    overwrite: bool = False,
    format: str = "hf",
    gguf_type: str | None = None,
    max_shard_bytes: int | None = None,
    base: str | Path | None = None,
    adapter_dir: str | Path | None = None,
) -> Path:
    """Export a native folder or a training checkpoint as a Hugging Face checkpoint folder, or
    any of these or an HF folder as one GGUF file.

    Args:
        source: a folder written by ``longtune convert``, ``RUN/checkpoints/step-N``, or (GGUF
            only) an HF folder such as a run's ``hf/``.
        out: the HF folder (``format="hf"``) or the ``.gguf`` file (``format="gguf"``) to write.
        dtype: HF only: write tensors in this dtype; default: each in its source dtype.
        overwrite: replace ``out`` if longtune wrote it before (GGUF: if it is a GGUF file).
        format: ``hf`` or ``gguf``.
        gguf_type: GGUF only: ``auto`` (default), ``f32``, ``f16``, ``bf16`` or ``q8_0``.
        max_shard_bytes: HF only: files of at most this size; default: the source model's
            layout.
        base: LoRA checkpoints only: the base model folder the adapters were trained on, if it
            moved (default: the one the checkpoint names; checked either way).
        adapter_dir: LoRA checkpoints only: where the PEFT adapter folder goes (default:
            ``OUT-adapter`` beside ``out``).

    Returns:
        ``out``.
    """
    if format not in ("hf", "gguf"):
        raise ValueError(f"unknown export format {format!r}; choose hf or gguf")
    _refuse_inside_a_run(Path(out))
    if format == "gguf":
        if dtype is not None:
            raise ValueError("--dtype applies to --format hf; for GGUF choose --gguf-type")
        if max_shard_bytes is not None:
            raise ValueError("--max-shard-gb applies to --format hf; a GGUF is one file")
        return export_gguf_file(source, out, gguf_type or "auto", overwrite=overwrite)
    if gguf_type is not None:
        raise ValueError("--gguf-type applies to --format gguf only")
    kw = {"dtype": dtype, "overwrite": overwrite, "max_shard_bytes": max_shard_bytes}
    if is_native_dir(source):
        if base is not None or adapter_dir is not None:
            raise ValueError("--base and --adapter-dir apply to the checkpoints of LoRA runs")
        return export_native(source, out, **kw)
    return export_checkpoint(source, out, **kw, base=base, adapter_dir=adapter_dir)


def export_gguf_file(
    source: str | Path, out_file: str | Path, gguf_type: str = "auto", overwrite: bool = False
) -> Path:
    """``longtune export SRC OUT --format gguf``: one GGUF file from an HF folder, a native
    folder or a training checkpoint.

    An HF folder (config.json and safetensors, e.g. a run's ``hf/``) is converted as it is. A
    native folder or a checkpoint is first exported as an HF folder (with the usual self-check)
    into a temporary folder beside ``out_file``, which is removed afterwards.

    Args:
        source: an HF folder, a folder written by ``longtune convert``, or
            ``RUN/checkpoints/step-N``.
        out_file: the ``.gguf`` file to write.
        gguf_type: ``auto``, ``f32``, ``f16``, ``bf16`` or ``q8_0`` (see
            :func:`longtune.export.gguf.export_gguf`).
        overwrite: replace ``out_file`` if it is a GGUF file.

    Returns:
        ``out_file``.
    """
    source, out = Path(source), Path(out_file)
    if gguf_type not in GGUF_TYPES:
        raise ValueError(f"unknown GGUF type {gguf_type!r}; choose one of {', '.join(GGUF_TYPES)}")
    if (source / "config.json").is_file() and not is_native_dir(source):
        return export_gguf(source, out, gguf_type, overwrite=overwrite)
    check_gguf_output(out, source, overwrite)  # before the HF export, which takes a while
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.hf-") as tmp:
        hf_dir = Path(tmp) / "hf"
        if is_native_dir(source):
            name = source.resolve().name
            export_native(source, hf_dir)
        else:
            name = f"{RunDir.of_checkpoint(source).path.resolve().name}-{source.name}"
            export_checkpoint(source, hf_dir)
        return export_gguf(hf_dir, out, gguf_type, overwrite=overwrite, name=name)


def _refuse_inside_a_run(out: Path) -> None:
    """An export never goes into a training run's folder: its ``hf/`` is the run's own export,
    which the run reports as its result."""
    for folder in out.resolve().parents:  # a run folder itself: refused as one by the output check
        if RunDir(folder).is_run():
            raise OutputDirError(
                f"output folder {out} is inside the training run {folder}, whose hf/ is the run's "
                "own export; write the export somewhere else"
            )


def export_native(
    native_dir: str | Path,
    out_dir: str | Path,
    dtype: str | None = None,
    overwrite: bool = False,
    max_shard_bytes: int | None = None,
) -> Path:
    """Turn a native folder back into an HF checkpoint folder.

    Args:
        native_dir: a folder written by ``longtune convert``.
        out_dir: the HF folder to write (checked before the model is read).
        dtype: write every tensor in this dtype; default as in the source.
        overwrite: replace ``out_dir`` if longtune wrote it before.
        max_shard_bytes: files of at most this size; default: the source model's layout.

    Returns:
        ``out_dir``.
    """
    check_output_dir(out_dir, [native_dir], overwrite)
    _, source, native_map = read_native_meta(native_dir)
    reader = ShardReader(Path(native_dir), native_map)
    try:
        return save_model(
            None,
            out_dir,
            source=source,
            dtype=dtype,
            state_dict=_Lazy(native_map, reader.get),  # each tensor read when written
            max_shard_bytes=max_shard_bytes,
            overwrite=overwrite,
        )
    finally:
        reader.close()


def export_checkpoint(
    ckpt_dir: str | Path,
    out_dir: str | Path,
    dtype: str | None = None,
    overwrite: bool = False,
    max_shard_bytes: int | None = None,
    base: str | Path | None = None,
    adapter_dir: str | Path | None = None,
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
        max_shard_bytes: files of at most this size; default: the source model's layout.
        base, adapter_dir: for the checkpoint of a LoRA run: see :func:`export`. Such a
            checkpoint holds the adapters only; ``out_dir`` gets the merged model (base + adapters)
            and ``adapter_dir`` the PEFT folder.

    Returns:
        ``out_dir``.
    """
    ckpt_dir = Path(ckpt_dir)
    run = RunDir.of_checkpoint(ckpt_dir)
    out = check_output_dir(out_dir, [ckpt_dir, run.source], overwrite)
    check = out.with_name(out.name + ".export_check.json")
    if check.exists() and not _is_export_check(check):
        raise OutputDirError(
            f"{check} exists and was not written by longtune (the export's self-check goes "
            "there); move it or choose another output folder"
        )
    checkpoint_info(ckpt_dir)  # raises on an incomplete or unsafe checkpoint
    if not HFSource.saved_in(run.source):
        raise FileNotFoundError(
            f"{ckpt_dir} is not inside a longtune run folder (no model source in {run.source})"
        )
    source = HFSource.load(run.source)
    args = ModelArgs.from_hf_config(source.config)
    tensors = CheckpointTensors(ckpt_dir)
    record = read_rank_states(ckpt_dir).get("lora")
    if record is None and (base is not None or adapter_dir is not None):
        raise ValueError(
            f"--base and --adapter-dir apply to the checkpoints of LoRA runs; {ckpt_dir} is of "
            "a full fine-tuning run (it holds every weight)"
        )
    spec = None
    if record is not None:
        base = str(Path(base or record["base"]).resolve())  # adapter_config.json names it
        spec = check_record(record, None, base, "--base")
        adapter_dir = Path(adapter_dir or out.with_name(out.name + "-adapter"))
        check_output_dir(adapter_dir, [ckpt_dir, base], overwrite)
    with torch.device("meta"):
        model = Transformer(args)
        if spec is not None:
            add_lora(model, spec)
        check_checkpoint_model(ckpt_dir, model)
    if spec is not None:
        write_peft_adapter(tensors, spec, args, base, adapter_dir, overwrite)
        tensors = MergedTensors(tensors, base, args, spec)
    export_and_check(
        tensors,
        args,
        source,
        out,
        check,
        dtype=dtype,
        overwrite=overwrite,
        max_shard_bytes=max_shard_bytes,
    )
    return out


def _is_export_check(path: Path) -> bool:
    """True for a self-check record written by :func:`export_and_check`."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and "tensors_equal_trained" in record


class _Lazy(Mapping[str, torch.Tensor]):
    """Tensors by name, each read when asked for."""

    def __init__(self, names: Iterable[str], read: Callable[[str], torch.Tensor]) -> None:
        self.names, self.read = list(names), read

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.names:
            raise KeyError(name)
        return self.read(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)
