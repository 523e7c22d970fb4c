"""The Hugging Face checkpoint format, both ways: the key map, reading, writing.

Reading (:func:`read_hf_source`, :class:`ShardReader`, :func:`read_native_tensor`): an HF
folder's config and tensor inventory are checked against each other (exact key set, shapes
from config.json) before any tensor is read, and tensors are then read one at a time from
their safetensors shard and fused into native ones (q/k/v into ``wqkv``, gate/up into
``w13``), so the whole model is never held twice.

Writing (:func:`save_model`, :func:`write_safetensors`): unfuse (:func:`hf_pieces`: the rows of
each HF tensor in the native ones), rename with the same map, and stream safetensors files —
header first, then tensor by tensor, byte for byte what ``safetensors.torch.save_file`` writes —
in the layout the source had (same file names and tensor-to-file map; a fresh layout with an
index when asked for a largest file size, or if the tensor set changed). Tensors are written in
the dtype each had in the source unless a dtype is asked for, so an untrained tensor comes back
bit-identical. ``config.json`` keeps the source's keys with the forms older readers need added
and a stale ``quantization_config`` dropped (:func:`export_config_text`), and the tokenizer
files, chat template and generation config are copied, readable by transformers 4 and 5
(:func:`serve_tokenizer_files`). :func:`hf_state_dict` is the whole-state form of the unfusing.
:class:`SafetensorsRows` reads rows of a file without a memory map.

:class:`HFSource` is everything needed to write a model back as its source was; it can be
saved into a folder (a run keeps its source this way) and read back without the source.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from longtune.fsutil import (
    OutputDirError,
    atomic_dir,
    check_output_dir,
    describe_os_error,
)
from longtune.model.args import ModelArgs
from longtune.model.checks import (
    ModelFolderError,
    check_finite,
    open_safetensors,
    read_json,
    read_model_config,
)

logger = logging.getLogger(__name__)

HF_INDEX = "model.safetensors.index.json"
HF_SINGLE = "model.safetensors"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5", ".ckpt")
SOURCE_FILE = "hf_source.json"
"""A saved :class:`HFSource`'s description (beside its non-weight files)."""
# longtune's own files, never copied as a model's non-weight files: the index (rewritten), the
# native format's metadata, a saved source's description.
_BOOKKEEPING = (HF_INDEX, "longtune.json", SOURCE_FILE)


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

    def save(self, folder: Path) -> None:
        """Keep this source in ``folder``: its non-weight files and :data:`SOURCE_FILE`."""
        copy_meta_files(self.meta_dir, folder)
        (folder / SOURCE_FILE).write_text(json.dumps(self.to_json(), indent=1))

    @classmethod
    def load(cls, folder: Path) -> HFSource:
        """The source kept in ``folder`` by :meth:`save`.

        Raises:
            FileNotFoundError: ``folder`` holds no saved source.
        """
        file = folder / SOURCE_FILE
        if not file.is_file():
            raise FileNotFoundError(f"{folder} holds no saved model source (no {SOURCE_FILE})")
        return cls.from_json(json.loads(file.read_text()), folder)

    @staticmethod
    def saved_in(folder: Path) -> bool:
        """True when ``folder`` holds a source kept by :meth:`save`."""
        return (folder / SOURCE_FILE).is_file()


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


def read_hf_source(hf_dir: str | Path) -> tuple[ModelArgs, HFSource]:
    """Read config and tensor inventory of an HF folder (no tensor data is loaded)."""
    hf_dir = Path(hf_dir)
    config_text, args = read_model_config(hf_dir)
    index = hf_dir / HF_INDEX
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ModelFolderError(f"{index}: missing key 'weight_map'")
        outside = [f for f in weight_map.values() if not _plain_file_name(f)]
        if outside:
            raise ModelFolderError(
                f"{index}: weight_map names {outside[0]!r}, which is not a file of {hf_dir} "
                "(shards are plain file names inside the model folder)"
            )
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


def _plain_file_name(name: object) -> bool:
    """A file name without a folder part (no ``/``, ``..`` or absolute path)."""
    return isinstance(name, str) and name not in ("", ".", "..") and Path(name).name == name


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


class ShardReader:
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


def native_tensor_names(args: ModelArgs) -> list[str]:
    """The native tensors a checkpoint holds (no ``output.weight`` when it is tied)."""
    names = list(key_map(args))
    if args.tie_embeddings:
        names.remove("output.weight")
    return names


def read_native_tensor(reader: ShardReader, hf_keys: list[str]) -> torch.Tensor:
    """A native tensor from its HF pieces (fused along dim 0 in key-map order)."""
    parts = [reader.get(k) for k in hf_keys]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)


def copy_meta_files(src: Path, dst: Path) -> list[str]:
    """Copy the non-weight top-level files of a checkpoint folder (tokenizer, templates, configs)."""
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for p in sorted(src.iterdir()):
        if not p.is_file() or p.name.startswith(".") or p.name.endswith(WEIGHT_SUFFIXES):
            continue
        if p.name in _BOOKKEEPING:
            continue
        shutil.copy2(p, dst / p.name)
        copied.append(p.name)
    return copied


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
    """An :class:`HFSource` as given, or read from an HF checkpoint folder."""
    return source if isinstance(source, HFSource) else read_hf_source(source)[1]


def save_model(
    model: torch.nn.Module | None,
    out_dir: str | Path,
    source: str | Path | HFSource | None = None,
    dtype: str | torch.dtype | None = None,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    max_shard_bytes: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the model as an HF checkpoint folder, one tensor at a time.

    Each safetensors file is streamed: its header first, then each tensor as it is made (read,
    unfused, cast), so what is held is at most two native tensors (a fused one whose pieces are
    not yet all written, and the one being written), whatever the file or model size;
    ``state_dict`` may be a lazy mapping that reads each tensor when asked (a checkpoint on disk:
    :class:`longtune.checkpoint.CheckpointTensors`). The files are byte for byte what
    ``safetensors.torch.save_file`` writes for the same tensors.

    Args:
        model: a native ``Transformer`` (its ``state_dict()`` must be full, i.e. not sharded;
            pass ``state_dict`` for a gathered FSDP state instead).
        out_dir: destination folder; written to a temporary sibling then renamed. It must be
            new, empty, or (with ``overwrite``) an earlier longtune output, and not the source
            folder nor inside it (see :func:`longtune.fsutil.atomic_dir`).
        source: the HF folder the model came from (or its :class:`HFSource`); defaults to
            ``model.hf_source`` set by :func:`longtune.load_model`. Supplies config.json,
            tokenizer files and the original tensor layout and dtypes.
        dtype: write every tensor in this dtype (and record it in config.json); default keeps
            each tensor's source dtype.
        state_dict: native tensors by name to write instead of ``model.state_dict()``, read one
            at a time.
        max_shard_bytes: write files of at most this size (a tensor larger than it gets a file
            of its own) with an index; default: the source's files and tensor-to-file map.
        overwrite: replace ``out_dir`` if longtune wrote it before.

    Returns:
        ``out_dir``.
    """
    if source is None:
        source = getattr(model, "hf_source", None)
        if source is None:
            raise ValueError(
                "save_model needs source=<the HF folder the model came from> "
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
    pieces = _Pieces(native, args, with_lm_head="lm_head.weight" in src.weight_map)
    shapes = hf_shapes(args)
    specs = {
        key: (want or parse_dtype(src.dtypes.get(key)) or pieces.dtype(key), shapes[key])
        for key in pieces.keys()
    }
    if max_shard_bytes is None and set(specs) == set(src.weight_map):
        weight_map = dict(src.weight_map)
    else:
        weight_map = _plan_layout(specs, max_shard_bytes or DEFAULT_MAX_SHARD_BYTES)

    out_dir = Path(out_dir)
    with atomic_dir(out_dir, kind="hf", sources=sources, overwrite=overwrite) as tmp:
        _write_tensors(tmp, weight_map, specs, pieces, sharded=src.sharded, shown_as=out_dir)
        copy_meta_files(src.meta_dir, tmp)
        config_text, changes = export_config_text(src.config_text, want)
        (tmp / "config.json").write_text(config_text)
        changes += serve_tokenizer_files(tmp)
    if changes:
        logger.info("export %s: %s", out_dir, "; ".join(changes))
    return out_dir


def _write_tensors(
    folder: Path,
    weight_map: dict[str, str],
    specs: dict[str, tuple[torch.dtype, tuple[int, ...]]],
    pieces: _Pieces,
    sharded: bool,
    shown_as: Path,
) -> None:
    """The safetensors files of ``weight_map`` (HF key -> file name) in ``folder``, each
    streamed from ``pieces``, and the index when there are several files (or the source had
    one); errors name ``shown_as``, the folder the user asked for."""
    by_file: dict[str, list[str]] = {}
    for key, fname in weight_map.items():
        by_file.setdefault(fname, []).append(key)
    total = 0
    for fname, keys in by_file.items():
        file_specs = {key: specs[key] for key in keys}
        total += write_safetensors(folder / fname, file_specs, pieces.take, shown_as)
    if len(by_file) > 1 or sharded:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (folder / HF_INDEX).write_text(json.dumps(index, indent=2) + "\n")


def hf_pieces(args: ModelArgs, with_lm_head: bool) -> dict[str, tuple[str, int, int]]:
    """Where each HF tensor lies in the native ones: HF key -> (native name, first row, rows).

    A fused native tensor holds its HF pieces one after another along dim 0 (key-map order);
    with tied embeddings ``lm_head.weight`` (when the checkpoint stores it) is the embedding.
    """
    shapes = hf_shapes(args)
    where: dict[str, tuple[str, int, int]] = {}
    for name, hf_keys in key_map(args).items():
        if name == "output.weight" and args.tie_embeddings:
            if with_lm_head:
                where["lm_head.weight"] = ("tok_embeddings.weight", 0, args.vocab_size)
            continue
        start = 0
        for key in hf_keys:
            where[key] = (name, start, shapes[key][0])
            start += shapes[key][0]
    return where


class _Pieces:
    """The HF tensors of a native state, made one at a time: each native tensor is read when
    its first piece is asked for and kept only until its last piece is taken."""

    def __init__(
        self, native: Mapping[str, torch.Tensor], args: ModelArgs, with_lm_head: bool
    ) -> None:
        self.native = native
        self.where = hf_pieces(args, with_lm_head)
        self.left: dict[str, int] = {}
        for name, _, _ in self.where.values():
            self.left[name] = self.left.get(name, 0) + 1
        self.held: dict[str, torch.Tensor] = {}

    def keys(self) -> list[str]:
        return list(self.where)

    def dtype(self, key: str) -> torch.dtype:
        """The dtype of the native tensor behind ``key`` (read only when it must be)."""
        name = self.where[key][0]
        dtype_of = getattr(self.native, "dtype_of", None)
        return dtype_of(name) if dtype_of else self.native[name].dtype

    def take(self, key: str) -> torch.Tensor:
        name, start, rows = self.where[key]
        if name not in self.held:
            self.held[name] = self.native[name].detach()
        t = self.held[name]
        self.left[name] -= 1
        if self.left[name] == 0:
            del self.held[name]
        return t if rows == t.shape[0] else t.narrow(0, start, rows)


class SafetensorsRows:
    """Tensors of one safetensors file, read by rows with plain reads.

    No memory map: the pages of a mapped file count as the reader's resident memory for as long
    as it is open, so reading a whole model through one looks like holding it.
    """

    _DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16}
    _DTYPES |= {"F16": torch.float16}

    def __init__(self, file: Path) -> None:
        self.file = file
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            self.header = json.loads(f.read(n))
        self.data_start = 8 + n

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.header[key]["shape"])

    def read(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` of ``key`` (dim 0)."""
        entry = self.header[key]
        dtype, shape = self._DTYPES[entry["dtype"]], entry["shape"]
        row_bytes = math.prod(shape[1:]) * dtype.itemsize
        out = torch.empty((stop - start, *shape[1:]), dtype=dtype)
        with open(self.file, "rb") as f:
            f.seek(self.data_start + entry["data_offsets"][0] + start * row_bytes)
            buffer = out.reshape(-1).view(torch.uint8).numpy()
            if f.readinto(buffer) != buffer.nbytes:
                raise ValueError(f"{self.file}: {key} is cut short")
        return out


# safetensors' names of the dtypes an export writes, and their rank in its file order (the
# largest dtype first: safetensors sorts tensors by dtype, descending, then by name).
_SAFETENSORS_DTYPES = {
    torch.float64: ("F64", 3),
    torch.float32: ("F32", 2),
    torch.bfloat16: ("BF16", 1),
    torch.float16: ("F16", 0),
}


def write_safetensors(
    file: Path,
    specs: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
    take: Callable[[str], torch.Tensor],
    out_dir: Path,
) -> int:
    """Write one safetensors file tensor by tensor: the header from ``specs`` first, then each
    tensor's bytes as ``take(name)`` makes it, cast to its dtype.

    The layout is ``safetensors.torch.save_file``'s (tensors by dtype, descending, then name;
    the header padded with spaces to 8 bytes; metadata ``{"format": "pt"}``), so the bytes are
    the same. A full disk or a read-only folder is one line
    (:class:`~longtune.fsutil.OutputDirError`).

    Args:
        file: the file to write.
        specs: tensor name -> (dtype, shape).
        take: ``take(name)`` returns the tensor (any dtype, any device; shape as in ``specs``).
        out_dir: the folder being exported (named in the error).

    Returns:
        The bytes of tensor data written.
    """
    order = sorted(specs, key=lambda k: (-_SAFETENSORS_DTYPES[specs[k][0]][1], k))
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key in order:
        dtype, shape = specs[key]
        nbytes = math.prod(shape) * dtype.itemsize
        code = _SAFETENSORS_DTYPES[dtype][0]
        header[key] = {
            "dtype": code,
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    head = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    head += b" " * (-len(head) % 8)
    try:
        with open(file, "wb") as f:
            f.write(struct.pack("<Q", len(head)) + head)
            for key in order:
                dtype, shape = specs[key]
                t = take(key).to(device="cpu", dtype=dtype).contiguous()
                if tuple(t.shape) != tuple(shape):
                    raise ValueError(f"{key}: shape {tuple(t.shape)}, expected {tuple(shape)}")
                f.write(t.reshape(-1).view(torch.uint8).numpy().data)
                del t
    except OSError as exc:
        exc.filename = str(Path(out_dir).absolute().parent)  # where the space is missing
        raise OutputDirError(describe_os_error(exc, "the export")) from None
    return offset


def export_config_text(config_text: str, dtype: torch.dtype | None) -> tuple[str, list[str]]:
    """``config.json`` of an export: the source's keys, readable by every server.

    A ``quantization_config`` is dropped (the export's weights are plain floats; a stale one, e.g.
    ``gguf`` from a model first read from a GGUF file, makes vLLM and llama.cpp's converter
    refuse the folder). The forms older readers need are added beside transformers 5's when
    missing: ``torch_dtype`` beside ``dtype``, ``rope_theta`` and ``rope_scaling`` beside
    ``rope_parameters`` (transformers 4 reads only those, and without them falls back to its
    default RoPE theta). With ``dtype``, the dtype fields say it. A config that needs none of
    this is returned verbatim.

    Returns:
        The text, and one line per change made (for the log).
    """
    cfg = json.loads(config_text)
    changes = []
    if "quantization_config" in cfg:
        method = (cfg.pop("quantization_config") or {}).get("quant_method", "?")
        changes.append(f"dropped quantization_config ({method}): the weights are plain floats")
    if dtype is not None:
        name = str(dtype).removeprefix("torch.")
        for key in [k for k in ("torch_dtype", "dtype") if k in cfg] or ["torch_dtype"]:
            cfg[key] = name
        changes.append(f"dtype {name}")
    if "dtype" in cfg and "torch_dtype" not in cfg:
        cfg["torch_dtype"] = cfg["dtype"]
        changes.append("added torch_dtype beside dtype")
    rope = cfg.get("rope_parameters")
    if isinstance(rope, dict):
        if "rope_theta" not in cfg and "rope_theta" in rope:
            cfg["rope_theta"] = rope["rope_theta"]
            changes.append("added rope_theta beside rope_parameters")
        if "rope_scaling" not in cfg:
            scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
            plain = scaling in ({}, {"rope_type": "default"})
            cfg["rope_scaling"] = None if plain else scaling
            changes.append("added rope_scaling beside rope_parameters")
    if not changes:
        return config_text, changes
    return json.dumps(cfg, indent=2) + "\n", changes


# Tokenizer classes transformers 5 writes that transformers 4 does not have, and the class that
# transformers 4 reads the same tokenizer.json with.
_TRANSFORMERS5_ONLY_TOKENIZERS = {"TokenizersBackend": "PreTrainedTokenizerFast"}


def serve_tokenizer_files(folder: Path) -> list[str]:
    """Make an export's tokenizer files readable by transformers 4 and 5 alike.

    The chat template is put both in ``chat_template.jinja`` (transformers 5, llama.cpp's
    converter) and in ``tokenizer_config.json`` (transformers 4, vLLM's older images) when only
    one has it; a tokenizer class only transformers 5 has is named by the class transformers 4
    reads the same ``tokenizer.json`` with, and a list of ``extra_special_tokens`` is given under
    the name transformers 4 reads a list by (``additional_special_tokens``); transformers 5 reads
    both names.

    Returns:
        One line per change made.
    """
    file, jinja = folder / "tokenizer_config.json", folder / "chat_template.jinja"
    if not file.is_file():
        return []
    config = json.loads(file.read_text(encoding="utf-8"))
    changes = []
    old_class = config.get("tokenizer_class")
    if old_class in _TRANSFORMERS5_ONLY_TOKENIZERS and (folder / "tokenizer.json").is_file():
        config["tokenizer_class"] = _TRANSFORMERS5_ONLY_TOKENIZERS[old_class]
        changes.append(f"tokenizer_class {old_class} -> {config['tokenizer_class']}")
    extra = config.get("extra_special_tokens")
    if isinstance(extra, list) and "additional_special_tokens" not in config:
        # transformers 5's list form; transformers 4 takes this key for a dict and fails.
        config["additional_special_tokens"] = config.pop("extra_special_tokens")
        changes.append("extra_special_tokens -> additional_special_tokens")
    template = config.get("chat_template")
    if jinja.is_file() and template is None:
        config["chat_template"] = jinja.read_text(encoding="utf-8")
        changes.append("chat template copied into tokenizer_config.json")
    elif isinstance(template, str) and not jinja.exists():
        jinja.write_text(template, encoding="utf-8")
        changes.append("chat template written to chat_template.jinja")
    if changes:
        file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return changes


def _plan_layout(
    specs: Mapping[str, tuple[torch.dtype, tuple[int, ...]]], max_shard_bytes: int
) -> dict[str, str]:
    """Tensor -> file for a fresh layout: files of at most ``max_shard_bytes`` in tensor order
    (a larger tensor alone in its file), ``model.safetensors`` when one file holds all."""
    groups: list[list[str]] = [[]]
    size = 0
    for key, (dtype, shape) in specs.items():
        nbytes = math.prod(shape) * dtype.itemsize
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
