"""Model arguments of the native Llama model, built from (and written back to) HF config.json."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
SUPPORTED_MODEL_TYPES = ("llama",)
SUPPORTED_ROPE_TYPES = ("default", "llama3")
ATTENTION_BACKENDS = ("auto", "sdpa", "varlen", "flex")
"""Attention kernels the model can use (``model.attention``; see ``longtune.model.attention``)."""


class UnsupportedModelError(ValueError):
    """The checkpoint is not a Llama-architecture model longtune can train."""


@dataclass
class ModelArgs:
    """Shape and numerics of a Llama-family decoder.

    Field names follow torchtitan; ``from_hf_config`` maps Hugging Face's names.
    """

    dim: int = 4096
    """Hidden size (HF ``hidden_size``)."""
    n_layers: int = 32
    """Number of decoder blocks (HF ``num_hidden_layers``)."""
    n_heads: int = 32
    """Query heads (HF ``num_attention_heads``)."""
    n_kv_heads: int | None = None
    """Key/value heads for grouped-query attention; ``None`` means ``n_heads``."""
    head_dim: int | None = None
    """Per-head size; ``None`` means ``dim // n_heads``."""
    vocab_size: int = 128256
    ffn_dim: int = 14336
    """Hidden size of the SwiGLU MLP (HF ``intermediate_size``)."""
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: dict[str, Any] | None = None
    """``None`` for plain RoPE, or the ``llama3`` frequency scaling parameters
    (``factor``, ``low_freq_factor``, ``high_freq_factor``, ``original_max_position_embeddings``)."""
    max_seq_len: int = 131072
    """HF ``max_position_embeddings``; informative, longer sequences are allowed."""
    tie_embeddings: bool = False
    """Output projection shares the input embedding matrix."""
    attention_bias: bool = False
    mlp_bias: bool = False
    dtype: str = "bfloat16"
    """Dtype the checkpoint was stored in (``torch_dtype`` / ``dtype`` of config.json)."""
    extra: dict[str, Any] = field(default_factory=dict, repr=False)
    """Not used by the model; kept so nothing of the source config is lost."""

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ValueError(
                    f"dim={self.dim} is not divisible by n_heads={self.n_heads}; set head_dim explicitly"
                )
            self.head_dim = self.dim // self.n_heads
        for name in (
            "dim",
            "n_layers",
            "n_heads",
            "n_kv_heads",
            "head_dim",
            "vocab_size",
            "ffn_dim",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads} "
                "(grouped-query attention)"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.rope_scaling is not None:
            rope_type = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if rope_type not in SUPPORTED_ROPE_TYPES:
                raise UnsupportedModelError(
                    f"rope scaling type {rope_type!r} is not supported; supported: "
                    f"{', '.join(SUPPORTED_ROPE_TYPES)}"
                )
            if rope_type == "default":
                self.rope_scaling = None
            else:
                missing = [
                    k
                    for k in (
                        "factor",
                        "low_freq_factor",
                        "high_freq_factor",
                        "original_max_position_embeddings",
                    )
                    if k not in self.rope_scaling
                ]
                if missing:
                    raise ValueError(f"llama3 rope_scaling is missing {missing}")

    @property
    def q_size(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.n_kv_heads * self.head_dim

    def num_params(self) -> int:
        """Number of parameters (tied embeddings counted once)."""
        attn = self.dim * (self.q_size + 2 * self.kv_size) + self.q_size * self.dim
        mlp = 3 * self.dim * self.ffn_dim
        per_layer = attn + mlp + 2 * self.dim
        emb = self.vocab_size * self.dim
        return self.n_layers * per_layer + self.dim + emb * (1 if self.tie_embeddings else 2)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelArgs:
        return cls(**d)

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> ModelArgs:
        """Build from the parsed ``config.json`` of an HF Llama checkpoint.

        Reads both the transformers-4 / Meta form (top-level ``rope_theta``, ``rope_scaling``,
        ``torch_dtype``) and the transformers-5 form (``rope_parameters``, ``dtype``).

        Raises:
            UnsupportedModelError: the config describes another architecture.
        """
        model_type = cfg.get("model_type")
        archs = cfg.get("architectures") or []
        if model_type not in SUPPORTED_MODEL_TYPES or (
            archs and not any(a in SUPPORTED_ARCHITECTURES for a in archs)
        ):
            raise UnsupportedModelError(
                f"unsupported architecture: model_type={model_type!r}, architectures={archs}; "
                f"longtune supports model_type {', '.join(SUPPORTED_MODEL_TYPES)} "
                f"({', '.join(SUPPORTED_ARCHITECTURES)})"
            )
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise UnsupportedModelError(f"hidden_act={act!r} is not supported; Llama uses 'silu'")
        rope = cfg.get("rope_parameters") or {}
        legacy = cfg.get("rope_scaling") or {}
        theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
        scaling = None
        source = rope if rope.get("rope_type", "default") != "default" else legacy
        if source:
            scaling = {k: v for k, v in source.items() if k != "rope_theta"}
        if cfg.get("pretraining_tp", 1) not in (1, None):
            raise UnsupportedModelError(f"pretraining_tp={cfg['pretraining_tp']} is not supported")
        known = {
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "vocab_size",
            "intermediate_size",
            "rms_norm_eps",
            "rope_theta",
            "rope_scaling",
            "rope_parameters",
            "max_position_embeddings",
            "tie_word_embeddings",
            "attention_bias",
            "mlp_bias",
            "torch_dtype",
            "dtype",
        }
        required = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
        ints = {k: _positive_int(cfg, k) for k in (*required, "intermediate_size")}
        for key in ("num_key_value_heads", "head_dim"):
            ints[key] = _positive_int(cfg, key) if cfg.get(key) is not None else None
        return cls(
            dim=ints["hidden_size"],
            n_layers=ints["num_hidden_layers"],
            n_heads=ints["num_attention_heads"],
            n_kv_heads=ints["num_key_value_heads"] or ints["num_attention_heads"],
            head_dim=ints["head_dim"],
            vocab_size=ints["vocab_size"],
            ffn_dim=ints["intermediate_size"],
            norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=scaling,
            max_seq_len=cfg.get("max_position_embeddings", 2048),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", False)),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32"),
            extra={k: v for k, v in cfg.items() if k not in known},
        )


def _positive_int(cfg: dict[str, Any], key: str) -> int:
    """``cfg[key]`` as a positive integer (KeyError when absent, naming the key)."""
    value = cfg[key]
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"key {key!r} must be a positive integer, got {value!r}")
    return value


# Presets, including a tiny debug model for tests and smoke runs.
PRESETS: dict[str, ModelArgs] = {
    "debug": ModelArgs(
        dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, ffn_dim=128, rope_theta=10000.0
    ),
    "llama3.1-8b": ModelArgs(
        dim=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        vocab_size=128256,
        ffn_dim=14336,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    ),
}
