"""Hugging Face <-> native conversion: a declarative key map, exact checks, shard-by-shard I/O.

Two on-disk forms are read by :func:`load_model`:

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
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from longtune.fsutil import atomic_dir, check_output_dir
from longtune.model.args import ModelArgs
from longtune.model.checks import (
    ModelFolderError,
    check_finite,
    check_model_dir,
    check_tokenizer_fits,
    open_safetensors,
    read_json,
    read_model_config,
)
from longtune.model.llama import Transformer

NATIVE_META = "longtune.json"
NATIVE_FORMAT = "longtune-native"
HF_INDEX = "model.safetensors.index.json"
HF_SINGLE = "model.safetensors"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5", ".ckpt")

# native key -> HF keys, concatenated along dim 0 in this order. "{}" is the layer index.
KEY_MAP: dict[str, list[str]] = {
    "tok_embeddings.weight": ["model.embed_tokens.weight"],
    "layers.{}.attention_norm.weight": ["model.layers.{}.input_layernorm.weight"],
    "layers.{}.attention.wqkv.weight": [
        "model.layers.{}.self_attn.q_proj.weight",
        "model.layers.{}.self_attn.k_proj.weight",
        "model.layers.{}.self_attn.v_proj.weight",
    ],
    "layers.{}.attention.wo.weight": ["model.layers.{}.self_attn.o_proj.weight"],
    "layers.{}.ffn_norm.weight": ["model.layers.{}.post_attention_layernorm.weight"],
    "layers.{}.feed_forward.w13.weight": [
        "model.layers.{}.mlp.gate_proj.weight",
        "model.layers.{}.mlp.up_proj.weight",
    ],
    "layers.{}.feed_forward.w2.weight": ["model.layers.{}.mlp.down_proj.weight"],
    "norm.weight": ["model.norm.weight"],
    "output.weight": ["lm_head.weight"],
}
ATTENTION_BIAS_MAP: dict[str, list[str]] = {
    "layers.{}.attention.wqkv.bias": [
        "model.layers.{}.self_attn.q_proj.bias",
        "model.layers.{}.self_attn.k_proj.bias",
        "model.layers.{}.self_attn.v_proj.bias",
    ],
    "layers.{}.attention.wo.bias": ["model.layers.{}.self_attn.o_proj.bias"],
}
MLP_BIAS_MAP: dict[str, list[str]] = {
    "layers.{}.feed_forward.w13.bias": [
        "model.layers.{}.mlp.gate_proj.bias",
        "model.layers.{}.mlp.up_proj.bias",
    ],
    "layers.{}.feed_forward.w2.bias": ["model.layers.{}.mlp.down_proj.bias"],
}


class CheckpointMismatchError(ValueError):
    """The checkpoint's tensors do not match what its config describes."""


def key_map(args: ModelArgs) -> dict[str, list[str]]:
    """The key map expanded for every layer: native key -> HF keys (fusion order)."""
    template = dict(KEY_MAP)
    if args.attention_bias:
        template.update(ATTENTION_BIAS_MAP)
    if args.mlp_bias:
        template.update(MLP_BIAS_MAP)
    out: dict[str, list[str]] = {}
    for native, hf in template.items():
        if "{}" in native:
            for i in range(args.n_layers):
                out[native.format(i)] = [k.format(i) for k in hf]
        else:
            out[native] = list(hf)
    return out


def hf_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Expected shape of every HF tensor, ``lm_head.weight`` included."""
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (args.vocab_size, args.dim),
        "model.norm.weight": (args.dim,),
        "lm_head.weight": (args.vocab_size, args.dim),
    }
    for i in range(args.n_layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (args.dim,),
            p + "post_attention_layernorm.weight": (args.dim,),
            p + "self_attn.q_proj.weight": (args.q_size, args.dim),
            p + "self_attn.k_proj.weight": (args.kv_size, args.dim),
            p + "self_attn.v_proj.weight": (args.kv_size, args.dim),
            p + "self_attn.o_proj.weight": (args.dim, args.q_size),
            p + "mlp.gate_proj.weight": (args.ffn_dim, args.dim),
            p + "mlp.up_proj.weight": (args.ffn_dim, args.dim),
            p + "mlp.down_proj.weight": (args.dim, args.ffn_dim),
        }
        if args.attention_bias:
            shapes |= {
                p + "self_attn.q_proj.bias": (args.q_size,),
                p + "self_attn.k_proj.bias": (args.kv_size,),
                p + "self_attn.v_proj.bias": (args.kv_size,),
                p + "self_attn.o_proj.bias": (args.dim,),
            }
        if args.mlp_bias:
            shapes |= {
                p + "mlp.gate_proj.bias": (args.ffn_dim,),
                p + "mlp.up_proj.bias": (args.ffn_dim,),
                p + "mlp.down_proj.bias": (args.dim,),
            }
    return shapes


@dataclass
class HFSource:
    """What is needed to write an HF checkpoint back exactly as it came in."""

    config_text: str
    """``config.json`` verbatim."""
    weight_map: dict[str, str]
    """HF tensor name -> file name (one file when the source was not sharded)."""
    dtypes: dict[str, str]
    """HF tensor name -> dtype name in the source (e.g. ``bfloat16``)."""
    meta_dir: Path
    """Folder holding the non-weight files (tokenizer, chat template, generation config)."""
    sharded: bool = False

    @property
    def config(self) -> dict[str, Any]:
        return json.loads(self.config_text)

    @classmethod
    def from_json(cls, d: dict[str, Any], meta_dir: Path) -> HFSource:
        """Inverse of :meth:`to_json`, with the folder that holds the non-weight files."""
        return cls(d["config_text"], d["weight_map"], d["dtypes"], meta_dir, d["sharded"])

    def to_json(self) -> dict[str, Any]:
        return {
            "config_text": self.config_text,
            "weight_map": self.weight_map,
            "dtypes": self.dtypes,
            "sharded": self.sharded,
        }


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``"bfloat16"`` / ``"bf16"`` / ``torch.bfloat16`` -> ``torch.bfloat16``; ``None``/"auto" -> None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    if dtype == "auto":
        return None
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of auto, {', '.join(names)}")
    return names[dtype]


def is_native_dir(path: str | Path) -> bool:
    return (Path(path) / NATIVE_META).is_file()


def read_hf_source(hf_dir: str | Path) -> tuple[ModelArgs, HFSource]:
    """Read config and tensor inventory of an HF folder (no tensor data is loaded)."""
    hf_dir = Path(hf_dir)
    config_text, args = read_model_config(hf_dir)
    index = hf_dir / HF_INDEX
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ModelFolderError(f"{index}: missing key 'weight_map'")
        sharded = True
    elif (hf_dir / HF_SINGLE).is_file():
        with open_safetensors(hf_dir / HF_SINGLE) as f:
            weight_map = dict.fromkeys(f.keys(), HF_SINGLE)
        sharded = False
    else:
        others = sorted(p.name for p in hf_dir.iterdir() if p.suffix in WEIGHT_SUFFIXES)
        raise FileNotFoundError(
            f"no {HF_SINGLE} or {HF_INDEX} in {hf_dir} (found: {others or 'no weight files'}); "
            "longtune reads safetensors checkpoints only — re-save with "
            "`model.save_pretrained(dir, safe_serialization=True)`"
        )
    dtypes: dict[str, str] = {}
    by_file: dict[str, list[str]] = {}
    for key, fname in weight_map.items():
        by_file.setdefault(fname, []).append(key)
    shapes = hf_shapes(args)
    problems = []
    for fname, keys in by_file.items():
        with open_safetensors(hf_dir / fname) as f:
            present = set(f.keys())
            for key in keys:
                if key not in present:
                    problems.append(f"{key} (listed in the index for {fname}, absent from it)")
                    continue
                sl = f.get_slice(key)
                dtypes[key] = _safetensors_dtype_name(sl.get_dtype())
                shape = tuple(sl.get_shape())
                want = shapes.get(key)
                if want is not None and shape != want:
                    problems.append(
                        f"{key}: shape {shape} in {fname}, expected {want} from config.json"
                    )
    if problems:
        raise CheckpointMismatchError(
            f"tensor shape mismatch in {hf_dir}:\n  " + "\n  ".join(problems)
        )
    _check_key_sets(args, set(weight_map), hf_dir)
    return args, HFSource(config_text, weight_map, dtypes, hf_dir, sharded)


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


def _safetensors_dtype_name(code: str) -> str:
    return {
        "F32": "float32",
        "BF16": "bfloat16",
        "F16": "float16",
        "F64": "float64",
        "I64": "int64",
        "I32": "int32",
    }.get(code, code)


def _check_key_sets(args: ModelArgs, present: set[str], where: Path) -> None:
    expected = {k for keys in key_map(args).values() for k in keys}
    if args.tie_embeddings:
        # A tied checkpoint may or may not store lm_head.weight; both are accepted.
        expected.discard("lm_head.weight")
        present = present - {"lm_head.weight"}
    missing = sorted(expected - present)
    unexpected = sorted(present - expected)
    if missing or unexpected:
        lines = []
        if missing:
            lines.append(f"missing tensors ({len(missing)}): " + ", ".join(missing))
        if unexpected:
            lines.append(f"unexpected tensors ({len(unexpected)}): " + ", ".join(unexpected))
        raise CheckpointMismatchError(
            f"{where} does not match its config.json (model_type llama, "
            f"{args.n_layers} layers, tie_word_embeddings={args.tie_embeddings}):\n  "
            + "\n  ".join(lines)
        )


class _ShardReader:
    """Opens safetensors files lazily and keeps them open while a model is assembled."""

    def __init__(self, root: Path, weight_map: dict[str, str]) -> None:
        self.root = root
        self.weight_map = weight_map
        self._open: dict[str, Any] = {}

    def get(self, key: str) -> torch.Tensor:
        fname = self.weight_map[key]
        if fname not in self._open:
            self._open[fname] = open_safetensors(self.root / fname)
        tensor = self._open[fname].get_tensor(key)
        check_finite(key, tensor, self.root / fname)
        return tensor

    def close(self) -> None:
        self._open.clear()


def _build_meta(args: ModelArgs) -> Transformer:
    with torch.device("meta"):
        return Transformer(args)


def _native_tensor_names(args: ModelArgs) -> list[str]:
    names = list(key_map(args))
    if args.tie_embeddings:
        names.remove("output.weight")
    return names


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
        to export it back (see :func:`longtune.export.hf.save_model`).
    """
    path = Path(path)
    want = parse_dtype(dtype)
    if is_native_dir(path):
        args, source, native_map = read_native_meta(path)
        reader = _ShardReader(path, native_map)
        names = _native_tensor_names(args)
        fetch = reader.get
    else:
        args, source = read_hf_source(path)
        reader = _ShardReader(path, source.weight_map)
        kmap = key_map(args)
        names = _native_tensor_names(args)

        def fetch(native: str) -> torch.Tensor:
            parts = [reader.get(k) for k in kmap[native]]
            return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)

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
    reader = _ShardReader(hf_dir, source.weight_map)
    with atomic_dir(native_dir, kind="native", sources=[hf_dir], overwrite=overwrite) as tmp:
        names = _native_tensor_names(args)
        weight_map = _write_sharded(
            tmp,
            names,
            lambda n: torch.cat([reader.get(k) for k in kmap[n]], dim=0),
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


def copy_meta_files(src: Path, dst: Path) -> list[str]:
    """Copy the non-weight top-level files of a checkpoint folder (tokenizer, templates, configs)."""
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for p in sorted(src.iterdir()):
        if not p.is_file() or p.name.startswith(".") or p.name.endswith(WEIGHT_SUFFIXES):
            continue
        if p.name in (HF_INDEX, NATIVE_META, "hf_source.json"):  # longtune's own bookkeeping
            continue
        shutil.copy2(p, dst / p.name)
        copied.append(p.name)
    return copied


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
