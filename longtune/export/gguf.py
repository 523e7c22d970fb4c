"""GGUF export: one ``.gguf`` file for llama.cpp and Ollama from an HF Llama folder.

Mirrors llama.cpp's own converter (``convert_hf_to_gguf.py``, ``LlamaModel``): the same tensor
names, the Q/K rows permuted from HF's rotate-half layout to GGUF's interleaved one, no
``output`` tensor when the embeddings are tied, a ``rope_freqs`` tensor for ``llama3`` rope
scaling, norms and other 1-D tensors kept in float32, and the tokenizer described the way
llama.cpp reads it (``gpt2`` byte-level BPE, its pre-tokenizer found by hashing the ids of
llama.cpp's check text, token types from the added tokens, merges and special ids through
``gguf.SpecialVocab``).

The file is written tensor by tensor (headers first, then each tensor read from safetensors,
converted and written): peak memory is about one tensor. It goes to a temporary sibling that
is renamed into place when complete.
"""

from __future__ import annotations

import math
import os
import re
import uuid
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path

import gguf
import numpy as np
import torch

from longtune.fsutil import OutputDirError, pid_alive
from longtune.model.args import ModelArgs
from longtune.model.checks import check_finite
from longtune.model.hf import HFSource, SafetensorsRows, read_hf_source

GGUF_TYPES = ("auto", "f32", "f16", "bf16", "q8_0")
"""``gguf_type`` values: ``auto`` keeps the HF tensors' own float type (f32, bf16 or f16)."""

_QTYPE = gguf.GGMLQuantizationType
_FILE_TYPES = {
    "f32": (gguf.LlamaFileType.ALL_F32, _QTYPE.F32),
    "f16": (gguf.LlamaFileType.MOSTLY_F16, _QTYPE.F16),
    "bf16": (gguf.LlamaFileType.MOSTLY_BF16, _QTYPE.BF16),
    "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, _QTYPE.Q8_0),
}
_AUTO_TYPES = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}

TENSOR_MAP: dict[str, str] = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.layers.{}.input_layernorm.weight": "blk.{}.attn_norm.weight",
    "model.layers.{}.self_attn.q_proj.weight": "blk.{}.attn_q.weight",
    "model.layers.{}.self_attn.k_proj.weight": "blk.{}.attn_k.weight",
    "model.layers.{}.self_attn.v_proj.weight": "blk.{}.attn_v.weight",
    "model.layers.{}.self_attn.o_proj.weight": "blk.{}.attn_output.weight",
    "model.layers.{}.self_attn.q_proj.bias": "blk.{}.attn_q.bias",
    "model.layers.{}.self_attn.k_proj.bias": "blk.{}.attn_k.bias",
    "model.layers.{}.self_attn.v_proj.bias": "blk.{}.attn_v.bias",
    "model.layers.{}.self_attn.o_proj.bias": "blk.{}.attn_output.bias",
    "model.layers.{}.post_attention_layernorm.weight": "blk.{}.ffn_norm.weight",
    "model.layers.{}.mlp.gate_proj.weight": "blk.{}.ffn_gate.weight",
    "model.layers.{}.mlp.up_proj.weight": "blk.{}.ffn_up.weight",
    "model.layers.{}.mlp.down_proj.weight": "blk.{}.ffn_down.weight",
    "model.layers.{}.mlp.gate_proj.bias": "blk.{}.ffn_gate.bias",
    "model.layers.{}.mlp.up_proj.bias": "blk.{}.ffn_up.bias",
    "model.layers.{}.mlp.down_proj.bias": "blk.{}.ffn_down.bias",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
"""HF tensor name -> GGUF tensor name (``{}``: the layer index), llama.cpp's ``llama`` names."""

CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis "
    "concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 "
    "កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български "
    "''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not "
    "sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
"""llama.cpp's ``chktxt``: the sha256 of ``str(tokenizer.encode(CHECK_TEXT))`` names the
pre-tokenizer (``get_vocab_base_pre`` in ``convert_hf_to_gguf.py``)."""

PRE_TOKENIZERS: dict[str, str] = {
    # Meta-Llama-3-8B (its tokenizer adds <|begin_of_text|>)
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    # Smaug-Llama-3-70B-Instruct: the Llama 3 tokenizer without the BOS post-processor
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",
    # SmolLM-135M; SmolLM2 has the same tokenizer
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
}
"""Check-text hash -> llama.cpp's ``tokenizer.ggml.pre`` name, copied from llama.cpp's
``get_vocab_base_pre`` for the byte-level BPE tokenizers of Llama-architecture models that
longtune supports. Add one by copying its line from there."""


@dataclass
class _Entry:
    """One tensor of the file: where it comes from and how it is stored."""

    name: str
    shape: tuple[int, ...]
    qtype: gguf.GGMLQuantizationType
    hf_name: str | None = None
    data: torch.Tensor | None = None
    """The tensor itself when it is computed here (``rope_freqs``), not read."""

    @property
    def nbytes(self) -> int:
        block, size = gguf.GGML_QUANT_SIZES[self.qtype]
        return math.prod(self.shape) // block * size


def export_gguf(
    hf_dir: str | Path,
    out_file: str | Path,
    gguf_type: str = "auto",
    overwrite: bool = False,
    name: str | None = None,
) -> Path:
    """Write an HF Llama folder as one GGUF file (llama.cpp, Ollama).

    Tensors are read one at a time, so memory stays at about one tensor; the file is written
    to a temporary sibling and renamed into place when complete.

    Args:
        hf_dir: an HF folder: config.json (``model_type: llama``), ``model.safetensors`` or
            shards with their index, and a byte-level BPE ``tokenizer.json`` (Llama 3,
            SmolLM / SmolLM2).
        out_file: the ``.gguf`` file to write.
        gguf_type: ``auto`` (the HF tensors' own type: f32, bf16 or f16; f32 when they are
            mixed), ``f32``, ``f16``, ``bf16`` or ``q8_0``. Norms and other 1-D tensors stay
            float32, as llama.cpp keeps them.
        overwrite: replace ``out_file`` if it is a GGUF file; without it an existing file is
            refused.
        name: the model's name (``general.name``); default: the folder's name, or its run's
            for a run's ``hf/``.

    Returns:
        ``out_file``.

    Raises:
        ValueError: an unknown ``gguf_type``, a refused output, a folder that is not a Llama
            model, or a tokenizer llama.cpp's pre-tokenizers are not known for (one line each).
    """
    hf_dir, out = Path(hf_dir), Path(out_file)
    if gguf_type not in GGUF_TYPES:
        raise ValueError(f"unknown GGUF type {gguf_type!r}; choose one of {', '.join(GGUF_TYPES)}")
    check_gguf_output(out, hf_dir, overwrite)
    args, source = read_hf_source(hf_dir)
    shapes = _hf_shapes(source)
    file_type, qtype = _FILE_TYPES[_resolve_type(gguf_type, source, shapes)]
    entries = _plan(args, source, shapes, qtype)

    writer = gguf.GGUFWriter(path=None, arch="llama")
    _add_model_metadata(writer, args, source, name or _model_name(hf_dir), file_type)
    _add_tokenizer(writer, hf_dir, args.vocab_size)
    for e in entries:
        writer.add_tensor_info(e.name, e.shape, np.dtype(np.float32), e.nbytes, raw_dtype=e.qtype)

    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    reader = _Reader(hf_dir, source.weight_map)
    try:
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for e in entries:
            tensor = e.data if e.data is not None else _read(reader, e.hf_name, args)
            writer.write_tensor_data(_encode(tensor, e.qtype))
        writer.flush()
        os.fsync(writer.fout[0].fileno())
        writer.close()
        check_gguf_output(out, hf_dir, overwrite)  # again: the path may have changed meanwhile
        os.replace(tmp, out)
    finally:
        writer.close()
        tmp.unlink(missing_ok=True)
    return out


def check_gguf_source(model_dir: str | Path) -> None:
    """Refuse, in one line, a model that cannot be written as GGUF: not a Llama folder, or a
    tokenizer whose llama.cpp pre-tokenizer is not known. Reads only the config and the
    tokenizer, so a run that asks for a GGUF export checks it before training.

    Raises:
        ValueError, FileNotFoundError: what would stop :func:`export_gguf`, in one line.
    """
    from transformers import AutoTokenizer

    model_dir = Path(model_dir)
    read_hf_source(model_dir)
    if not (model_dir / "tokenizer.json").is_file():
        raise FileNotFoundError(
            f"no tokenizer.json in {model_dir}; GGUF export needs a byte-level BPE tokenizer "
            "(Llama 3, SmolLM2)"
        )
    _pre_tokenizer(AutoTokenizer.from_pretrained(model_dir), model_dir)


def check_gguf_output(out: Path, hf_dir: Path, overwrite: bool) -> None:
    """Refuse, in one line, an output that is a folder, inside the source folder, or an
    existing file (with ``overwrite``: one that is not a GGUF file).

    Raises:
        OutputDirError: naming the path and the fix.
    """
    resolved, source = out.resolve(), hf_dir.resolve()
    if resolved == source or source in resolved.parents:
        raise OutputDirError(
            f"output file {out} is inside the source folder {hf_dir}; write it beside it instead"
        )
    if out.is_dir():
        raise OutputDirError(f"output {out} is a folder; give the path of the .gguf file to write")
    if not (out.exists() or out.is_symlink()):
        return
    if not overwrite:
        raise OutputDirError(
            f"output file {out} exists; to replace a GGUF file pass --overwrite on the command "
            "line (overwrite=True in Python), or choose another name"
        )
    if out.is_symlink() or not out.is_file() or not _is_gguf(out):
        raise OutputDirError(
            f"output {out} exists and is not a GGUF file; longtune replaces only a GGUF file, "
            "choose another name"
        )


def _is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def _remove_stale(out: Path) -> None:
    """Remove temporary siblings (``.NAME.tmp-PID-XXXXXXXX``) of writers that were killed."""
    pattern = re.compile(r"\." + re.escape(out.name) + r"\.tmp-(\d+)-[0-9a-f]{8}")
    for sibling in out.parent.iterdir():
        match = pattern.fullmatch(sibling.name)
        if match and sibling.is_file() and not pid_alive(int(match.group(1))):
            sibling.unlink(missing_ok=True)


def _resolve_type(gguf_type: str, source: HFSource, shapes: dict[str, tuple[int, ...]]) -> str:
    """``auto``: the one float type of the HF folder's 2-D tensors, f32 when they differ."""
    if gguf_type != "auto":
        return gguf_type
    names = {source.dtypes[k] for k in source.weight_map if len(shapes[k]) >= 2}
    if len(names) == 1 and (name := names.pop()) in _AUTO_TYPES:
        return _AUTO_TYPES[name]
    return "f32"


def _plan(
    args: ModelArgs,
    source: HFSource,
    shapes: dict[str, tuple[int, ...]],
    qtype: gguf.GGMLQuantizationType,
) -> list[_Entry]:
    """Every tensor of the file, in file order (llama.cpp's: ``rope_freqs``, then the HF
    tensors block by block), with its GGUF name, shape and type."""
    names = {hf: name for hf, name in TENSOR_MAP.items() if hf.startswith("model.embed")}
    for i in range(args.n_layers):
        names |= {hf.format(i): name.format(i) for hf, name in TENSOR_MAP.items() if "{}" in hf}
    names |= {hf: name for hf, name in TENSOR_MAP.items() if "{}" not in hf}
    entries = []
    rope = _rope_factors(args)
    if rope is not None:
        entries.append(_Entry("rope_freqs.weight", tuple(rope.shape), _QTYPE.F32, data=rope))
    for hf, name in names.items():
        if hf not in source.weight_map or (hf == "lm_head.weight" and args.tie_embeddings):
            continue
        shape = shapes[hf]
        entries.append(_Entry(name, shape, _tensor_type(name, shape, qtype), hf_name=hf))
    return entries


def _hf_shapes(source: HFSource) -> dict[str, tuple[int, ...]]:
    """Shape of every tensor, from the safetensors headers."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for file in sorted(set(source.weight_map.values())):
        with safe_open(source.meta_dir / file, framework="pt") as f:
            for key in f.keys():
                shapes[key] = tuple(f.get_slice(key).get_shape())
    return shapes


def _tensor_type(
    name: str, shape: tuple[int, ...], qtype: gguf.GGMLQuantizationType
) -> gguf.GGMLQuantizationType:
    """llama.cpp's choice: 1-D tensors and norms in f32; a row that does not fill whole
    quantization blocks in f16."""
    if len(shape) <= 1 or name.endswith("_norm.weight"):
        return _QTYPE.F32
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    return qtype if shape[-1] % block == 0 else _QTYPE.F16


def _rope_factors(args: ModelArgs) -> torch.Tensor | None:
    """llama.cpp's ``rope_freqs`` for ``llama3`` scaling: the divisor of each base frequency.

    ``original_max_position_embeddings`` comes from the rope parameters, as transformers
    reads it (llama.cpp's converter looks for it at the top of config.json, default 8192).
    """
    rope = args.rope_scaling
    if rope is None:
        return None
    dim = args.head_dim
    freqs = 1.0 / (args.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_context = rope.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_context / low, old_context / high
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32)


class _Reader:
    """Whole tensors of an HF folder, read with plain reads (a memory map would keep every
    page read as this process's resident memory until the file is closed)."""

    def __init__(self, folder: Path, weight_map: dict[str, str]) -> None:
        self.folder, self.weight_map = folder, weight_map
        self.files: dict[str, SafetensorsRows] = {}

    def get(self, key: str) -> torch.Tensor:
        name = self.weight_map[key]
        if name not in self.files:
            self.files[name] = SafetensorsRows(self.folder / name)
        file = self.files[name]
        tensor = file.read(key, 0, file.shape(key)[0])
        check_finite(key, tensor, self.folder / name)
        return tensor


def _read(reader: _Reader, hf_name: str | None, args: ModelArgs) -> torch.Tensor:
    """One HF tensor, Q and K rows permuted as llama.cpp's ``LlamaModel.permute`` does."""
    assert hf_name is not None
    tensor = reader.get(hf_name)
    if ".self_attn.q_proj." in hf_name:
        return _permute(tensor, args.n_heads)
    if ".self_attn.k_proj." in hf_name:
        return _permute(tensor, args.n_kv_heads)
    return tensor


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rotate-half (HF) to interleaved (GGUF) rows within each head."""
    # (n_head, 2, head_dim // 2, ...) -> (n_head, head_dim // 2, 2, ...)
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


_QUANTIZE_CHUNK = 1 << 24
"""Values quantized at once (64 MB in float32): the quantizer's temporaries stay that small."""


def _encode(tensor: torch.Tensor, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """The tensor's bytes in the file's type (float casts round to nearest even, as torch's);
    a quantized one is quantized a chunk of rows at a time."""
    if qtype == _QTYPE.F32:
        return tensor.to(torch.float32).contiguous().numpy()
    if qtype == _QTYPE.F16:
        return tensor.to(torch.float16).contiguous().numpy()
    if qtype == _QTYPE.BF16:
        return tensor.to(torch.bfloat16).contiguous().view(torch.int16).numpy()
    rows = tensor.reshape(-1, tensor.shape[-1])
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    out = np.empty((rows.shape[0], rows.shape[1] // block * size), dtype=np.uint8)
    step = max(1, _QUANTIZE_CHUNK // rows.shape[1])
    for start in range(0, rows.shape[0], step):
        chunk = rows[start : start + step].to(torch.float32).numpy()
        out[start : start + step] = gguf.quants.quantize(chunk, qtype)
    return out


def _model_name(hf_dir: Path) -> str:
    """The folder's name; a run's ``hf/`` export is named for its run folder."""
    folder = hf_dir.resolve()
    return folder.parent.name if folder.name == "hf" else folder.name


def _add_model_metadata(
    w: gguf.GGUFWriter, args: ModelArgs, source: HFSource, name: str, file_type: int
) -> None:
    """``general.*`` and ``llama.*`` keys, as llama.cpp's ``TextModel`` and ``LlamaModel``
    write them."""
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_file_type(file_type)
    w.add_vocab_size(args.vocab_size)
    w.add_context_length(args.max_seq_len)
    w.add_embedding_length(args.dim)
    w.add_block_count(args.n_layers)
    w.add_feed_forward_length(args.ffn_dim)
    w.add_head_count(args.n_heads)
    w.add_head_count_kv(args.n_kv_heads)
    w.add_rope_freq_base(args.rope_theta)
    w.add_layer_norm_rms_eps(args.norm_eps)
    w.add_rope_dimension_count(args.head_dim)
    if source.config.get("head_dim") is not None:
        w.add_key_length(args.head_dim)
        w.add_value_length(args.head_dim)


def _add_tokenizer(w: gguf.GGUFWriter, hf_dir: Path, vocab_size: int) -> None:
    """The vocabulary as llama.cpp's ``_set_vocab_gpt2`` writes it.

    Added tokens keep their text as the tokenizer decodes them; special ones (or ones that look
    special, ``<|...|>``) are CONTROL, the others USER_DEFINED; ids past the tokenizer are
    ``[PAD<id>]`` (UNUSED). Whether BOS / EOS are added is what the tokenizer does on a text.
    """
    from transformers import AutoTokenizer

    if not (hf_dir / "tokenizer.json").is_file():
        raise FileNotFoundError(
            f"no tokenizer.json in {hf_dir}; GGUF export needs a byte-level BPE tokenizer "
            "(Llama 3, SmolLM2)"
        )
    tok = AutoTokenizer.from_pretrained(hf_dir)
    pre = _pre_tokenizer(tok, hf_dir)
    vocab = tok.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise ValueError(
            f"tokenizer of {hf_dir} has token id {max(vocab.values())}, outside the model's "
            f"vocab_size {vocab_size}"
        )
    reverse = {i: t for t, i in vocab.items()}
    added = tok.get_added_vocab()
    decoder = tok.added_tokens_decoder
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        token = reverse.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        kind = gguf.TokenType.NORMAL
        if token in added:
            if not decoder[i].normalized:
                token = tok.decode(tok.encode(token, add_special_tokens=False))
            if decoder[i].special or (token.startswith("<|") and token.endswith("|>")):
                kind = gguf.TokenType.CONTROL
            else:
                kind = gguf.TokenType.USER_DEFINED
        tokens.append(token)
        types.append(kind)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)

    special = gguf.SpecialVocab(hf_dir, load_merges=True, n_vocab=vocab_size)
    plain, full = tok.encode("a", add_special_tokens=False), tok.encode("a")
    extra = len(full) > len(plain)
    special.add_special_token["bos"] = extra and full[0] == tok.bos_token_id
    special.add_special_token["eos"] = extra and full[-1] == tok.eos_token_id
    if not special.merges:
        raise ValueError(f"tokenizer.json of {hf_dir} has no BPE merges; GGUF export needs them")
    special.add_to_gguf(w, quiet=True)


def _pre_tokenizer(tok, hf_dir: Path) -> str:
    """llama.cpp's name of the tokenizer's pre-tokenizer, from the hash of the check text's ids."""
    digest = sha256(str(tok.encode(CHECK_TEXT)).encode()).hexdigest()
    name = PRE_TOKENIZERS.get(digest)
    if name is None:
        raise ValueError(
            f"the tokenizer of {hf_dir} is not one longtune knows llama.cpp's pre-tokenizer "
            f"for (check-text hash {digest[:16]}...); GGUF export supports Llama 3 and SmolLM2 "
            "tokenizers"
        )
    return name
