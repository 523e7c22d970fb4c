"""GGUF export (``longtune.export.gguf``, ``longtune export --format gguf``).

The files are read back by ``transformers`` (its GGUF loader undoes llama.cpp's Q/K permutation
and rebuilds the tokenizer from the metadata) and by :class:`Gguf`, a small reader of the format
written here (``gguf.GGUFReader`` takes 10-20 s to parse a real vocabulary; this one a fraction
of a second). transformers spends 25-50 s per model load on the same metadata, so the logits
round trips (f32, q8_0) are slow tests; bf16 and f16 are checked tensor by tensor against the HF
weights rounded to that type. The SmolLM2 files are written once for the module.
"""

from __future__ import annotations

import filecmp
import json
import shutil
import struct
from hashlib import sha256
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from helpers import make_hf_checkpoint, meta_llama31_config, rel_err
from safetensors import safe_open

from longtune.export.gguf import CHECK_TEXT, PRE_TOKENIZERS, export_gguf

CHAT = [
    {"role": "system", "content": "You answer in one line."},
    {"role": "user", "content": "Héllo wörld! 123 4567 — 😀 ok?\n\n   spaced\ttab"},
    {"role": "assistant", "content": "Fine: 42 × 3.14 = 131.88"},
    {"role": "user", "content": "東京 and 🦙🦙?"},
]
TEXT = "Unicode: naïve café 東京 😀🦙\n    indented   runs\t\ttabs 3.14159 1234567890 don't I'LL"

# Logit relative error against the float32 HF model (SmolLM2-135M, bf16 weights): f32 holds the
# weights exactly; q8_0 rounds each to 8 bits per block of 32 with one f16 scale.
LOGIT_BOUNDS = {"f32": 1e-5, "q8_0": 5e-2}
TYPES = ("f32", "bf16", "f16", "q8_0")


class Gguf:
    """Metadata, tensor types and tensor values of a GGUF file (format v3, little-endian)."""

    _SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?"}
    _SCALARS |= {10: "<Q", 11: "<q", 12: "<d"}

    def __init__(self, path: Path) -> None:
        self.path = path
        with open(path, "rb") as f:
            self._buf = f.read(64 << 20)  # metadata and tensor infos come first
        self._pos = 0
        magic, version, n_tensors, n_kv = struct.unpack_from("<4sIQQ", self._buf)
        assert (magic, version) == (b"GGUF", 3)
        self._pos = 24
        self.meta = {self._str(): self._value(self._u(4)) for _ in range(n_kv)}
        self.tensors: dict[str, tuple[gguf.GGMLQuantizationType, tuple[int, ...], int]] = {}
        for _ in range(n_tensors):
            name, dims = self._str(), self._u(4)
            shape = tuple(reversed([self._u(8) for _ in range(dims)]))  # numpy order
            self.tensors[name] = (gguf.GGMLQuantizationType(self._u(4)), shape, self._u(8))
        align = self.meta.get("general.alignment", 32)
        self._data = -(-self._pos // align) * align

    def _u(self, size: int) -> int:
        (value,) = struct.unpack_from("<I" if size == 4 else "<Q", self._buf, self._pos)
        self._pos += size
        return value

    def _str(self) -> str:
        n = self._u(8)
        self._pos += n
        return self._buf[self._pos - n : self._pos].decode("utf-8")

    def _value(self, kind: int):
        if kind == 8:
            return self._str()
        if kind == 9:
            item, n = self._u(4), self._u(8)
            return [self._value(item) for _ in range(n)]
        fmt = self._SCALARS[kind]
        (value,) = struct.unpack_from(fmt, self._buf, self._pos)
        self._pos += struct.calcsize(fmt)
        return value

    def type_of(self, name: str) -> str:
        return self.tensors[name][0].name

    def tensor(self, name: str) -> torch.Tensor:
        """The tensor in float32, in HF's (numpy) shape."""
        qtype, shape, offset = self.tensors[name]
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        rows = int(np.prod(shape[:-1]))
        raw = np.fromfile(
            self.path,
            dtype=np.uint8,
            count=rows * shape[-1] // block * size,
            offset=self._data + offset,
        )
        values = gguf.dequantize(raw.reshape(rows, -1), qtype)
        return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(shape)


def interleave(w: torch.Tensor, heads: int) -> torch.Tensor:
    """HF rotate-half rows -> llama.cpp's interleaved rows, per head (written independently of
    the exporter's reshape: row ``i`` of each half-head pairs with row ``i + d/2``)."""
    d = w.shape[0] // heads
    rows = [h * d + j for h in range(heads) for i in range(d // 2) for j in (i, i + d // 2)]
    return w[rows]


def load_gguf_model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()


def load_hf_model(folder: Path):
    """The HF folder's model in float32 (a stale ``quantization_config`` left by the GGUF the
    folder was built from is ignored)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = json.loads((folder / "config.json").read_text())
    cfg.pop("quantization_config", None)
    config = LlamaConfig(**cfg)
    return LlamaForCausalLM.from_pretrained(folder, config=config, dtype=torch.float32).eval()


def ids_of(encoding) -> list[int]:
    return list(encoding["input_ids"] if hasattr(encoding, "keys") else encoding)


@pytest.fixture(scope="module")
def smol(smollm2_dir, tmp_path_factory) -> dict[str, Path]:
    """SmolLM2 exported in every type (f32: 540 MB)."""
    out = tmp_path_factory.mktemp("smol-gguf")
    return {t: export_gguf(smollm2_dir, out / f"smollm2-{t}.gguf", t) for t in TYPES}


@pytest.fixture(scope="module")
def smol_ref(smollm2_dir) -> dict:
    """The HF folder's model in float32 and the chat prompt's ids by its tokenizer."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    prompt = ids_of(tok.apply_chat_template(CHAT, tokenize=True))
    return {"model": load_hf_model(smollm2_dir), "tok": tok, "prompt": prompt}


@pytest.mark.slow
@pytest.mark.parametrize("gguf_type", list(LOGIT_BOUNDS))
def test_smollm2_logits_match_the_hf_model(smol, smol_ref, gguf_type):
    ids = torch.tensor([smol_ref["prompt"]])
    model = load_gguf_model(smol[gguf_type])
    with torch.no_grad():
        got, want = model(ids).logits, smol_ref["model"](ids).logits
    err = rel_err(got, want)
    assert err <= LOGIT_BOUNDS[gguf_type], (gguf_type, err)
    if gguf_type == "q8_0":  # still the same model: the same next token almost everywhere
        agree = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
        assert agree >= 0.9, agree


@pytest.mark.slow
def test_smollm2_tokenizer_and_metadata_round_trip(smol, smol_ref):
    from transformers import AutoTokenizer

    path = smol["f32"]
    tok, hf = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name), smol_ref["tok"]
    assert ids_of(tok.apply_chat_template(CHAT, tokenize=True)) == smol_ref["prompt"]
    assert tok(TEXT)["input_ids"] == hf(TEXT)["input_ids"]
    assert tok.chat_template == hf.chat_template
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        assert getattr(tok, name) == getattr(hf, name), name

    meta = Gguf(path).meta
    assert meta["general.architecture"] == "llama"
    assert meta["tokenizer.ggml.pre"] == "smollm"
    assert meta["tokenizer.ggml.model"] == "gpt2"
    assert meta["tokenizer.ggml.add_bos_token"] is False
    assert meta["llama.context_length"] == 8192
    assert meta["llama.attention.head_count_kv"] == 3
    assert meta["llama.rope.freq_base"] == 100000.0
    assert not [k for k in meta if "quantiz" in k and k != "general.quantization_version"]


@pytest.mark.slow
def test_smollm2_tensors_in_each_type(smollm2_dir, smol):
    """Every 2-D tensor in the asked type, norms in f32, no ``output`` (tied embeddings);
    bf16 and f16 hold exactly the HF weights rounded to that type; ``auto`` is the weights'
    own bf16; the files get the umask's mode and no temporary is left."""
    from safetensors import safe_open

    auto = export_gguf(smollm2_dir, smol["f32"].with_name("auto.gguf"))
    assert filecmp.cmp(auto, smol["bf16"], shallow=False)
    want = {"f32": "F32", "bf16": "BF16", "f16": "F16", "q8_0": "Q8_0"}
    files = {t: Gguf(smol[t]) for t in TYPES}
    for gguf_type, file in files.items():
        assert len(file.tensors) == 1 + 30 * 9 + 1 and "output.weight" not in file.tensors
        for name in file.tensors:
            kind = "F32" if name.endswith("norm.weight") else want[gguf_type]
            assert file.type_of(name) == kind, (gguf_type, name)
        file_type = {"f32": 0, "f16": 1, "bf16": 32, "q8_0": 7}[gguf_type]
        assert file.meta["general.file_type"] == file_type
    with safe_open(smollm2_dir / "model.safetensors", framework="pt") as f:
        hf = {k: f.get_tensor(k) for k in ("model.embed_tokens.weight",)}
        hf["q"] = interleave(f.get_tensor("model.layers.29.self_attn.q_proj.weight"), 9)
        hf["k"] = interleave(f.get_tensor("model.layers.29.self_attn.k_proj.weight"), 3)
        hf["down"] = f.get_tensor("model.layers.7.mlp.down_proj.weight")
    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "q": "blk.29.attn_q.weight",
        "k": "blk.29.attn_k.weight",
        "down": "blk.7.ffn_down.weight",
    }
    for key, name in names.items():
        for gguf_type, dtype in (("bf16", torch.bfloat16), ("f16", torch.float16)):
            rounded = hf[key].to(dtype).float()
            torch.testing.assert_close(files[gguf_type].tensor(name), rounded, rtol=0, atol=0)
        q8 = files["q8_0"].tensor(name)
        assert rel_err(q8, hf[key].float()) < 1e-2, name
    mode = smol["f32"].stat().st_mode & 0o777
    assert mode == 0o666 & ~_umask()
    assert not [p for p in smol["f32"].parent.iterdir() if ".tmp-" in p.name]


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.fixture(scope="module")
def llama31(tmp_path_factory) -> Path:
    """A tiny random bf16 Llama with the real Llama 3 tokenizer and Meta's 3.1 config form."""
    from data_fixtures import llama31_tokenizer_dir
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("llama31") / "model"
    cfg = meta_llama31_config(
        vocab_size=128256,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=2,
        bos_token_id=128000,
        eos_token_id=[128001, 128008, 128009],
    )
    skip = ("architectures", "model_type", "torch_dtype", "transformers_version")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in cfg.items() if k not in skip}))
    model.to(torch.bfloat16).save_pretrained(folder)
    # What a folder rebuilt from a GGUF by transformers may carry: ignored by the export.
    stale = {"quantization_config": {"quant_method": "gguf", "gguf_file": "x.gguf"}}
    (folder / "config.json").write_text(json.dumps(cfg | stale, indent=2))
    for file in llama31_tokenizer_dir().iterdir():
        if not file.name.startswith("."):
            shutil.copy(file, folder / file.name)
    return folder


def test_llama3_check_text_hashes_as_in_llama_cpp():
    """The check text is llama.cpp's: Meta's tokenizer (which adds <|begin_of_text|>) hashes to
    llama.cpp's ``llama-bpe``; without the BOS, as the test folder's tokenizer is built, to
    ``smaug-bpe`` (the same pre-tokenizer in llama.cpp and transformers)."""
    from data_fixtures import llama31_tokenizer_dir
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(llama31_tokenizer_dir()).encode(CHECK_TEXT)
    assert PRE_TOKENIZERS[sha256(str(ids).encode()).hexdigest()] == "smaug-bpe"
    assert PRE_TOKENIZERS[sha256(str([128000, *ids]).encode()).hexdigest()] == "llama-bpe"


@pytest.fixture(scope="module")
def llama31_gguf(llama31) -> Gguf:
    """The tiny Llama 3.1 exported with ``auto`` (its weights are bf16)."""
    return Gguf(export_gguf(llama31, llama31.parent / "llama31.gguf"))


@pytest.mark.slow
def test_llama31_tokens_rope_freqs_and_chat_template(llama31, llama31_gguf):
    from transformers import AutoTokenizer, LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    path, meta = llama31_gguf.path, llama31_gguf.meta
    hf = AutoTokenizer.from_pretrained(llama31)
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    assert ids_of(tok.apply_chat_template(CHAT, tokenize=True)) == ids_of(
        hf.apply_chat_template(CHAT, tokenize=True)
    )
    assert tok(TEXT)["input_ids"] == hf(TEXT)["input_ids"]
    assert tok.chat_template == hf.chat_template

    assert meta["tokenizer.chat_template"] == hf.chat_template
    assert meta["tokenizer.ggml.pre"] == "smaug-bpe"  # see the check-text test
    assert meta["tokenizer.ggml.bos_token_id"] == 128000
    assert meta["tokenizer.ggml.eos_token_id"] == 128009
    assert meta["general.file_type"] == 32  # auto: the weights' bf16
    assert meta["llama.rope.freq_base"] == 500000.0
    assert meta["llama.rope.dimension_count"] == 8
    assert not [k for k in meta if "quantiz" in k and k != "general.quantization_version"]
    # rope_freqs holds the divisor of each base frequency (llama.cpp): base / it is llama3's
    factors = llama31_gguf.tensor("rope_freqs.weight")
    cfg = json.loads((llama31 / "config.json").read_text())
    cfg.pop("quantization_config")
    want, _ = ROPE_INIT_FUNCTIONS["llama3"](LlamaConfig(**cfg), "cpu")
    base = 1.0 / 500000.0 ** (torch.arange(0, 8, 2, dtype=torch.float32) / 8)
    assert not torch.equal(want.float(), base)  # the scaling changes something at this size
    torch.testing.assert_close(base / factors, want.float(), rtol=1e-6, atol=0)


def test_llama31_tensors_are_llama_cpps_layout(llama31, llama31_gguf):
    """Q and K rows interleaved per head (llama.cpp's permute), the rest as in HF, exactly;
    ``output`` present (untied), ``rope_freqs`` first."""
    from safetensors import safe_open

    with safe_open(llama31 / "model.safetensors", framework="pt") as f:
        hf = {k: f.get_tensor(k).float() for k in f.keys()}
    got = llama31_gguf.tensor
    assert list(llama31_gguf.tensors)[:2] == ["rope_freqs.weight", "token_embd.weight"]
    assert llama31_gguf.type_of("token_embd.weight") == "BF16"
    q, k = (
        hf["model.layers.1.self_attn.q_proj.weight"],
        hf["model.layers.1.self_attn.k_proj.weight"],
    )
    torch.testing.assert_close(got("blk.1.attn_q.weight"), interleave(q, 4), rtol=0, atol=0)
    torch.testing.assert_close(got("blk.1.attn_k.weight"), interleave(k, 2), rtol=0, atol=0)
    pairs = {
        "token_embd.weight": "model.embed_tokens.weight",
        "blk.0.attn_v.weight": "model.layers.0.self_attn.v_proj.weight",
        "blk.0.ffn_down.weight": "model.layers.0.mlp.down_proj.weight",
        "blk.0.ffn_norm.weight": "model.layers.0.post_attention_layernorm.weight",
        "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight",
    }
    for name, hf_name in pairs.items():
        torch.testing.assert_close(got(name), hf[hf_name], rtol=0, atol=0)


def test_a_native_folder_exports_through_a_temporary_hf_folder(llama31, llama31_gguf, tmp_path):
    """``longtune export NATIVE OUT --format gguf``: the same tensors as the HF folder's GGUF,
    named for the native folder, and nothing left beside ``OUT`` but the file."""
    from longtune.export.command import export
    from longtune.model.convert import convert_hf_to_native

    native = convert_hf_to_native(llama31, tmp_path / "native")
    out = export(native, tmp_path / "out" / "m.gguf", format="gguf", gguf_type="bf16")
    assert sorted(p.name for p in out.parent.iterdir()) == ["m.gguf"]
    got = Gguf(out)
    assert got.meta["general.name"] == "native"
    assert list(got.tensors) == list(llama31_gguf.tensors)
    for name in ("blk.1.attn_q.weight", "token_embd.weight", "output.weight"):
        torch.testing.assert_close(got.tensor(name), llama31_gguf.tensor(name), rtol=0, atol=0)


@pytest.fixture(scope="module")
def cli_results(tmp_path_factory, cli_server) -> dict:
    """Bad ``longtune export --format gguf`` command lines, run in one batch."""
    root = tmp_path_factory.mktemp("gguf-cli")
    good = make_hf_checkpoint(root / "tiny")
    mistral = root / "mistral"
    shutil.copytree(good, mistral)
    cfg = json.loads((mistral / "config.json").read_text())
    (mistral / "config.json").write_text(json.dumps(cfg | {"model_type": "mistral"}))
    (root / "taken.gguf").write_bytes(b"GGUF....")
    (root / "notes.txt").write_text("mine\n")
    gguf_flag = ["--format", "gguf"]
    cases = {
        "non-llama folder": ([str(mistral), "m.gguf", *gguf_flag], "unsupported architecture"),
        "existing output": ([str(good), "taken.gguf", *gguf_flag], "taken.gguf exists"),
        "overwrite a file that is not GGUF": (
            [str(good), "notes.txt", "--overwrite", *gguf_flag],
            "is not a GGUF file",
        ),
        "unknown type": (
            [str(good), "x.gguf", "--gguf-type", "q4_k", *gguf_flag],
            "unknown GGUF type 'q4_k'; choose one of auto, f32, f16, bf16, q8_0",
        ),
        "unknown tokenizer": ([str(good), "t.gguf", *gguf_flag], "pre-tokenizer"),
        "inside the source": ([str(good), str(good / "m.gguf"), *gguf_flag], "inside the source"),
        "unknown format": ([str(good), "y.gguf", "--format", "onnx"], "unknown export format"),
        "a GGUF type for an HF export": (
            [str(good), "hf-out", "--gguf-type", "q8_0"],
            "--gguf-type applies to --format gguf only",
        ),
    }
    ran = {name: cli_server.run(["export", *argv], root) for name, (argv, _) in cases.items()}
    return {name: (ran[name], cases[name][1], root) for name in cases}


@pytest.mark.parametrize(
    "case",
    [
        "non-llama folder",
        "existing output",
        "overwrite a file that is not GGUF",
        "unknown type",
        "unknown tokenizer",
        "inside the source",
        "unknown format",
        "a GGUF type for an HF export",
    ],
)
def test_bad_input_is_one_line(cli_results, case):
    result, expected, root = cli_results[case]
    assert expected in result.error_line()
    assert (root / "taken.gguf").read_bytes() == b"GGUF...."
    assert (root / "notes.txt").read_text() == "mine\n"
    made = {p.name for p in root.iterdir()} - {"tiny", "mistral", "taken.gguf", "notes.txt"}
    assert not made, made


@pytest.mark.slow
def test_a_run_with_the_gguf_format_writes_model_gguf_from_its_export(llama31, tmp_path):
    from data_fixtures import chat_rows, write_jsonl

    from longtune import finetune

    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows(8))
    run = finetune(
        model=str(llama31),
        train_data=str(data),
        context_length=64,
        duration="1st",
        output_dir=str(tmp_path / "run"),
        data__cache_dir=str(tmp_path / "cache"),
        export__formats=["hf", "gguf"],
        export__gguf_type="f32",
    )
    assert run.status == "succeeded", run.error
    file = Gguf(tmp_path / "run" / "model.gguf")
    assert file.type_of("token_embd.weight") == "F32"
    with safe_open(tmp_path / "run" / "hf" / "model.safetensors", framework="pt") as f:
        embed = f.get_tensor("model.embed_tokens.weight").float()
    assert torch.equal(file.tensor("token_embd.weight"), embed)


def test_a_run_asking_for_gguf_of_a_model_it_cannot_write_is_refused_before_it_starts(tmp_path):
    from data_fixtures import chat_rows, write_jsonl

    from longtune import finetune

    model = make_hf_checkpoint(tmp_path / "tiny")  # a character-level tokenizer
    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows(8))
    with pytest.raises(ValueError, match="pre-tokenizer") as refused:
        finetune(
            model=str(model),
            train_data=str(data),
            context_length=64,
            duration="1st",
            output_dir=str(tmp_path / "run"),
            data__cache_dir=str(tmp_path / "cache"),
            export__formats=["hf", "gguf"],
        )
    assert "\n" not in str(refused.value)
    assert not (tmp_path / "run" / "checkpoints").exists()
