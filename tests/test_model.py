"""The native model is the same function as transformers' LlamaForCausalLM; conversion is exact."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import make_hf_checkpoint, rel_err, write_meta_style_checkpoint
from safetensors import safe_open
from transformers import LlamaForCausalLM

import longtune
from longtune.export.command import export_native
from longtune.model.args import UnsupportedModelError
from longtune.model.convert import convert_hf_to_native
from longtune.model.hf import CheckpointMismatchError, hf_state_dict, key_map
from longtune.model.llama import positions_from_cu_seqlens

TOL = 1e-5

CONFIGS = {
    "mha-untied": dict(num_attention_heads=4, num_key_value_heads=4),
    "gqa3-tied": dict(num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=True),
    "gqa4-untied": dict(num_attention_heads=8, num_key_value_heads=2, hidden_size=64),
    "gqa4-llama3-rope": dict(
        num_attention_heads=8,
        num_key_value_heads=2,
        hidden_size=64,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
        rope_theta=500000.0,
        tie_word_embeddings=True,
    ),
}


def read_all(folder) -> dict[str, torch.Tensor]:
    index = folder / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values()))
        if index.exists()
        else ["model.safetensors"]
    )
    out = {}
    for f in files:
        with safe_open(folder / f, framework="pt") as h:
            for k in h.keys():
                out[k] = h.get_tensor(k)
    return out


def assert_same_checkpoint(a, b) -> None:
    ta, tb = read_all(a), read_all(b)
    assert sorted(ta) == sorted(tb)
    for k in ta:
        assert ta[k].dtype == tb[k].dtype, k
        assert ta[k].shape == tb[k].shape, k
        assert torch.equal(ta[k], tb[k]), f"{k} differs"
    assert_served_config(json.loads((a / "config.json").read_text()), b)
    for name in ("tokenizer.json", "generation_config.json"):
        assert (b / name).read_bytes() == (a / name).read_bytes(), name
    ta, tb = (json.loads((f / "tokenizer_config.json").read_text()) for f in (a, b))
    if tb.get("tokenizer_class") == "PreTrainedTokenizerFast":  # transformers 4's name
        tb["tokenizer_class"] = ta["tokenizer_class"]
    if "chat_template" not in ta:
        tb.pop("chat_template", None)
    if isinstance(ta.get("extra_special_tokens"), list):
        tb["extra_special_tokens"] = tb.pop("additional_special_tokens")
    assert ta == tb


def assert_served_config(source: dict, out_dir) -> None:
    """The export's config.json keeps every key of the source's but a quantization_config, and
    adds only the forms transformers 4 reads, with the same values."""
    out = json.loads((out_dir / "config.json").read_text())
    source = {k: v for k, v in source.items() if k != "quantization_config"}
    added = {k: out.pop(k) for k in set(out) - set(source)}
    assert out == source
    assert set(added) <= {"torch_dtype", "rope_theta", "rope_scaling"}, added
    if "torch_dtype" in added:
        assert added["torch_dtype"] == source["dtype"]
    rope = source.get("rope_parameters") or {}
    if "rope_theta" in added:
        assert added["rope_theta"] == rope["rope_theta"]
    if added.get("rope_scaling") is not None:
        assert added["rope_scaling"] | {"rope_theta": rope["rope_theta"]} == rope


def hf_reference(path) -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager"
    ).eval()


def native_grads_as_hf(model, args) -> dict[str, torch.Tensor]:
    grads = {n: p.grad for n, p in model.named_parameters()}
    if args.tie_embeddings:
        grads["output.weight"] = grads["tok_embeddings.weight"]
    return hf_state_dict(grads, args, with_lm_head=False)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_and_grads_match_transformers(tmp_path, name):
    ckpt = make_hf_checkpoint(tmp_path / name, **CONFIGS[name])
    ref = hf_reference(ckpt)
    model = longtune.load_model(ckpt, dtype=torch.float32)
    # Positions up to 80 go past original_max_position_embeddings=32 of the llama3 config.
    ids = torch.randint(
        0, ref.config.vocab_size, (2, 80), generator=torch.Generator().manual_seed(1)
    )
    ref_logits = ref(ids).logits
    logits = model(ids)
    assert logits.shape == ref_logits.shape
    assert rel_err(logits, ref_logits) < TOL

    w = torch.randn(ref_logits.shape, generator=torch.Generator().manual_seed(2))
    (ref_logits * w).sum().backward()
    (logits * w).sum().backward()
    ours = native_grads_as_hf(model, model.args)
    theirs = {n: p.grad for n, p in ref.named_parameters()}
    for key, g in ours.items():
        if key == "lm_head.weight" and model.args.tie_embeddings:
            continue
        assert rel_err(g, theirs[key]) < TOL, f"grad of {key}: {rel_err(g, theirs[key]):.2e}"


def test_packed_documents_equal_separate_runs(tmp_path):
    ckpt = make_hf_checkpoint(tmp_path / "ck", **CONFIGS["gqa4-llama3-rope"])
    ref = hf_reference(ckpt)
    model = longtune.load_model(ckpt, dtype=torch.float32)
    g = torch.Generator().manual_seed(3)
    # Two packed rows of 24 tokens: [5, 9, 10] and [3, 7, 14]; row boundary is a doc boundary.
    lengths = [5, 9, 10, 3, 7, 14]
    docs = [torch.randint(0, 128, (n,), generator=g) for n in lengths]
    ids = torch.cat(docs).view(2, 24)
    cu = torch.tensor([0, 5, 14, 24, 27, 34, 48], dtype=torch.int32)
    logits = model(ids, cu_seqlens=cu).reshape(48, -1)
    with torch.no_grad():
        for doc, start in zip(docs, cu[:-1].tolist(), strict=True):
            alone = ref(doc[None]).logits[0]
            got = logits[start : start + len(doc)]
            assert rel_err(got, alone) < TOL
    # Positions derived from cu_seqlens restart at 0 in every document.
    pos = positions_from_cu_seqlens(cu, 48)
    assert pos[:14].tolist() == list(range(5)) + list(range(9))
    # Explicit position_ids give the same result as derived ones.
    logits2 = model(ids, position_ids=pos.view(2, 24), cu_seqlens=cu).reshape(48, -1)
    assert torch.equal(logits, logits2)


@pytest.mark.parametrize("name", ["mha-untied", "gqa3-tied"])
def test_round_trip_is_bit_identical(tmp_path, name):
    ckpt = make_hf_checkpoint(tmp_path / "in", **CONFIGS[name])
    model = longtune.load_model(ckpt)
    out = longtune.save_model(model, tmp_path / "out", source=ckpt)
    assert_same_checkpoint(ckpt, out)


def test_meta_style_bf16_sharded_round_trip_via_native(tmp_path):
    ckpt = write_meta_style_checkpoint(tmp_path / "meta")
    config_text = (ckpt / "config.json").read_text()
    model = longtune.load_model(ckpt)
    assert model.tok_embeddings.weight.dtype == torch.bfloat16  # bf16 stays bf16
    assert model.args.rope_scaling["rope_type"] == "llama3"

    direct = longtune.save_model(model, tmp_path / "direct")
    assert_same_checkpoint(ckpt, direct)
    assert (direct / "config.json").read_text() == config_text  # written back verbatim
    assert (direct / "model.safetensors.index.json").exists()
    src_map = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    out_map = json.loads((direct / "model.safetensors.index.json").read_text())["weight_map"]
    assert src_map == out_map

    native = convert_hf_to_native(ckpt, tmp_path / "native")
    exported = export_native(native, tmp_path / "exported")
    assert_same_checkpoint(ckpt, exported)

    # Loading through the native folder gives the same model as loading the HF folder.
    again = longtune.load_model(native)
    for (n, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), n

    # And the HF reference agrees with the native model on the Meta-form config (llama3 rope,
    # positions past original_max_position_embeddings=64).
    ref = hf_reference(ckpt)
    fp32 = longtune.load_model(ckpt, dtype="float32")
    ids = torch.randint(0, 128, (1, 100), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert rel_err(fp32(ids), ref(ids).logits) < TOL


def test_export_with_requested_dtype_changes_only_dtype(tmp_path):
    ckpt = write_meta_style_checkpoint(tmp_path / "meta")
    model = longtune.load_model(ckpt)
    out = longtune.save_model(model, tmp_path / "fp32", dtype="float32")
    src, dst = (
        json.loads((ckpt / "config.json").read_text()),
        json.loads((out / "config.json").read_text()),
    )
    assert dst.pop("torch_dtype") == "float32"
    src.pop("torch_dtype")
    assert src == dst
    a, b = read_all(ckpt), read_all(out)
    for k in a:
        assert b[k].dtype == torch.float32
        assert torch.equal(b[k].to(torch.bfloat16), a[k])
    reloaded = LlamaForCausalLM.from_pretrained(out)
    assert reloaded.config.rope_parameters["rope_type"] == "llama3"


def test_key_map_covers_every_parameter():
    from longtune.model.args import PRESETS
    from longtune.model.llama import Transformer

    for tied in (False, True):
        args = PRESETS["debug"]
        args = type(args)(**{**args.to_dict(), "tie_embeddings": tied})
        with torch.device("meta"):
            model = Transformer(args)
        names = set(model.state_dict())
        assert names == set(key_map(args))


# ------------------------------------------------------------------------------- clear errors


def test_unsupported_architecture_names_itself_and_the_supported(tmp_path):
    ckpt = make_hf_checkpoint(tmp_path / "ck")
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["model_type"] = "mistral"
    cfg["architectures"] = ["MistralForCausalLM"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError) as e:
        longtune.load_model(ckpt)
    msg = str(e.value)
    assert "mistral" in msg and "MistralForCausalLM" in msg
    assert "llama" in msg and "LlamaForCausalLM" in msg


def _rewrite_weights(ckpt, edit) -> None:
    from safetensors.torch import save_file

    tensors = read_all(ckpt)
    edit(tensors)
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})


def test_missing_and_unexpected_tensors_are_listed(tmp_path):
    ckpt = make_hf_checkpoint(tmp_path / "ck")

    def edit(t):
        del t["model.layers.1.mlp.up_proj.weight"]
        del t["model.norm.weight"]
        t["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.zeros(4)

    _rewrite_weights(ckpt, edit)
    with pytest.raises(CheckpointMismatchError) as e:
        longtune.load_model(ckpt)
    msg = str(e.value)
    assert "missing tensors (2): model.layers.1.mlp.up_proj.weight, model.norm.weight" in msg
    assert "unexpected tensors (1): model.layers.0.self_attn.rotary_emb.inv_freq" in msg


def test_shape_mismatch_names_tensor_and_both_shapes(tmp_path):
    ckpt = make_hf_checkpoint(tmp_path / "ck")

    def edit(t):
        t["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(16, 48)

    _rewrite_weights(ckpt, edit)
    with pytest.raises(CheckpointMismatchError) as e:
        longtune.load_model(ckpt)
    msg = str(e.value)
    assert "model.layers.0.self_attn.k_proj.weight" in msg
    assert "(16, 48)" in msg and "(24, 48)" in msg


def test_non_safetensors_checkpoint_is_refused_clearly(tmp_path):
    ckpt = make_hf_checkpoint(tmp_path / "ck")
    (ckpt / "model.safetensors").rename(ckpt / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        longtune.load_model(ckpt)


def test_save_without_source_explains(tmp_path):
    from longtune.model.args import PRESETS
    from longtune.model.llama import Transformer

    with pytest.raises(ValueError, match="source="):
        longtune.save_model(Transformer(PRESETS["debug"]), tmp_path / "x")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="varlen_attn needs a CUDA GPU")
def test_gpu_varlen_attention_matches_cpu_per_document_path():
    from longtune.model.attention import AttentionMeta, attention

    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 64, 8, 32, generator=g)
    k = torch.randn(2, 64, 2, 32, generator=g)
    v = torch.randn(2, 64, 2, 32, generator=g)
    cu = torch.tensor([0, 10, 64, 100, 128], dtype=torch.int32)
    ref = attention(q, k, v, AttentionMeta.from_cu_seqlens(cu))  # CPU: one SDPA per document
    qc, kc, vc = (t.cuda().bfloat16() for t in (q, k, v))
    out = attention(qc, kc, vc, AttentionMeta.from_cu_seqlens(cu.cuda(), 54, backend="varlen"))
    assert rel_err(out.float().cpu(), ref) < 2e-2  # bf16 kernel vs fp32 reference


def test_packed_attention_saves_no_quadratic_state():
    """The CPU per-document path must use a fused SDPA kernel: what autograd keeps for backward
    grows with the sequence length, not its square (the math fallback keeps the attention
    matrix)."""
    from longtune.model.attention import AttentionMeta, attention

    def saved_bytes(length: int) -> int:
        q = torch.randn(1, length, 8, 16, requires_grad=True)
        k = torch.randn(1, length, 2, 16, requires_grad=True)
        v = torch.randn(1, length, 2, 16, requires_grad=True)
        cu = torch.tensor([0, length // 2, length], dtype=torch.int32)
        storages = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            attention(q, k, v, AttentionMeta.from_cu_seqlens(cu))
        return sum(storages.values())

    small, large = saved_bytes(256), saved_bytes(2048)
    assert large < 10 * small  # 8x the tokens: linear growth, far from the 64x of quadratic


def test_sharded_native_format_round_trip(tmp_path):
    ckpt = make_hf_checkpoint(tmp_path / "hf")
    native = convert_hf_to_native(ckpt, tmp_path / "native", max_shard_bytes=20_000)
    shards = sorted(p.name for p in native.glob("native-*.safetensors"))
    assert len(shards) > 1 and shards[-1].endswith(f"-of-{len(shards):05d}.safetensors")
    assert_same_checkpoint(ckpt, export_native(native, tmp_path / "out"))


def test_attention_keeps_no_fused_projection_for_backward():
    """q and k are rotated into tensors of their own, and v must be too: as a view of the fused
    ``wqkv`` output it would keep all of it (q + 2 kv wide) alive until the attention's
    backward, where v needs only its kv columns (8B at 1M tokens: 12 GiB kept for 2). No
    storage the layer saves for backward is as large as the fused projection's output."""
    from longtune.model.args import ModelArgs
    from longtune.model.attention import AttentionMeta
    from longtune.model.llama import Attention, rope_cos_sin, rope_inv_freq

    args = ModelArgs(dim=64, n_layers=1, n_heads=8, n_kv_heads=2, vocab_size=8, ffn_dim=128)
    layer = Attention(args)
    x = torch.randn(1, 256, 64, requires_grad=True)
    cos, sin = rope_cos_sin(rope_inv_freq(args), torch.arange(256).unsqueeze(0), torch.float32)
    fused = 256 * (args.q_size + 2 * args.kv_size) * 4
    saved: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x, cos, sin, AttentionMeta.from_cu_seqlens(None, 256))
    assert saved and max(saved) < fused, (max(saved), fused)
