"""longtune: long-context fine-tuning of Llama-family models.

Public API:
    load_model(path, dtype=None, device="cpu") -> native Transformer
    save_model(model, out_dir, source=hf_dir)  -> writes a Hugging Face checkpoint folder
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy: `import longtune` stays cheap (no torch import) for the CLI's --help and validation.
    if name in ("load_model", "save_model"):
        from longtune.model import convert

        return getattr(convert, name)
    raise AttributeError(f"module 'longtune' has no attribute {name!r}")


__all__ = ["load_model", "save_model"]
