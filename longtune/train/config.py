"""Run configuration: nested dataclasses, one YAML file, ``--section.key=value`` overrides.

Precedence is CLI > file > defaults. Everything that can be checked without knowing the world
size is validated by :func:`load_config`, before any process group or allocation; the parallel
degrees, which need the world size and the model's heads, are checked by
``longtune.parallel.dims.ParallelDims.build``.

Example::

    cfg = load_config("run.yaml", ["--optim.lr=3e-5", "--task-type", "chat"])
    grad_accum = resolve_grad_accum(cfg, dp_size=4)

This module imports no torch, so the CLI can validate a config cheaply.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from longtune.model.args import ATTENTION_BACKENDS
from longtune.run_dir import RunDir


class ConfigError(ValueError):
    """A configuration value is missing, unknown or invalid; the message names the key."""


@dataclass(frozen=True)
class Duration:
    """How long to train: ``value`` epochs (``unit="ep"``) or optimizer steps (``unit="st"``)."""

    value: int
    unit: str

    def __post_init__(self) -> None:
        if self.unit not in DURATION_UNITS:
            raise ValueError(f"duration unit {self.unit!r} is not one of ep, st")
        if isinstance(self.value, bool) or not isinstance(self.value, int) or self.value <= 0:
            raise ValueError(f"duration value must be a positive integer, got {self.value!r}")

    def __str__(self) -> str:
        return f"{self.value}{self.unit}"

    @classmethod
    def parse(cls, text: str) -> Duration:
        """Parse ``"3ep"`` (epochs) or ``"500st"`` (optimizer steps).

        Args:
            text: the duration string.

        Returns:
            The parsed Duration.

        Raises:
            ValueError: if the text is not of the form ``<positive int>ep`` or ``<positive int>st``.
        """
        match = re.fullmatch(r"\s*(\d+)\s*(ep|st)\s*", str(text))
        if match is None or int(match.group(1)) <= 0:
            raise ValueError(
                f"{text!r} is not a duration; use e.g. '3ep' (epochs) or '500st' (optimizer steps)"
            )
        return cls(int(match.group(1)), match.group(2))


DURATION_UNITS = ("ep", "st")


@dataclass
class ModelConfig:
    path: str
    """Hugging Face checkpoint folder (config.json, *.safetensors, tokenizer files). Required."""

    dtype: str = "auto"
    """Parameter/compute dtype: auto | float32 | bfloat16 (auto = bfloat16 on CUDA, float32 on CPU)."""

    activation_checkpointing: str = "selective"
    """Activation checkpointing mode: none | selective | full."""

    attention: str = "auto"
    """Attention kernel: auto | sdpa | varlen | flex (auto = SDPA for unpacked sequences,
    varlen_attn (FlashAttention-2, or -3 when installed) for packed ones on CUDA, per-document
    SDPA on CPU; varlen and flex need CUDA)."""


@dataclass
class DataConfig:
    train: list[str]
    """Training data files or folders (JSONL or text); comma-separated on the command line
    (write a comma inside a file name as \\,). Required."""

    eval: list[str] = field(default_factory=list)
    """Evaluation data files; empty = no evaluation."""

    task_type: str = "chat"
    """Format of the data lines: chat | instruction | text."""

    context_length: int = 8192
    """Tokens per packed sequence (the full sequence, before sequence-parallel slicing; padded
    up to a multiple of parallel.sp with tokens that carry no loss and that no document sees)."""

    loss_on: str = "all_assistant"
    """Which tokens carry loss in chat data: all_assistant | last_assistant."""

    overlength: str = "truncate"
    """What to do with an example longer than context_length: truncate | drop | split (into
    context-length pieces, e.g. long texts for continued pre-training)."""

    cache_dir: str | None = None
    """Where to cache tokenized data; None = ~/.cache/longtune/tokens."""


@dataclass
class OptimConfig:
    lr: float = 1e-5
    """Peak learning rate (AdamW)."""

    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""

    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas; 'b1,b2' on the command line."""

    eps: float = 1e-8
    """AdamW epsilon."""

    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 = no clipping."""

    warmup_steps: int = 0
    """Optimizer steps of linear learning-rate warmup from ~0 to lr."""

    schedule: str = "cosine"
    """Learning-rate decay after warmup: cosine | linear | constant."""

    min_lr_ratio: float = 0.0
    """Final learning rate as a fraction of lr (cosine and linear schedules)."""


@dataclass
class TrainConfig:
    duration: Duration = Duration(1, "ep")
    """Training length: 'Nep' = N epochs, 'Nst' = N optimizer steps."""

    micro_batch_size: int = 1
    """Packed sequences per forward/backward on each data-parallel rank."""

    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step; derived instead when batch_tokens is set."""

    batch_tokens: int | None = None
    """Target tokens per optimizer step over all data-parallel ranks; derives grad_accum
    (rounded up). Leave grad_accum at 1 when setting this."""

    seed: int = 0
    """Seed for model init, data order and dropout; identical on every rank of an SP group."""

    eval_every: int = 0
    """Evaluate every N optimizer steps; 0 = only at the start and at the end."""

    eval_batches: int = 0
    """Micro-batches per evaluation; 0 = the whole eval set."""

    compile: str = "auto"
    """torch.compile each block (fuses norms, RoPE, SwiGLU): auto | true | false (auto = on
    with CUDA, off on CPU)."""


@dataclass
class ParallelConfig:
    sp: int = 1
    """Sequence-parallel (Ulysses) degree: ranks that share one sequence."""

    dp: int = -1
    """Data-parallel degree; -1 = world_size / sp."""

    timeout_s: float = 300.0
    """Seconds a collective waits for a peer: if a rank dies (killed, out of memory), the others
    exit with an error after at most this long instead of hanging."""

    keep_exchanges: bool = False
    """With sp > 1 and selective checkpointing: keep the all-to-all outputs instead of
    exchanging again in the backward pass (fewer exchanges, about twice the activation memory)."""


@dataclass
class CheckpointConfig:
    every: int = 0
    """Save a checkpoint every N optimizer steps; 0 = only at the end."""

    keep_last: int = 2
    """Number of complete checkpoints to keep (older ones are deleted)."""

    resume: str = "auto"
    """auto = resume from the newest complete checkpoint in output.dir if any; never = start
    fresh; otherwise a checkpoint directory to resume from."""


@dataclass
class OutputConfig:
    dir: str = "runs/longtune"
    """Run directory: checkpoints, metrics.jsonl, train.log, config.yaml, the exported model."""

    tensorboard: bool = False
    """Also write TensorBoard event files (needs the tensorboard package)."""

    mlflow: bool = False
    """Also log to MLflow (needs the mlflow package; uses MLflow's own environment settings)."""


@dataclass
class JobConfig:
    model: ModelConfig
    data: DataConfig
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    output: OutputConfig = field(default_factory=OutputConfig)


#: Plain CLI flags and the config keys they set (``--lr 3e-5`` == ``--optim.lr=3e-5``).
FLAG_ALIASES: dict[str, str] = {
    "model": "model.path",
    "data": "data.train",
    "eval-data": "data.eval",
    "task-type": "data.task_type",
    "context-length": "data.context_length",
    "duration": "train.duration",
    "lr": "optim.lr",
    "warmup": "optim.warmup_steps",
    "batch-tokens": "train.batch_tokens",
    "micro-batch-size": "train.micro_batch_size",
    "grad-accum": "train.grad_accum",
    "seed": "train.seed",
    "output-dir": "output.dir",
    "resume": "checkpoint.resume",
    "sp": "parallel.sp",
}

#: Keys whose value must be one of a fixed set.
CHOICES: dict[str, tuple[str, ...]] = {
    "model.dtype": ("auto", "float32", "bfloat16"),
    "model.activation_checkpointing": ("none", "selective", "full"),
    "model.attention": ATTENTION_BACKENDS,
    "train.compile": ("auto", "true", "false"),
    "data.task_type": ("chat", "instruction", "text"),
    "data.loss_on": ("all_assistant", "last_assistant"),
    "data.overlength": ("truncate", "drop", "split"),
    "optim.schedule": ("cosine", "linear", "constant"),
}

#: Keys that hold a list of paths (comma-separated on the command line, ``\,`` escapes).
PATH_LISTS = ("data.train", "data.eval")

_SECTIONS: dict[str, type] = typing.get_type_hints(JobConfig)
_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")
_NONE = ("none", "null", "~", "")


def _section_fields(section: str) -> dict[str, Any]:
    """Field name -> resolved type annotation for one section."""
    return typing.get_type_hints(_SECTIONS[section])


def _known_keys_message(section: str) -> str:
    return f"known keys in {section}: {', '.join(_section_fields(section))}"


def _check_key(key: str, source: str) -> tuple[str, str]:
    """Split ``section.name`` and check both parts exist."""
    section, dot, name = key.partition(".")
    if not dot or not name:
        raise ConfigError(
            f"{source}: {key!r} is not a config key; use section.key "
            f"(sections: {', '.join(_SECTIONS)}) or one of the flags {', '.join(FLAG_ALIASES)}"
        )
    if section not in _SECTIONS:
        raise ConfigError(
            f"{source}: unknown section {section!r} in {key!r} (known sections: {', '.join(_SECTIONS)})"
        )
    if name not in _section_fields(section):
        raise ConfigError(f"{source}: unknown key {key!r} ({_known_keys_message(section)})")
    return section, name


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Convert a YAML value or a command-line string to the field's annotated type."""
    where = f"{key} (from {source})"
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.strip().lower() in _NONE):
            return None
        return _coerce(value, args[0], key, source)
    if value is None:
        raise ConfigError(f"{where}: value must not be empty/null (expected {_type_name(tp)})")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        items = _split_list(value) if isinstance(value, str) else value
        if not isinstance(items, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, key, source) for v in items]
    if origin is tuple:
        item_tps = typing.get_args(tp)
        items = _split_list(value) if isinstance(value, str) else value
        if not isinstance(items, list | tuple) or len(items) != len(item_tps):
            raise ConfigError(
                f"{where}: expected {len(item_tps)} comma-separated values, got {value!r}"
            )
        return tuple(_coerce(v, t, key, source) for v, t in zip(items, item_tps, strict=True))
    if tp is Duration:
        if isinstance(value, Duration):
            return value
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a duration like '3ep' or '500st', got {value!r}")
        return _parse(Duration.parse, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise ConfigError(f"{where}: {value!r} is not a boolean; use true or false")
    if tp is int:
        if isinstance(value, bool) or isinstance(value, float):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        return _parse(int, str(value).strip(), where)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if isinstance(value, int | float):
            return float(value)
        return _parse(float, str(value).strip(), where)
    if tp is str:
        if isinstance(value, dict | list | tuple):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    raise TypeError(f"config field {key} has unsupported type {tp!r}")


def _parse(fn: Any, text: str, where: str) -> Any:
    """Call a parser, turning its ValueError into a ConfigError naming the key."""
    try:
        return fn(text)
    except ValueError as exc:
        raise ConfigError(f"{where}: could not parse {text!r}: {exc}") from None


def _split_list(text: str) -> list[str]:
    """Split a command-line list on commas; ``\\,`` is a comma inside an item (a file name)."""
    parts = re.split(r"(?<!\\),", text)
    return [p.strip().replace("\\,", ",") for p in parts if p.strip()]


def _check_comma_paths(key: str, raw: Any, paths: list[str]) -> None:
    """A path list split on a comma that belongs to a file name: say so and how to escape it."""
    if not isinstance(raw, str) or "," not in raw or all(os.path.exists(p) for p in paths):
        return
    for i in range(len(paths)):
        for j in range(i + 2, len(paths) + 1):
            joined = ",".join(paths[i:j])
            if os.path.exists(joined):
                raise ConfigError(
                    f"{key}: {joined!r} is one path whose name holds a comma, but commas "
                    f"separate paths here; write it as '{joined.replace(',', chr(92) + ',')}' "
                    "or list it in the YAML file"
                )


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def parse_overrides(overrides: list[str]) -> list[tuple[str, str, str]]:
    """Turn command-line tokens into ``(section.key, raw string value)`` pairs.

    Accepted forms: ``--optim.lr=3e-5``, ``optim.lr=3e-5``, ``--optim.lr 3e-5``, the aliases of
    :data:`FLAG_ALIASES` (``--lr=3e-5``, ``--task-type chat``) and, for booleans, a bare
    ``--output.tensorboard`` meaning true. Dashes in key names are read as underscores.

    Args:
        overrides: the tokens, in command-line order (later ones win).

    Returns:
        ``(dotted key, value string, flag as typed)`` triples, keys checked against the config
        sections.

    Raises:
        ConfigError: for an unknown key, an unknown flag or a flag without a value.
    """
    pairs: list[tuple[str, str, str]] = []
    i = 0
    while i < len(overrides):
        token = overrides[i]
        i += 1
        body = token[2:] if token.startswith("--") else token
        if not token.startswith("--") and "=" not in token:
            raise ConfigError(
                f"unexpected argument {token!r}; overrides look like --section.key=value"
            )
        name, eq, value = body.partition("=")
        key = FLAG_ALIASES.get(name) or _normalize_key(name)
        section, field_name = _check_key(key, f"--{name}")
        if not eq:
            is_bool = _section_fields(section)[field_name] is bool
            has_value = i < len(overrides) and not overrides[i].startswith("--")
            if has_value:
                value = overrides[i]
                i += 1
            elif is_bool:
                value = "true"
            else:
                raise ConfigError(f"--{name} needs a value: --{name}=VALUE or --{name} VALUE")
        pairs.append((key, value, f"--{name}"))
    return pairs


def _normalize_key(name: str) -> str:
    section, dot, rest = name.partition(".")
    return f"{section}{dot}{rest.replace('-', '_')}"


def _read_yaml(path: str) -> dict[str, dict[str, Any]]:
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"config file {path!r} does not exist or is not a file")
    try:
        data = yaml.safe_load(file.read_text())
    except yaml.MarkedYAMLError as e:  # syntax errors and tags such as !!python/object
        mark = e.problem_mark or e.context_mark
        line = f":{mark.line + 1}" if mark is not None else ""
        what = " ".join(str(p) for p in (e.context, e.problem) if p)
        if e.problem and "could not determine a constructor" in e.problem:
            what = f"{e.problem.split(' for the tag ')[-1]} is not allowed (plain YAML values only)"
        raise ConfigError(f"config file {path}{line}: {what}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path}: not readable YAML ({e})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: top level must be a mapping of sections")
    for section, body in data.items():
        if section not in _SECTIONS:
            raise ConfigError(
                f"config file {path}: unknown section {section!r} "
                f"(known sections: {', '.join(_SECTIONS)})"
            )
        if body is None:
            data[section] = {}
        elif not isinstance(body, dict):
            raise ConfigError(
                f"config file {path}: section {section!r} must be a mapping of keys, got {body!r}"
            )
    return data


def load_config(path: str | None, overrides: list[str]) -> JobConfig:
    """Build and validate the run configuration from defaults, a YAML file and CLI overrides.

    Args:
        path: YAML file with one mapping per section (``model:``, ``optim:``, ...), or None.
        overrides: command-line tokens such as ``["--optim.lr=3e-5", "--task-type", "chat"]``;
            they take precedence over the file.

    Returns:
        The validated JobConfig.

    Raises:
        ConfigError: naming the key, for unknown keys, missing required keys, unparsable
            values and values out of range (choices are listed).
    """
    values = _file_values(path)
    for key, value, flag in parse_overrides(overrides):
        section, name = key.split(".", 1)
        values[section][name] = (value, flag)
    return _build(values)


def config_from_values(values: dict[str, Any], path: str | None = None) -> JobConfig:
    """Build and validate the run configuration from typed values (the Python API's way).

    Same precedence and checks as :func:`load_config` (values > file > defaults), without a
    round trip through command-line strings: ``{"data.train": ["a.jsonl"], "optim.lr": 3e-5,
    "train.duration": "2ep"}``. A plain string given for a list setting is one item (a path
    with a comma in it stays one path).

    Args:
        values: ``"section.key"`` -> value (Python types: str, int, float, bool, list, tuple,
            :class:`Duration` or its string form).
        path: optional YAML file under the values.

    Returns:
        The validated JobConfig.

    Raises:
        ConfigError: naming the key, exactly as :func:`load_config`.
    """
    merged = _file_values(path)
    for key, value in values.items():
        section, name = _check_key(key, f"argument {key}")
        tp = _section_fields(section)[name]
        if isinstance(value, str) and typing.get_origin(_strip_optional(tp)) is list:
            value = [value]
        merged[section][name] = (value, f"argument {key}")
    return _build(merged)


def _strip_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp
    return tp


def _file_values(path: str | None) -> dict[str, dict[str, tuple[Any, str]]]:
    """``{section: {name: (raw value, where it came from)}}`` from a YAML file (or empty)."""
    values: dict[str, dict[str, tuple[Any, str]]] = {name: {} for name in _SECTIONS}
    if path is not None:
        for section, body in _read_yaml(path).items():
            for name, value in body.items():
                _check_key(f"{section}.{name}", f"config file {path}")
                values[section][name] = (value, f"config file {path}")
    return values


def _build(values: dict[str, dict[str, tuple[Any, str]]]) -> JobConfig:
    """Coerce every given value to its field's type, fill defaults, validate."""
    sections: dict[str, Any] = {}
    for section, cls in _SECTIONS.items():
        hints = _section_fields(section)
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            key = f"{section}.{f.name}"
            if f.name in values[section]:
                raw, source = values[section][f.name]
                kwargs[f.name] = _coerce(raw, hints[f.name], key, source)
                if key in PATH_LISTS:
                    _check_comma_paths(key, raw, kwargs[f.name])
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                flag = next((a for a, k in FLAG_ALIASES.items() if k == key), None)
                hint = f" or --{flag}" if flag else ""
                raise ConfigError(
                    f"missing required key {key!r}: set it in the config file or with --{key}=...{hint}"
                )
        sections[section] = cls(**kwargs)
    cfg = JobConfig(**sections)
    validate_config(cfg)
    return cfg


def _ensure(ok: bool, key: str, value: Any, requirement: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {value!r} is invalid; {requirement}")


def validate_config(cfg: JobConfig) -> None:
    """Check every value and cross-field constraint that does not need the world size.

    Args:
        cfg: the configuration to check (load_config already calls this).

    Raises:
        ConfigError: naming the first bad key, its value and what would be valid.
    """
    for key, choices in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(choices)}")
    m, d, o, t, p, c = cfg.model, cfg.data, cfg.optim, cfg.train, cfg.parallel, cfg.checkpoint
    _ensure(bool(m.path.strip()), "model.path", m.path, "give the Hugging Face checkpoint folder")
    _ensure(len(d.train) > 0, "data.train", d.train, "give at least one training data file")
    _ensure(d.context_length >= 2, "data.context_length", d.context_length, "must be >= 2")
    _ensure(o.lr > 0 and math.isfinite(o.lr), "optim.lr", o.lr, "must be a finite number > 0")
    _ensure(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "must be >= 0")
    _ensure(all(0.0 <= b < 1.0 for b in o.betas), "optim.betas", o.betas, "each must be in [0, 1)")
    _ensure(o.eps > 0, "optim.eps", o.eps, "must be > 0")
    _ensure(o.grad_clip >= 0, "optim.grad_clip", o.grad_clip, "must be >= 0 (0 = no clipping)")
    _ensure(o.warmup_steps >= 0, "optim.warmup_steps", o.warmup_steps, "must be >= 0")
    _ensure(0.0 <= o.min_lr_ratio <= 1.0, "optim.min_lr_ratio", o.min_lr_ratio, "must be in [0, 1]")
    if t.duration.unit == "st":
        _ensure(
            o.warmup_steps <= t.duration.value,
            "optim.warmup_steps",
            o.warmup_steps,
            f"must be <= the {t.duration.value} optimizer steps of train.duration={t.duration}",
        )
    _ensure(t.micro_batch_size >= 1, "train.micro_batch_size", t.micro_batch_size, "must be >= 1")
    _ensure(t.grad_accum >= 1, "train.grad_accum", t.grad_accum, "must be >= 1")
    if t.batch_tokens is not None:
        _ensure(t.batch_tokens > 0, "train.batch_tokens", t.batch_tokens, "must be > 0 or null")
        _ensure(
            t.grad_accum == 1,
            "train.grad_accum",
            t.grad_accum,
            f"train.batch_tokens={t.batch_tokens} derives grad_accum; set only one of the two",
        )
    _ensure(t.seed >= 0, "train.seed", t.seed, "must be >= 0")
    _ensure(t.eval_every >= 0, "train.eval_every", t.eval_every, "must be >= 0 (0 = start and end)")
    _ensure(t.eval_batches >= 0, "train.eval_batches", t.eval_batches, "must be >= 0 (0 = all)")
    _ensure(p.sp >= 1, "parallel.sp", p.sp, "must be >= 1")
    _ensure(p.dp == -1 or p.dp >= 1, "parallel.dp", p.dp, "must be >= 1, or -1 for world_size/sp")
    _ensure(p.timeout_s > 0, "parallel.timeout_s", p.timeout_s, "must be > 0 seconds")
    _ensure(c.every >= 0, "checkpoint.every", c.every, "must be >= 0 (0 = only at the end)")
    _ensure(c.keep_last >= 1, "checkpoint.keep_last", c.keep_last, "must be >= 1")
    _ensure(
        bool(c.resume.strip()), "checkpoint.resume", c.resume, "use auto, never or a checkpoint dir"
    )
    _ensure(bool(cfg.output.dir.strip()), "output.dir", cfg.output.dir, "give a run directory")


def resolve_grad_accum(cfg: JobConfig, dp_size: int) -> int:
    """Micro-batches per optimizer step.

    With ``train.batch_tokens`` set this is ``ceil(batch_tokens / (micro_batch_size *
    context_length * dp_size))`` (SP ranks share one sequence, so only dp counts);
    otherwise ``train.grad_accum``.

    Args:
        cfg: the configuration.
        dp_size: the data-parallel degree (``ParallelDims.dp``).

    Returns:
        The gradient-accumulation steps, >= 1.
    """
    if dp_size < 1:
        raise ValueError(f"dp_size must be >= 1, got {dp_size}")
    if cfg.train.batch_tokens is None:
        return cfg.train.grad_accum
    per_micro_step = cfg.train.micro_batch_size * cfg.data.context_length * dp_size
    return max(1, math.ceil(cfg.train.batch_tokens / per_micro_step))


def config_to_dict(cfg: JobConfig) -> dict[str, dict[str, Any]]:
    """Plain nested dict of the config (YAML/JSON-safe: durations as strings, tuples as lists).

    Args:
        cfg: the configuration.

    Returns:
        ``{section: {key: value}}`` for every field, defaults included.
    """
    out: dict[str, dict[str, Any]] = {}
    for section in _SECTIONS:
        obj = getattr(cfg, section)
        out[section] = {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, Duration):
        return str(value)
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def save_config(cfg: JobConfig, path: str | Path) -> None:
    """Write the fully resolved configuration as YAML; ``load_config(path, [])`` gives it back.

    Args:
        cfg: the configuration.
        path: the YAML file to write (parent directories are created).
    """
    file = Path(path)
    file.parent.mkdir(parents=True, exist_ok=True)
    values = config_to_dict(cfg)
    for key in PATH_KEYS:
        section, name = key.split(".")
        values[section][name] = _absolute(values[section][name])
    file.write_text(yaml.safe_dump(values, sort_keys=False))


PATH_KEYS = (
    "model.path",
    "data.train",
    "data.eval",
    "data.cache_dir",
    "output.dir",
    "checkpoint.resume",
)
"""Settings holding paths. A saved config holds them absolute (resolved against the folder the
run was started from), so the file means the same wherever it is read (a resume from the web UI
or from another shell); resume compares them resolved."""


def _absolute(value: Any) -> Any:
    if isinstance(value, list):
        return [_absolute(v) for v in value]
    if not value or value in ("auto", "never"):  # checkpoint.resume's words, an unset cache
        return value
    return os.path.abspath(value)


@cache
def field_docs() -> dict[str, str]:
    """The docstring of every config field, keyed ``section.key`` (for CLI help).

    Returns:
        Mapping from dotted key to the field's docstring, whitespace collapsed.
    """
    tree = ast.parse(inspect.getsource(inspect.getmodule(JobConfig)))
    by_class: dict[str, dict[str, str]] = {}
    for node in tree.body:
        if not isinstance(node, ast.ClassDef):
            continue
        docs: dict[str, str] = {}
        for stmt, nxt in zip(node.body, node.body[1:], strict=False):
            is_doc = isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and is_doc:
                docs[stmt.target.id] = " ".join(str(nxt.value.value).split())
        by_class[node.name] = docs
    return {
        f"{section}.{name}": doc
        for section, cls in _SECTIONS.items()
        for name, doc in by_class.get(cls.__name__, {}).items()
    }


# ---------------------------------------------------------------------------------------------
# Resuming a run: what may change
# ---------------------------------------------------------------------------------------------

#: Settings a resumed run may change freely: where and how the job runs, what it writes, how
#: often it evaluates and saves. Everything else is compared with the run's own config.yaml.
RESUME_FREE_SECTIONS = ("parallel", "checkpoint", "output")
RESUME_FREE_KEYS = (
    "model.activation_checkpointing",
    "model.attention",
    "train.compile",
    "data.cache_dir",
    "train.eval_every",
    "train.eval_batches",
)
#: May change as long as the global batch (sequences per optimizer step) stays the same.
RESUME_BATCH_KEYS = ("train.grad_accum", "train.batch_tokens")
#: Optimizer settings and the run's length: fixed for a run (refused on resume, like the data
#: and model settings, but with another way out: a new run from the exported model).
RESUME_TRAINING_SECTIONS = ("optim",)
RESUME_TRAINING_KEYS = ("train.duration",)


def check_resume_config(
    old: JobConfig, new: JobConfig, old_batch: int, new_batch: int, run_dir: str | Path
) -> None:
    """Refuse to resume a run with settings that differ from the ones it was trained with.

    Args:
        old: the run's own config (its ``config.yaml``).
        new: the config of the resuming start.
        old_batch: sequences per optimizer step when the checkpoint was written.
        new_batch: sequences per optimizer step now (micro-batch x grad_accum x dp).
        run_dir: the run folder (for the message).

    Raises:
        ConfigError: one message listing every refused difference (old → new) and what to do.
    """
    data_model: list[str] = []
    training: list[str] = []
    old_d, new_d = config_to_dict(old), config_to_dict(new)
    for section, fields in new_d.items():
        for name, value in fields.items():
            key, before = f"{section}.{name}", old_d[section][name]
            if key in PATH_KEYS:
                value, before = _absolute(value), _absolute(before)
            if value == before or section in RESUME_FREE_SECTIONS or key in RESUME_FREE_KEYS:
                continue
            if key in RESUME_BATCH_KEYS:
                continue  # judged by the global batch below
            change = f"{key}: {_show(before)} → {_show(value)}"
            if section in RESUME_TRAINING_SECTIONS or key in RESUME_TRAINING_KEYS:
                training.append(change)
            else:
                data_model.append(change)
    if old_batch != new_batch:
        data_model.append(
            f"global batch: {old_batch} → {new_batch} sequences per optimizer step "
            "(micro_batch_size x grad_accum x data-parallel ranks; change grad_accum or "
            "batch_tokens only together with the number of ranks)"
        )
    if not data_model and not training:
        return
    parts = []
    if data_model:
        parts.append(f"{', '.join(data_model)} (these change the data or the model)")
    if training:
        parts.append(
            f"{', '.join(training)} (optimizer settings and the length of a run are fixed)"
        )
    run = RunDir(run_dir)
    raise ConfigError(
        f"cannot resume {run.path} with changed settings: {'; '.join(parts)}. Resume with the "
        f"run's own settings ({run.config}), or start a new run from its exported model "
        f"(--model {run.export}, or `longtune export` a checkpoint first) in another output "
        "folder"
    )


def _show(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(str(v) for v in value) or "[]"
    return str(value)
