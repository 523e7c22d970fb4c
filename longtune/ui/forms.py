"""The new-run form: its defaults (the demo's settings) and its translation into a run config.

Every value is parsed and checked by :mod:`longtune.train.config` itself
(:func:`~longtune.train.config.config_from_values`; the "more settings" box in command-line
syntax through its flag reader, :func:`~longtune.train.config.flag_values`), so a bad value is
refused with the config's own message. Model and data paths must lie, after links are resolved,
inside the folders the UI was started with, and so must every file a data folder holds
(:func:`check_data_files`). What only the data and the model can tell (files that exist and
parse, the parallel layout against the processes and the model's heads) is the trainer's
preflight, which :func:`longtune.runs.launch` runs before it creates anything.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from longtune.assets import smollm2_default_dir
from longtune.demo import DATA_DIR, DEMO_SETTINGS, DEMO_STEPS
from longtune.runs import check_name
from longtune.train.config import ConfigError, JobConfig, choices, config_from_values, flag_values

#: Form field -> config key (the rest of the form: name, nproc, extra).
FIELDS: dict[str, str] = {
    "model": "model.path",
    "train": "data.train",
    "eval": "data.eval",
    "task_type": "data.task_type",
    "context_length": "data.context_length",
    "duration": "train.duration",
    "lr": "optim.lr",
    "lora_rank": "model.lora.rank",
    "sp": "parallel.sp",
}

#: Keys the "more settings" box may not set: the form's own fields, and paths the UI does not
#: let a browser choose (the run folder, the token cache, the resume source).
RESERVED_KEYS = (*FIELDS.values(), "data.cache_dir", "output.dir", "checkpoint.resume")

MAX_NPROC = 64


class FormError(ValueError):
    """A form value is refused; ``status`` is the HTTP status to answer with (400 or 422)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class NewRun:
    """A checked new-run request."""

    name: str
    cfg: JobConfig
    nproc: int


def defaults() -> dict[str, str]:
    """The form's initial values: the demo's model, data and settings, and a fresh run name.

    Returns:
        Field name -> text.
    """
    extra = [
        f"--{key.replace('__', '.')}={value}" for key, value in DEMO_SETTINGS.items() if "__" in key
    ]
    return {
        "name": time.strftime("run-%Y%m%d-%H%M%S"),
        "model": str(smollm2_default_dir()),
        "train": str(DATA_DIR / "train.jsonl"),
        "eval": str(DATA_DIR / "eval.jsonl"),
        "task_type": "chat",
        "context_length": str(DEMO_SETTINGS["context_length"]),
        "duration": f"{DEMO_STEPS}st",
        "lr": str(DEMO_SETTINGS["learning_rate"]),
        "lora_rank": "0",
        "sp": "1",
        "nproc": "1",
        "extra": "\n".join(extra),
    }


def task_types() -> tuple[str, ...]:
    """The task types the config accepts (for the form's choice list).

    Returns:
        The choices, as the config module lists them.
    """
    return choices("data.task_type")


def allowed_dirs(runs_dir: Path, allow_dirs: list[Path] | None) -> list[Path]:
    """The folders the UI may read models and data from.

    The given folders (default: the current folder), plus always the runs folder (to start from
    an earlier run's export) and the demo's two read-only assets (the bundled data and the demo
    model's cache folder), so the form's defaults work wherever the UI starts.

    Args:
        runs_dir: the runs folder.
        allow_dirs: the ``--allow-dir`` folders, or None.

    Returns:
        The folders, links resolved, without duplicates.
    """
    given = allow_dirs if allow_dirs else [Path.cwd()]
    folders = [*given, runs_dir, DATA_DIR, smollm2_default_dir()]
    return list(dict.fromkeys(Path(p).expanduser().resolve() for p in folders))


def check_path(text: str, allowed: list[Path], what: str) -> Path:
    """Resolve a path (following links) and require it inside one of ``allowed``.

    Args:
        text: the path as typed.
        allowed: resolved folders.
        what: the field, for the message.

    Returns:
        The resolved path.

    Raises:
        FormError: 400, naming the allowed folders.
    """
    path = Path(text).expanduser().resolve()
    if not any(path == root or path.is_relative_to(root) for root in allowed):
        folders = ", ".join(str(p) for p in allowed)
        raise FormError(
            400,
            f"{what}: {path} is outside the folders this UI may read ({folders}); "
            "start `longtune ui --allow-dir DIR` to allow another",
        )
    return path


def check_data_files(cfg: JobConfig, allowed: list[Path]) -> None:
    """Require every file the data paths expand to inside ``allowed``, links resolved.

    A folder inside an allowed folder may hold a link to a file elsewhere: the file, not the
    folder, is what would be read (previewed, trained on). Paths that do not exist or hold no
    data are left to the data check that follows (it names them with its own rule).

    Args:
        cfg: the run config (its data paths already passed :func:`check_path`).
        allowed: resolved folders.

    Raises:
        FormError: 400, naming the file, where it leads and the allowed folders.
    """
    # Imports torch (the data package): only in a request's worker thread.
    from longtune.data.validation import expand_paths

    for key, paths in (("data.train", cfg.data.train), ("data.eval", cfg.data.eval)):
        for given in paths:
            try:
                files = expand_paths([given], cfg.data.task_type, cfg.data.format)
            except ValueError:
                continue  # missing, empty or of an unknown type: the data check says which
            for file in files:
                resolved = Path(file).resolve()
                if not any(resolved.is_relative_to(root) for root in allowed):
                    folders = ", ".join(str(p) for p in allowed)
                    raise FormError(
                        400,
                        f"{key}: {file} leads to {resolved}, outside the folders this UI may "
                        f"read ({folders}); remove the link or start `longtune ui --allow-dir "
                        "DIR` to allow its folder",
                    )


def parse_form(form: dict[str, Any], runs_dir: Path, allowed: list[Path]) -> NewRun:
    """Check a new-run form and build its config (nothing is written).

    Args:
        form: field -> value, as sent by the browser (strings; lists of paths one per line).
        runs_dir: the runs folder (the run goes to ``runs_dir/name``).
        allowed: the folders models and data may come from.

    Returns:
        The run name, its validated config and the number of processes.

    Raises:
        FormError: 422 for a bad value (the config module's message), 400 for a path outside
            the allowed folders.
    """
    unknown = set(form) - set(FIELDS) - {"name", "nproc", "extra"}
    if unknown:
        raise FormError(422, f"unknown form fields: {', '.join(sorted(unknown))}")
    try:
        name = check_name(str(form.get("name", "")).strip())
    except ValueError as e:
        raise FormError(422, str(e)) from None
    nproc_text = str(form.get("nproc", "1")).strip()
    if (
        not (nproc_text.isascii() and nproc_text.isdecimal())
        or not 1 <= int(nproc_text) <= MAX_NPROC
    ):
        raise FormError(422, f"nproc: {nproc_text!r} is invalid; use 1 to {MAX_NPROC} processes")
    nproc = int(nproc_text)

    values: dict[str, Any] = {}
    try:
        for key, (raw, flag) in flag_values(str(form.get("extra", "")).split()).items():
            if key in RESERVED_KEYS:
                raise FormError(422, f"{flag}: {key} cannot be set in more settings")
            values[key] = raw
    except ConfigError as e:
        raise FormError(422, str(e)) from None
    for field, key in FIELDS.items():
        text = str(form.get(field) or "").strip()
        if not text:
            continue  # left to the config: its default, or its "missing required key" error
        if field == "model":
            values[key] = str(check_path(text, allowed, key))
        elif field in ("train", "eval"):
            values[key] = [str(check_path(p, allowed, key)) for p in text.splitlines() if p.strip()]
        else:
            values[key] = text
    values["output.dir"] = str((runs_dir / name).resolve())
    try:
        cfg = config_from_values(values)
    except ConfigError as e:
        raise FormError(422, str(e)) from None
    return NewRun(name=name, cfg=cfg, nproc=nproc)
