"""An export every server loads: no stale quantization_config, the config keys transformers 4
reads, the chat template in both places, a tokenizer class transformers 4 has, files readable by
other users."""

from __future__ import annotations

import json
import os
import stat
from contextlib import contextmanager

import torch
from helpers import make_hf_checkpoint
from test_model import assert_served_config

import longtune
from longtune.export.check import export_and_check
from longtune.model.hf import export_config_text, read_hf_source

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}


@contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def transformers5_source(folder):
    """A folder as transformers 5 writes it (``dtype``, ``rope_parameters``, tokenizer class
    ``TokenizersBackend``, the template only in ``chat_template.jinja``), carrying the stale
    ``quantization_config`` of a model first read from a GGUF file, its weights file mode 0600."""
    ckpt = make_hf_checkpoint(
        folder, dtype=torch.bfloat16, rope_scaling=dict(LLAMA3_ROPE), rope_theta=500000.0
    )
    config = json.loads((ckpt / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gguf"}
    (ckpt / "config.json").write_text(json.dumps(config, indent=2))
    tok = json.loads((ckpt / "tokenizer_config.json").read_text())
    template = tok.pop("chat_template", None)
    if template:
        (ckpt / "chat_template.jinja").write_text(template)
    tok["tokenizer_class"] = "TokenizersBackend"
    (ckpt / "tokenizer_config.json").write_text(json.dumps(tok, indent=2))
    os.chmod(ckpt / "model.safetensors", 0o600)
    return ckpt


def test_the_source_is_in_transformers5_form_only(tmp_path):
    config = json.loads((transformers5_source(tmp_path / "src") / "config.json").read_text())
    assert "dtype" in config and "rope_parameters" in config
    assert not {"torch_dtype", "rope_theta", "rope_scaling"} & set(config)


def test_an_export_every_server_loads(tmp_path):
    source = transformers5_source(tmp_path / "src")
    src_config = json.loads((source / "config.json").read_text())
    args, hf_source = read_hf_source(source)
    model = longtune.load_model(source)
    with umask(0o022):
        check = export_and_check(
            model.state_dict(), args, hf_source, tmp_path / "out", tmp_path / "check.json"
        )
    out = tmp_path / "out"
    # transformers 5 loads it with the native model's logits, every tensor as trained
    assert check["passed"] and check["tensors_equal_trained"], check
    assert check["rel_err_vs_transformers"] < 1e-4

    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["torch_dtype"] == config["dtype"] == "bfloat16"
    assert config["rope_theta"] == 500000.0
    assert config["rope_scaling"] == LLAMA3_ROPE
    assert_served_config(src_config, out)

    tok = json.loads((out / "tokenizer_config.json").read_text())
    assert tok["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert tok["chat_template"] == (out / "chat_template.jinja").read_text()
    assert "extra_special_tokens" not in tok and len(tok["additional_special_tokens"]) == 4
    assert check["chat_template"]

    for path in [out, *out.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o755 if path.is_dir() else 0o644), (path.name, oct(mode))


def test_file_modes_follow_the_umask(tmp_path):
    source = transformers5_source(tmp_path / "src")
    with umask(0o077):
        out = longtune.save_model(longtune.load_model(source), tmp_path / "private")
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [out, *out.iterdir()]}
    assert modes.pop("private") == 0o700
    assert set(modes.values()) == {0o600}, modes


def test_a_plain_rope_gets_no_rope_scaling_and_a_complete_config_stays_verbatim():
    text = json.dumps({"dtype": "float32", "rope_parameters": {"rope_theta": 1e4}})
    config = json.loads(export_config_text(text, None)[0])
    assert config["rope_theta"] == 1e4 and config["rope_scaling"] is None
    assert config["torch_dtype"] == "float32"
    old_form = '{"torch_dtype": "bfloat16", "rope_theta": 500000.0, "rope_scaling": null}'
    assert export_config_text(old_form, None) == (old_form, [])
