"""Shared test helpers: tiny random HF Llama checkpoints with a real (tiny) tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def tiny_tokenizer(vocab_size: int):
    """A character-level fast tokenizer with ``vocab_size`` ids and a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
    chars = [chr(c) for c in range(32, 127)]
    vocab = {tok: i for i, tok in enumerate(specials + chars) if i < vocab_size}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    fast.add_special_tokens({"additional_special_tokens": specials[3:]})
    fast.chat_template = CHAT_TEMPLATE
    return fast


def llama_config(**overrides):
    from transformers import LlamaConfig

    kw = dict(
        vocab_size=128,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    kw.update(overrides)
    return LlamaConfig(**kw)


def make_hf_checkpoint(
    out: Path,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | None = None,
    **config_overrides,
) -> Path:
    """Save a random ``LlamaForCausalLM`` plus tokenizer and generation config to ``out``."""
    from transformers import GenerationConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = llama_config(**config_overrides)
    model = LlamaForCausalLM(config).to(dtype)
    # Non-trivial norm weights so a mix-up between norms would show.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, **kwargs)
    tiny_tokenizer(config.vocab_size).save_pretrained(out)
    GenerationConfig(
        bos_token_id=1, eos_token_id=2, temperature=0.7, do_sample=True
    ).save_pretrained(out)
    return out


def meta_llama31_config(**overrides) -> dict:
    """A config.json in the form Meta's Llama 3.1 folders use (transformers 4.43 era)."""
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": [2, 3],
        "hidden_act": "silu",
        "hidden_size": 64,
        "initializer_range": 0.02,
        "intermediate_size": 160,
        "max_position_embeddings": 131072,
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": 8,
        "num_hidden_layers": 3,
        "num_key_value_heads": 2,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
            "rope_type": "llama3",
        },
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.43.0.dev0",
        "use_cache": True,
        "vocab_size": 128,
    }
    cfg.update(overrides)
    return cfg


def write_meta_style_checkpoint(out: Path, seed: int = 0) -> Path:
    """bf16, sharded with an index, config.json in Meta's Llama 3.1 form (written verbatim)."""
    cfg = meta_llama31_config()
    hf_kwargs = {
        k: v
        for k, v in cfg.items()
        if k not in ("architectures", "model_type", "torch_dtype", "transformers_version")
    }
    make_hf_checkpoint(out, seed=seed, dtype=torch.bfloat16, max_shard_size="60KB", **hf_kwargs)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error ||a - b|| / ||b|| in float64."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))
