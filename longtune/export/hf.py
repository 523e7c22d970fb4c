"""Write a native model back as a Hugging Face checkpoint folder.

Unfuse, rename with the inverted key map, and write safetensors in the layout the source had
(same file names and tensor-to-file map; a fresh layout, sharded with an index when large, if
the tensor set changed), the source ``config.json`` verbatim (only the dtype may change, and only
when asked), and the source's tokenizer files, chat template and generation config. Tensors are
written in the dtype each had in the source unless a dtype is asked for, so an untrained
tensor comes back bit-identical.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from longtune.fsutil import atomic_dir, check_output_dir
from longtune.model.args import ModelArgs
from longtune.model.convert import (
    HF_INDEX,
    HF_SINGLE,
    HFSource,
    copy_meta_files,
    is_native_dir,
    key_map,
    load_model,
    parse_dtype,
    read_hf_source,
    read_native_meta,
)

DEFAULT_MAX_SHARD_BYTES = 5 * 2**30


def hf_state_dict(
    native_state: Mapping[str, torch.Tensor], args: ModelArgs, with_lm_head: bool
) -> dict[str, torch.Tensor]:
    """Unfuse and rename a native state dict to HF names (views; no copies).

    Args:
        native_state: full (unsharded) native state dict.
        args: the model's arguments (for split sizes).
        with_lm_head: also emit ``lm_head.weight`` when embeddings are tied (some checkpoints
            store it).
    """
    sizes = {
        "wqkv": [args.q_size, args.kv_size, args.kv_size],
        "w13": [args.ffn_dim, args.ffn_dim],
    }
    out: dict[str, torch.Tensor] = {}
    for native, hf_keys in key_map(args).items():
        if native == "output.weight" and args.tie_embeddings:
            if with_lm_head:
                out["lm_head.weight"] = native_state["tok_embeddings.weight"]
            continue
        t = native_state[native]
        if len(hf_keys) == 1:
            out[hf_keys[0]] = t
            continue
        kind = native.split(".")[-2]
        for key, part in zip(hf_keys, t.split(sizes[kind], dim=0), strict=True):
            out[key] = part
    return out


def resolve_source(source: str | Path | HFSource) -> HFSource:
    if isinstance(source, HFSource):
        return source
    if is_native_dir(source):
        return read_native_meta(source)[1]
    return read_hf_source(source)[1]


def save_model(
    model: torch.nn.Module | None,
    out_dir: str | Path,
    source: str | Path | HFSource | None = None,
    dtype: str | torch.dtype | None = None,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
) -> Path:
    """Write the model as an HF checkpoint folder.

    Args:
        model: a native ``Transformer`` (its ``state_dict()`` must be full, i.e. not sharded;
            pass ``state_dict`` for a gathered FSDP state instead).
        out_dir: destination folder; written to a temporary sibling then renamed. It must be
            new, empty, or (with ``overwrite``) an earlier longtune output, and not the source
            folder nor inside it (see :func:`longtune.fsutil.atomic_dir`).
        source: the HF (or native) folder the model came from; defaults to
            ``model.hf_source`` set by :func:`longtune.load_model`. Supplies config.json,
            tokenizer files and the original tensor layout and dtypes.
        dtype: write every tensor in this dtype (and record it in config.json); default keeps
            each tensor's source dtype.
        state_dict: native state dict to write instead of ``model.state_dict()``.
        max_shard_bytes: largest file, when a fresh layout has to be planned.
        overwrite: replace ``out_dir`` if longtune wrote it before.

    Returns:
        ``out_dir``.
    """
    if source is None:
        source = getattr(model, "hf_source", None)
        if source is None:
            raise ValueError(
                "save_model needs source=<HF or native folder the model came from> "
                "(for config.json and tokenizer files); this model has no recorded source"
            )
    sources = [_source_dir(source)]
    check_output_dir(out_dir, sources, overwrite)
    src = resolve_source(source)
    sources.append(src.meta_dir)
    args = ModelArgs.from_hf_config(src.config)
    if model is not None:
        margs = model.args
        if margs.to_dict() | {"dtype": ""} != args.to_dict() | {"dtype": ""}:
            raise ValueError("the model's arguments do not match the source config.json")
    native = state_dict if state_dict is not None else model.state_dict()
    want = parse_dtype(dtype)
    tensors = hf_state_dict(native, args, with_lm_head="lm_head.weight" in src.weight_map)

    if set(tensors) == set(src.weight_map):
        weight_map = dict(src.weight_map)
    else:
        weight_map = _plan_layout(tensors, want, max_shard_bytes)

    out_dir = Path(out_dir)
    with atomic_dir(out_dir, kind="hf", sources=sources, overwrite=overwrite) as tmp:
        by_file: dict[str, list[str]] = {}
        for key, fname in weight_map.items():
            by_file.setdefault(fname, []).append(key)
        total = 0
        for fname, keys in by_file.items():
            shard = {}
            for key in keys:
                t = tensors[key].detach()
                target = want or parse_dtype(src.dtypes.get(key)) or t.dtype
                # clone: split views share storage, which safetensors refuses to write.
                shard[key] = t.to(device="cpu", dtype=target).clone().contiguous()
                total += shard[key].numel() * shard[key].element_size()
            save_file(shard, tmp / fname, metadata={"format": "pt"})
            del shard
        if len(by_file) > 1 or src.sharded:
            index = {
                "metadata": {"total_size": total},
                "weight_map": dict(sorted(weight_map.items())),
            }
            (tmp / HF_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        copy_meta_files(src.meta_dir, tmp)
        (tmp / "config.json").write_text(_config_text(src.config_text, want))
    return out_dir


def _config_text(config_text: str, dtype: torch.dtype | None) -> str:
    """The source config verbatim, or with its dtype field(s) changed when a dtype is asked."""
    if dtype is None:
        return config_text
    cfg = json.loads(config_text)
    name = str(dtype).removeprefix("torch.")
    keys = [k for k in ("torch_dtype", "dtype") if k in cfg] or ["torch_dtype"]
    for k in keys:
        cfg[k] = name
    return json.dumps(cfg, indent=2, sort_keys=False) + "\n"


def _plan_layout(
    tensors: Mapping[str, torch.Tensor], dtype: torch.dtype | None, max_shard_bytes: int
) -> dict[str, str]:
    groups: list[list[str]] = [[]]
    size = 0
    for key, t in tensors.items():
        nbytes = t.numel() * (dtype.itemsize if dtype else t.element_size())
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(key)
        size += nbytes
    if len(groups) == 1:
        return dict.fromkeys(groups[0], HF_SINGLE)
    n = len(groups)
    return {
        key: f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i, g in enumerate(groups) for key in g
    }


def _source_dir(source: str | Path | HFSource) -> Path:
    return source.meta_dir if isinstance(source, HFSource) else Path(source)


def export_native(
    native_dir: str | Path, out_dir: str | Path, dtype: str | None = None, overwrite: bool = False
) -> Path:
    """``longtune export``: turn a native folder back into an HF checkpoint folder.

    Args:
        native_dir: a folder written by ``longtune convert``.
        out_dir: the HF folder to write (checked before the model is read).
        dtype: write every tensor in this dtype; default as in the source.
        overwrite: replace ``out_dir`` if longtune wrote it before.

    Returns:
        ``out_dir``.
    """
    check_output_dir(out_dir, [native_dir], overwrite)
    model = load_model(native_dir)
    return save_model(model, out_dir, source=native_dir, dtype=dtype, overwrite=overwrite)
