"""Checks of a model folder, each failing with one line that names the folder, file or key.

Imports no torch (safetensors loads it only when a file is opened). Everything here reads only
small files (config.json, the tokenizer's JSON, safetensors headers)
and is meant for preflight, before any process group or big allocation:

- :func:`check_model_dir`: the folder exists locally (a missing path is "no such folder",
  never a Hub lookup), holds ``config.json`` and, when asked, tokenizer files;
- :func:`read_model_config`: ``config.json`` parsed into :class:`ModelArgs`, with the file,
  line and column of a JSON error, or the file and the missing / invalid key;
- :func:`check_tokenizer_fits`: every token id the tokenizer can produce has a row in the
  model's embedding;
- :func:`open_safetensors`: a truncated or damaged safetensors file named as such;
- :func:`check_finite`: a tensor holding NaN or Inf is refused at load, naming it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import SafetensorError, safe_open

from longtune.model.args import ModelArgs, UnsupportedModelError

if TYPE_CHECKING:
    import torch

CONFIG_FILE = "config.json"
TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"


class ModelFolderError(ValueError):
    """A model folder or one of its files cannot be used (one line: which, and why)."""


def check_model_dir(path: str | Path, *, config: bool = True, tokenizer: bool = False) -> Path:
    """Check that ``path`` is a local Hugging Face model (or tokenizer) folder.

    Args:
        path: the folder given as ``model.path`` / ``--model``.
        config: require ``config.json`` (not for a tokenizer-only folder).
        tokenizer: require tokenizer files (``tokenizer.json`` or ``tokenizer_config.json``).

    Returns:
        The folder as a ``Path``.

    Raises:
        ModelFolderError: no such folder, a file instead of a folder, no config.json, or no
            tokenizer files.
    """
    folder = Path(path)
    if not folder.exists():
        raise ModelFolderError(
            f"model folder {str(path)!r}: no such folder (longtune reads local folders only; "
            "download the model first, e.g. with `huggingface-cli download`)"
        )
    if not folder.is_dir():
        raise ModelFolderError(f"model folder {path}: is a file, not a folder")
    if config and not (folder / CONFIG_FILE).is_file():
        raise ModelFolderError(
            f"model folder {path}: no {CONFIG_FILE}, so it is not a Hugging Face checkpoint folder"
        )
    if tokenizer and not any((folder / n).is_file() for n in (TOKENIZER_JSON, TOKENIZER_CONFIG)):
        raise ModelFolderError(
            f"no {TOKENIZER_JSON} / {TOKENIZER_CONFIG} in {path}: the model folder needs its "
            "tokenizer files (copy them from the model's original release)"
        )
    return folder


def read_json(file: Path) -> Any:
    """Parse a JSON file; an error names the file, line and column."""
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ModelFolderError(
            f"{file}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno})"
        ) from None
    except UnicodeDecodeError as e:
        raise ModelFolderError(f"{file}: not UTF-8 text (byte {e.start})") from None


def parse_model_config(config: Any, file: str | Path) -> ModelArgs:
    """Build :class:`ModelArgs` from a parsed config.json; errors name ``file`` and the key.

    Args:
        config: the parsed JSON.
        file: where it came from (for messages).

    Returns:
        The model arguments.

    Raises:
        ModelFolderError: not an object, a missing key, or a key with an invalid value.
        UnsupportedModelError: another architecture (prefixed with ``file``).
    """
    if not isinstance(config, dict):
        raise ModelFolderError(f"{file}: expected a JSON object, got {type(config).__name__}")
    try:
        return ModelArgs.from_hf_config(config)
    except KeyError as e:
        raise ModelFolderError(f"{file}: missing key {e.args[0]!r}") from None
    except UnsupportedModelError as e:
        raise UnsupportedModelError(f"{file}: {e}") from None
    except (TypeError, ValueError) as e:
        raise ModelFolderError(f"{file}: {e}") from None


def read_model_config(model_dir: str | Path) -> tuple[str, ModelArgs]:
    """Read and check ``config.json`` of a model folder.

    Args:
        model_dir: a folder that passed :func:`check_model_dir`.

    Returns:
        The file's text (kept verbatim for export) and the model arguments.

    Raises:
        ModelFolderError: naming the file and the line, or the missing / invalid key.
    """
    file = check_model_dir(model_dir) / CONFIG_FILE
    text = file.read_text(encoding="utf-8", errors="replace")
    return text, parse_model_config(read_json(file), file)


def tokenizer_max_id(model_dir: str | Path) -> int | None:
    """The largest token id of the tokenizer in ``tokenizer.json`` (None without that file)."""
    file = Path(model_dir) / TOKENIZER_JSON
    if not file.is_file():
        return None
    data = read_json(file)
    vocab = (data.get("model") or {}).get("vocab") if isinstance(data, dict) else None
    ids: list[int] = []
    if isinstance(vocab, dict):
        ids.extend(v for v in vocab.values() if isinstance(v, int))
    elif isinstance(vocab, list):  # Unigram: a list of [piece, score]
        ids.append(len(vocab) - 1)
    for tok in data.get("added_tokens") or []:
        if isinstance(tok, dict) and isinstance(tok.get("id"), int):
            ids.append(tok["id"])
    return max(ids) if ids else None


def check_tokenizer_fits(model_dir: str | Path, vocab_size: int) -> None:
    """Refuse a tokenizer that can produce ids the model has no embedding row for.

    Args:
        model_dir: the model folder (its ``tokenizer.json`` is read).
        vocab_size: the model's ``vocab_size``.

    Raises:
        ModelFolderError: the tokenizer's largest id is >= ``vocab_size``.
    """
    top = tokenizer_max_id(model_dir)
    if top is not None and top >= vocab_size:
        raise ModelFolderError(
            f"the tokenizer in {model_dir} has ids up to {top}, but config.json says "
            f"vocab_size={vocab_size}: the tokenizer does not belong to this model (or the "
            "embedding was not resized); use the model's own tokenizer"
        )


def open_safetensors(file: str | Path) -> Any:
    """``safe_open`` a file; a truncated or damaged one is named in one line.

    Args:
        file: a ``.safetensors`` file.

    Returns:
        The open safetensors handle (a context manager).

    Raises:
        ModelFolderError: missing, truncated or not a safetensors file.
    """
    try:
        return safe_open(str(file), framework="pt")
    except FileNotFoundError:
        raise ModelFolderError(f"{file}: no such file (listed in the index)") from None
    except (SafetensorError, OSError) as e:
        raise ModelFolderError(
            f"{file}: not a readable safetensors file ({e}); it is truncated or damaged, copy "
            "it again"
        ) from None


def check_finite(name: str, tensor: torch.Tensor, where: str | Path) -> None:
    """Refuse a weight that holds NaN or Inf (a damaged checkpoint, not a learning rate issue).

    Args:
        name: the tensor's name.
        tensor: its values (any floating dtype).
        where: the folder or file it was read from.

    Raises:
        ModelFolderError: naming the tensor and how many values are not finite.
    """
    if not tensor.is_floating_point():
        return
    bad = int((~tensor.isfinite()).sum())
    if bad:
        raise ModelFolderError(
            f"{where}: tensor {name} holds {bad} NaN/Inf value(s) of {tensor.numel()}; the "
            "checkpoint is damaged — training from it cannot work"
        )
