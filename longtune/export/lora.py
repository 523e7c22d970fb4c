"""Exporting a LoRA run: the merged Hugging Face folder and the PEFT adapter folder.

A LoRA checkpoint holds only what was trained (the adapters, and the embeddings with
``train_embeddings``); the base model stays in its own folder. :class:`MergedTensors` is the
full native state, one tensor at a time: an untargeted tensor is the base file's own tensor (so
the export writes it bit-identical), a targeted projection is ``W + scale * B A`` (float32 sum,
cast to the source dtype). It goes through the same writer and self-check as a full run.
:func:`write_peft_adapter` writes what ``peft.PeftModel.from_pretrained(source_model, folder)``
loads: ``adapter_config.json`` and ``adapter_model.safetensors`` under PEFT's key names.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from longtune.fsutil import atomic_dir
from longtune.model.args import ModelArgs
from longtune.model.convert import is_native_dir, read_native_meta
from longtune.model.hf import ShardReader, key_map, read_hf_source, read_native_tensor
from longtune.model.lora import (
    EMBEDDINGS,
    FUSED,
    LoraSpec,
    adapter_config,
    is_adapter,
    merged_weight,
    peft_key,
)


class BaseTensors(Mapping[str, torch.Tensor]):
    """The native tensors of a base model folder (HF or ``longtune convert``), each read from
    its file when asked for, in the file's dtype."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        if is_native_dir(path):
            _, _, native_map = read_native_meta(path)
            self._reader = ShardReader(path, native_map)
            self._keys = {name: [name] for name in native_map}
        else:
            args, source = read_hf_source(path)
            self._reader = ShardReader(path, source.weight_map)
            self._keys = {n: k for n, k in key_map(args).items() if k[0] in source.weight_map}

    def __getitem__(self, name: str) -> torch.Tensor:
        return read_native_tensor(self._reader, self._keys[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


class MergedTensors(Mapping[str, torch.Tensor]):
    """The native state of a LoRA run with its adapters merged in (see the module docstring).

    Args:
        trained: the checkpoint's tensors (adapters; embeddings when they were trained).
        base: the base model folder the adapters were trained on (already checked).
        args: the model's arguments.
        spec: the adapters' spec.
    """

    def __init__(
        self, trained: Mapping[str, torch.Tensor], base: str | Path, args: ModelArgs, spec: LoraSpec
    ) -> None:
        self.trained, self.args, self.spec = trained, args, spec
        self.base = BaseTensors(base)
        self.names = [n for n in key_map(args) if n in self.base or n in trained]
        if args.tie_embeddings and "output.weight" in self.names:
            self.names.remove("output.weight")

    def __getitem__(self, name: str) -> torch.Tensor:
        if name in self.trained and not is_adapter(name):  # trained in full (embeddings)
            return self.trained[name]
        base = self.base[name]
        module, _, kind = name.rpartition(".")
        native = module.split(".", 2)[-1]  # layers.3.attention.wqkv -> attention.wqkv
        if kind != "weight" or native not in FUSED:
            return base
        pairs = {
            part: (self.trained[f"{module}.lora_A.{part}"], self.trained[f"{module}.lora_B.{part}"])
            for part in FUSED[native]
            if f"{module}.lora_A.{part}" in self.trained
        }
        return merged_weight(base, self.args, native, pairs, self.spec) if pairs else base

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def write_peft_adapter(
    trained: Mapping[str, torch.Tensor],
    spec: LoraSpec,
    args: ModelArgs,
    base: str,
    out_dir: Path,
    overwrite: bool = False,
) -> dict[str, int]:
    """Write the adapters as a PEFT folder and read them back.

    Args:
        trained: the checkpoint's tensors.
        spec: their spec.
        args: the model's arguments (tied embeddings).
        base: ``base_model_name_or_path`` (the base model folder).
        out_dir: the folder to write (atomically; see :func:`longtune.fsutil.atomic_dir`).
        overwrite: replace a folder longtune wrote before.

    Returns:
        ``{"tensors": n, "bytes": size of adapter_model.safetensors}``.

    Raises:
        RuntimeError: a tensor read back differs from the trained one.
    """
    tensors = {peft_key(n): trained[n].contiguous() for n in trained if is_adapter(n)}
    if spec.train_embeddings:
        embed = trained[EMBEDDINGS[0]]
        tensors["base_model.model.model.embed_tokens.weight"] = embed
        # Tied: the same matrix again (a copy: safetensors stores no shared tensors).
        out = embed.clone() if args.tie_embeddings else trained[EMBEDDINGS[1]]
        tensors["base_model.model.lm_head.weight"] = out
    config = adapter_config(spec, base, args.tie_embeddings)
    with atomic_dir(out_dir, kind="adapter", sources=[base], overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    back = load_file(str(Path(out_dir) / "adapter_model.safetensors"))
    if back.keys() != tensors.keys() or any(not torch.equal(back[k], tensors[k]) for k in back):
        raise RuntimeError(f"{out_dir}: the adapters read back differ from the trained ones")
    return {
        "tensors": len(back),
        "bytes": (Path(out_dir) / "adapter_model.safetensors").stat().st_size,
    }
