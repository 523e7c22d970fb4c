"""longtune: long-context fine-tuning of Llama-family models.

Public API:
    load_model(path, dtype=None, device="cpu") -> native Transformer
    save_model(model, out_dir, source=hf_dir)  -> writes a Hugging Face checkpoint folder
    finetune(model=..., train_data=..., ...)   -> RunResult (status, metrics, export path)
    runs.list(runs_dir) / .get(name) / .cancel(name) / .resume(name) -> the runs of a runs folder
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy: `import longtune` stays cheap (no torch import) for the CLI's --help and validation.
    if name == "load_model":
        from longtune.model.convert import load_model

        return load_model
    if name == "save_model":
        from longtune.model.hf import save_model

        return save_model
    if name == "finetune":
        from longtune.api import finetune

        return finetune
    if name == "runs":
        import importlib

        return importlib.import_module("longtune.runs")
    raise AttributeError(f"module 'longtune' has no attribute {name!r}")


__all__ = ["finetune", "load_model", "runs", "save_model"]
