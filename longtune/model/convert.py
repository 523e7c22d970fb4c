"""Loading a native model, and longtune's native (fused) checkpoint format.

Two on-disk forms are read by :func:`load_model` (the HF format itself, its key map and checks,
is :mod:`longtune.model.hf`):

* an HF checkpoint folder (``config.json`` + ``model.safetensors`` or shards with
  ``model.safetensors.index.json``);
* a native folder written by :func:`convert_hf_to_native` (``longtune convert``): fused tensors in
  safetensors under native names, ``longtune.json`` with the model arguments and everything
  needed to write the HF checkpoint back (original ``config.json`` text, tensor-to-file layout,
  per-tensor dtypes), and ``hf/`` with the source's non-weight files (tokenizer, chat template,
  generation config).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from longtune.fsutil import atomic_dir, check_output_dir
from longtune.model.args import ModelArgs
from longtune.model.checks import check_model_dir, check_tokenizer_fits
from longtune.model.hf import (
    HFSource,
    ShardReader,
    copy_meta_files,
    key_map,
    native_tensor_names,
    parse_dtype,
    read_hf_source,
    read_native_tensor,
)
from longtune.model.llama import Transformer

NATIVE_META = "longtune.json"
NATIVE_FORMAT = "longtune-native"


def is_native_dir(path: str | Path) -> bool:
    return (Path(path) / NATIVE_META).is_file()


def check_model_folder(model_dir: str | Path) -> ModelArgs:
    """Everything about a model folder that can be checked without reading its weights.

    The folder exists locally and has tokenizer files; ``config.json`` is valid and complete;
    every safetensors file opens (not truncated) and holds exactly the tensors and shapes the
    config describes; the tokenizer's ids fit the vocabulary. Reads only small files and the
    safetensors headers, so the trainer's preflight calls it before anything is started.

    Args:
        model_dir: the ``model.path`` folder.

    Returns:
        The model arguments.

    Raises:
        ModelFolderError, CheckpointMismatchError, UnsupportedModelError, FileNotFoundError:
            one line naming the folder, file or key.
    """
    check_model_dir(model_dir, tokenizer=True)
    args, _ = read_hf_source(model_dir)
    check_tokenizer_fits(model_dir, args.vocab_size)
    return args


def model_from_state(
    args: ModelArgs, state: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None
) -> Transformer:
    """A native model on the CPU holding ``state``'s tensors (read one at a time from a lazy
    mapping, cast to ``dtype`` when given), in eval mode."""
    tensors = {}
    for name in native_tensor_names(args):
        t = state[name]
        tensors[name] = t if dtype is None else t.to(dtype)
    return _materialize(_build_meta(args), tensors, "cpu").eval()


def _build_meta(args: ModelArgs) -> Transformer:
    with torch.device("meta"):
        return Transformer(args)


def _materialize(
    model: Transformer, state: dict[str, torch.Tensor], device: torch.device | str
) -> Transformer:
    if model.args.tie_embeddings:
        state = {**state, "output.weight": state["tok_embeddings.weight"]}
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()
    model.init_buffers(device=device)
    return model


def load_model(
    path: str | Path,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> Transformer:
    """Load a native model from an HF checkpoint folder or a native folder.

    The model is built on the meta device, then each tensor is read from its safetensors
    shard, fused, cast and placed; the whole model is never held twice.

    Args:
        path: HF checkpoint folder (single file or sharded with an index) or a folder written
            by ``longtune convert``.
        dtype: compute/storage dtype; ``None`` keeps the checkpoint's dtype.
        device: where the parameters go.

    Returns:
        The ``Transformer``, in eval mode, with ``model.hf_source`` recording what is needed
        to export it back (see :func:`longtune.model.hf.save_model`).
    """
    path = Path(path)
    want = parse_dtype(dtype)
    if is_native_dir(path):
        args, source, native_map = read_native_meta(path)
        reader = ShardReader(path, native_map)
        names = native_tensor_names(args)
        fetch = reader.get
    else:
        args, source = read_hf_source(path)
        reader = ShardReader(path, source.weight_map)
        kmap = key_map(args)
        names = native_tensor_names(args)

        def fetch(native: str) -> torch.Tensor:
            return read_native_tensor(reader, kmap[native])

    model = _build_meta(args)
    state: dict[str, torch.Tensor] = {}
    try:
        for name in names:
            t = fetch(name)
            if want is not None:
                t = t.to(want)
            state[name] = t.to(device)
    finally:
        reader.close()
    model = _materialize(model, state, device)
    model.hf_source = source
    return model.eval()


# ---------------------------------------------------------------------------------------------
# Native format
# ---------------------------------------------------------------------------------------------


def read_native_meta(native_dir: str | Path) -> tuple[ModelArgs, HFSource, dict[str, str]]:
    native_dir = Path(native_dir)
    meta = json.loads((native_dir / NATIVE_META).read_text())
    if meta.get("format") != NATIVE_FORMAT:
        raise ValueError(f"{native_dir / NATIVE_META} is not a longtune native checkpoint")
    args = ModelArgs.from_dict(meta["model_args"])
    return args, HFSource.from_json(meta["hf_source"], native_dir / "hf"), meta["weight_map"]


def convert_hf_to_native(
    hf_dir: str | Path,
    native_dir: str | Path,
    max_shard_bytes: int = 5 * 2**30,
    overwrite: bool = False,
) -> Path:
    """Write an HF checkpoint in longtune's native (fused) format, tensor-exact.

    Args:
        hf_dir: source HF checkpoint folder.
        native_dir: destination; written to a temporary sibling and renamed when complete.
            It must be new, empty, or (with ``overwrite``) an earlier longtune output, and
            neither ``hf_dir`` nor inside it (see :func:`longtune.fsutil.atomic_dir`).
        max_shard_bytes: largest safetensors file to write.
        overwrite: replace ``native_dir`` if longtune wrote it before.

    Returns:
        ``native_dir``.
    """
    hf_dir, native_dir = Path(hf_dir), Path(native_dir)
    check_output_dir(native_dir, [hf_dir], overwrite)
    args, source = read_hf_source(hf_dir)
    kmap = key_map(args)
    reader = ShardReader(hf_dir, source.weight_map)
    with atomic_dir(native_dir, kind="native", sources=[hf_dir], overwrite=overwrite) as tmp:
        names = native_tensor_names(args)
        weight_map = _write_sharded(
            tmp,
            names,
            lambda n: read_native_tensor(reader, kmap[n]),
            max_shard_bytes,
            prefix="native",
        )
        reader.close()
        copy_meta_files(hf_dir, tmp / "hf")
        meta = {
            "format": NATIVE_FORMAT,
            "version": 1,
            "model_args": args.to_dict(),
            "hf_source": source.to_json(),
            "weight_map": weight_map,
        }
        (tmp / NATIVE_META).write_text(json.dumps(meta, indent=2))
    return native_dir


def _write_sharded(
    out_dir: Path,
    names: list[str],
    get: Any,
    max_shard_bytes: int,
    prefix: str,
) -> dict[str, str]:
    """Write tensors ``get(name)`` into ``prefix-0000i-of-0000n.safetensors`` files (or one file).

    Tensors are produced one at a time and written shard by shard; returns name -> file.
    """
    parts: list[list[str]] = []
    shard: dict[str, torch.Tensor] = {}
    size = 0

    def flush() -> None:
        part = out_dir / f"{prefix}-part-{len(parts) + 1:05d}.safetensors"
        save_file(shard, part, metadata={"format": "pt"})
        parts.append(list(shard))
        shard.clear()

    for name in names:
        t = get(name).contiguous()
        nbytes = t.numel() * t.element_size()
        if shard and size + nbytes > max_shard_bytes:
            flush()
            size = 0
        shard[name] = t
        size += nbytes
    if shard:
        flush()
    n = len(parts)
    weight_map = {}
    for i, part in enumerate(parts):
        fname = (
            f"{prefix}.safetensors" if n == 1 else f"{prefix}-{i + 1:05d}-of-{n:05d}.safetensors"
        )
        os.replace(out_dir / f"{prefix}-part-{i + 1:05d}.safetensors", out_dir / fname)
        weight_map |= dict.fromkeys(part, fname)
    return weight_map
