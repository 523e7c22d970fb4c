"""Run configuration: nested dataclasses, one YAML file, ``--section.key=value`` overrides.

Precedence is CLI > file > defaults. Everything that can be checked without knowing the world
size is validated by :func:`load_config`, before any process group or allocation; the parallel
degrees, which need the world size and the model's heads, are checked by
``longtune.parallel.dims.ParallelDims.build``.

Example::

    cfg = load_config("run.yaml", ["--optim.lr=3e-5", "--task-type", "chat"])
    grad_accum = resolve_grad_accum(cfg, dp_size=4)

The sections are pydantic dataclasses (not ``BaseModel``s): to the code that reads them they are
plain dataclasses (``cfg.optim.lr``, ``==``, ``dataclasses.replace``), while pydantic validates
every value that comes in, from a YAML file, the command line, the Python API or the web form.
A field whose type is another such dataclass is a group of settings inside its section
(``model.lora``): its fields are settings too, ``--model.lora.rank=16`` on the command line,
``model: {lora: {rank: 16}}`` in YAML, ``model__lora__rank=16`` in ``longtune.finetune``.
Choices are ``Literal`` types, ranges are ``Field`` bounds, the rules between keys are one model
validator, and each field's doc is the docstring under it. The command line is an ``argparse``
parser generated from the same fields (:func:`flag_parser`, which is also ``longtune train
--help``). Pydantic's first error becomes one line: the key, where the value came from, the value
and what is valid.

This module imports no torch, so the CLI can validate a config cheaply.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
import os
import re
import types
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import yaml
from pydantic import (
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    TypeAdapter,
    ValidationError,
    model_validator,
)
from pydantic.dataclasses import dataclass, is_pydantic_dataclass
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails

from longtune.model.args import ATTENTION_BACKENDS

if TYPE_CHECKING:
    from longtune.model.lora import LoraSpec


class ConfigError(ValueError):
    """A configuration value is missing, unknown or invalid; the message names the key."""


@dataclasses.dataclass(frozen=True)
class Duration:
    """How long to train: ``value`` epochs (``unit="ep"``) or optimizer steps (``unit="st"``)."""

    value: int
    unit: str

    def __str__(self) -> str:
        return f"{self.value}{self.unit}"

    @classmethod
    def parse(cls, text: str) -> Duration:
        """``"3ep"`` (epochs) or ``"500st"`` (optimizer steps) as a Duration.

        Raises:
            ValueError: the text is not ``<positive int>ep`` or ``<positive int>st``.
        """
        match = re.fullmatch(r"\s*(\d+)\s*(ep|st)\s*", str(text))
        if match is None or not 0 < int(match.group(1)) <= MAX_INT:
            raise ValueError(
                f"{text!r} is not a duration; use e.g. '3ep' (epochs) or '500st' (optimizer steps)"
            )
        return cls(int(match.group(1)), match.group(2))


MAX_INT = 2**31 - 1
"""Upper bound of the count settings (what an index or a C int holds)."""


def _number(value: Any) -> Any:
    if isinstance(value, bool):  # pydantic would read true as 1
        raise ValueError(f"{value!r} is not a number")
    return value


def _degree(value: Any) -> Any:
    """``parallel.sp``: a whole number >= 1, or ``auto``."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value).strip()
    if isinstance(value, bool) or not text.isdigit() or not 1 <= int(text) <= MAX_INT:
        raise ValueError(f"{value!r} is invalid; give a whole number >= 1, or auto")
    return int(text)


def _none(value: Any) -> Any:
    """``none``, ``null``, ``~`` or nothing leaves an optional setting unset."""
    unset = isinstance(value, str) and value.strip().lower() in ("none", "null", "~", "")
    return None if unset else value


def _columns_flags(tokens: list[str]) -> list[str]:
    """``--data.columns.messages=dialog`` (one flag per column) -> ``--data.columns=...``."""
    prefix = re.compile(r"^(--)?data\.columns\.(\w+)=(.*)$")
    pairs = [m.group(2, 3) for t in tokens if (m := prefix.match(t))]
    if not pairs:
        return tokens
    rest = [t for t in tokens if not prefix.match(t)]
    return [*rest, "--data.columns=" + ",".join(f"{name}={col}" for name, col in pairs)]


def _duration(value: Any) -> Duration:
    return value if isinstance(value, Duration) else Duration.parse(value)


def _bool_word(value: Any) -> Any:
    """YAML reads ``compile: true`` as a boolean: the same as the word."""
    return str(value).lower() if isinstance(value, bool) else value


def _pair(value: Any) -> Any:
    """``"0.9,0.95"`` (the command line's form) -> two items; anything else must have two."""
    items = value.split(",") if isinstance(value, str) else value
    if isinstance(items, list | tuple) and len(items) != 2:
        raise ValueError(f"{value!r} is invalid; give two numbers, e.g. 0.9,0.95")
    return items


def _paths(value: Any) -> Any:
    """Split a path list given as text on commas (``\\,`` is a comma inside a file name), and
    refuse a split that cuts the name of a file that exists."""
    if not isinstance(value, str):
        return value
    paths = [p.strip().replace("\\,", ",") for p in re.split(r"(?<!\\),", value) if p.strip()]
    if not all(os.path.exists(p) for p in paths):
        for i, j in itertools.combinations(range(len(paths) + 1), 2):
            joined = ",".join(paths[i:j])
            if j - i > 1 and os.path.exists(joined):
                raise ValueError(
                    f"{joined!r} is one path whose name holds a comma, but commas separate "
                    f"paths here; write it as '{joined.replace(',', chr(92) + ',')}' or list it "
                    "in the YAML file"
                )
    return paths


def _columns(value: Any) -> Any:
    """``"messages=dialog,text=body"`` (the command line's form) -> a mapping."""
    if not isinstance(value, str):
        return value
    out = {}
    for item in (w.strip() for w in value.split(",") if w.strip()):
        name, eq, column = item.partition("=")
        if not eq:
            raise ValueError(f"{item!r} is not NAME=COLUMN, e.g. messages=dialog")
        out[name.strip()] = column.strip()
    return out


def _words(value: Any) -> Any:
    """``"hf,gguf"`` (the command line's form) -> its items."""
    return [w.strip() for w in value.split(",") if w.strip()] if isinstance(value, str) else value


# The names data.columns maps (longtune.data.validation.COLUMNS; a test keeps them equal).
ColumnName = Literal[
    "messages",
    "conversations",
    "system",
    "tools",
    "prompt",
    "response",
    "completion",
    "instruction",
    "input",
    "output",
    "text",
]

# The field types: what a YAML value, a flag's text or a Python value goes through first.
Int = Annotated[int, BeforeValidator(_number)]
Float = Annotated[float, BeforeValidator(_number)]
Beta = Annotated[float, BeforeValidator(_number), Field(ge=0, lt=1)]
NonEmpty = Annotated[str, Field(min_length=1)]
# A path setting is written out absolute (resolved against the folder the run was started
# from), so a saved config means the same wherever it is read (a resume from the web UI or from
# another shell), and a resume compares paths resolved.
PathText = Annotated[
    NonEmpty, PlainSerializer(lambda p: p if p in ("auto", "never") else os.path.abspath(p))
]
Paths = Annotated[list[PathText], BeforeValidator(_paths)]
DurationText = Annotated[Duration, PlainValidator(_duration), PlainSerializer(str)]

_FIELDS = ConfigDict(
    extra="forbid",  # an unknown key is an error, never dropped
    use_attribute_docstrings=True,  # the docstring under a field is its --help text
    coerce_numbers_to_str=True,  # `path: 123` in YAML is the folder "123"
    allow_inf_nan=False,  # every float setting is finite
)


# The projections of a Llama block that can get LoRA adapters (Hugging Face module names):
# longtune.model.lora.LORA_TARGETS (this module imports no torch; a test keeps them equal).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

#: Shorthands of model.lora.targets.
LORA_TARGET_GROUPS: dict[str, tuple[str, ...]] = {
    "all": LORA_TARGETS,
    "all-linear": LORA_TARGETS,  # PEFT's word for it
    "attention": LORA_TARGETS[:4],
    "mlp": LORA_TARGETS[4:],
}


def _targets(value: Any) -> Any:
    """``"q_proj,v_proj"`` or a shorthand (all, attention, mlp) -> the projections, each once,
    in :data:`LORA_TARGETS` order."""
    items = _words(value)
    if not isinstance(items, list | tuple):
        return value  # pydantic says what a list is
    wanted: set[str] = set()
    for item in items:
        for word in _words(item) if isinstance(item, str) else [item]:
            if word not in LORA_TARGETS and word not in LORA_TARGET_GROUPS:
                valid = ", ".join([*LORA_TARGETS, *LORA_TARGET_GROUPS])
                raise ValueError(f"{word!r} is not one of {valid}")
            wanted.update(LORA_TARGET_GROUPS.get(word, (word,)))
    return [t for t in LORA_TARGETS if t in wanted]


@dataclass(config=_FIELDS)
class LoraConfig:
    rank: Int = Field(0, ge=0, le=4096)
    """LoRA rank: 0 = full fine-tuning (every weight trained, the default); > 0 trains low-rank
    adapters on model.lora.targets and freezes the rest of the model."""

    alpha: Annotated[Float | None, BeforeValidator(_none)] = Field(None, gt=0, le=1e6)
    """Adapter scale: alpha / rank (alpha / sqrt(rank) with rslora); none = 2 x rank."""

    dropout: Float = Field(0.0, ge=0, lt=1)
    """Dropout on the adapters' input (PEFT's lora_dropout)."""

    targets: Annotated[list[Literal[LORA_TARGETS]], BeforeValidator(_targets)] = Field(
        default_factory=lambda: list(LORA_TARGETS), min_length=1
    )
    """Projections that get adapters (HF module names, comma-separated): q_proj, k_proj,
    v_proj, o_proj, gate_proj, up_proj, down_proj, or all (or all-linear) | attention (q, k, v,
    o) | mlp (gate, up, down)."""

    rslora: bool = False
    """Rank-stabilized LoRA: scale alpha / sqrt(rank)."""

    train_embeddings: bool = False
    """Also train the input embeddings and the output layer in full (PEFT's modules_to_save)."""

    def effective_alpha(self) -> float:
        """``alpha``, or its default 2 x rank when unset."""
        return float(self.alpha) if self.alpha is not None else 2.0 * self.rank


@dataclass(config=_FIELDS)
class ModelConfig:
    path: PathText
    """Hugging Face checkpoint folder (config.json, *.safetensors, tokenizer files)."""

    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Parameter/compute dtype: auto | float32 | bfloat16 (auto = bfloat16 on CUDA, float32 on CPU)."""

    activation_checkpointing: Literal["auto", "none", "selective", "full"] = "selective"
    """Activation checkpointing mode: auto | none | selective | full (auto = the planner picks
    the fastest mode that fits)."""

    offload_activations: Annotated[
        Literal["auto", "true", "false"], BeforeValidator(_bool_word)
    ] = "false"
    """Keep the block inputs that activation checkpointing saves in pinned host memory, moved on
    a side stream (CUDA only): auto | true | false (auto = when the planner says the layout
    needs it)."""

    tiled_mlp: Annotated[Literal["auto", "true", "false"], BeforeValidator(_bool_word)] = "auto"
    """Run the MLP (and the RMSNorms' float32 work) over the sequence in tiles, forward and
    backward (the L x ffn_dim intermediates never exist whole): auto = when the planner says the
    layout needs it | true | false."""

    attention: Literal["auto", "sdpa", "varlen", "flex"] = "auto"
    """Attention kernel: auto | sdpa | varlen | flex (auto = SDPA for unpacked sequences,
    varlen_attn (FlashAttention-2, or -3 when installed) for packed ones on CUDA, per-document
    SDPA on CPU; varlen and flex need CUDA)."""

    lora: LoraConfig = Field(default_factory=LoraConfig)
    """LoRA adapters instead of full fine-tuning (model.lora.rank > 0)."""


@dataclass(config=_FIELDS)
class DataConfig:
    train: Paths = Field(min_length=1)
    """Training data files or folders (JSONL or text); comma-separated on the command line
    (write a comma inside a file name as \\,)."""

    eval: Paths = Field(default_factory=list)
    """Evaluation data files; empty = no evaluation."""

    mix: Annotated[list[Annotated[Float, Field(gt=0, le=1e9)]], BeforeValidator(_words)] = Field(
        default_factory=list
    )
    """Weights mixing the data.train entries (each file or folder one dataset), one per entry,
    e.g. 3,1: an epoch holds as many sequences as all the data, each dataset's share in
    proportion to its weight (repeating a small dataset, sampling a large one), in a seeded
    order; empty = all files packed together."""

    task_type: Literal["chat", "instruction", "text"] = "chat"
    """What the examples are: chat (messages, or ShareGPT conversations) | instruction
    (prompt/response, or Alpaca instruction/input/output) | text."""

    format: Literal["auto", "jsonl", "json", "parquet", "arrow", "text"] = "auto"
    """How to read the data files: auto (from each file: .jsonl, .json, .gz/.zst compressed,
    .parquet, .arrow, datasets save_to_disk folders, .txt) | jsonl | json | parquet | arrow |
    text."""

    columns: Annotated[dict[ColumnName, NonEmpty], BeforeValidator(_columns)] = Field(
        default_factory=dict
    )
    """Columns read as the ones longtune knows, NAME=COLUMN[,...], e.g. messages=dialog (names:
    messages, conversations, system, tools, prompt, response, completion, instruction, input,
    output, text); empty = the usual names."""

    context_length: Int = Field(8192, ge=2, le=MAX_INT)
    """Tokens per packed sequence (the full sequence, before sequence-parallel slicing; padded
    up to a multiple of parallel.sp with tokens that carry no loss and that no document sees)."""

    loss_on: Literal["all_assistant", "last_assistant"] = "all_assistant"
    """Which tokens carry loss in chat data: all_assistant | last_assistant."""

    overlength: Literal["truncate", "drop", "split"] = "truncate"
    """What to do with an example longer than context_length: truncate | drop | split (into
    context-length pieces, e.g. long texts for continued pre-training)."""

    cache_dir: Annotated[PathText | None, BeforeValidator(_none)] = None
    """Where to cache tokenized data; None = ~/.cache/longtune/tokens."""

    tokenize_processes: Int = Field(0, ge=0, le=256)
    """Processes to tokenize a data file in; 0 = auto (one per two CPUs, at most 8, for files of
    64 MiB or more on 4+ CPUs; else this process, whose tokenizer uses every CPU already)."""


@dataclass(config=_FIELDS)
class OptimConfig:
    lr: Float = Field(1e-5, gt=0)
    """Peak learning rate (AdamW)."""

    weight_decay: Float = Field(0.0, ge=0)
    """AdamW decoupled weight decay."""

    betas: Annotated[tuple[Beta, Beta], BeforeValidator(_pair)] = (0.9, 0.95)
    """AdamW betas, each in [0, 1); 'b1,b2' on the command line."""

    eps: Float = Field(1e-8, gt=0)
    """AdamW epsilon."""

    grad_clip: Float = Field(1.0, ge=0)
    """Clip the global gradient norm to this value; 0 = no clipping."""

    warmup_steps: Int = Field(0, ge=0, le=MAX_INT)
    """Optimizer steps of linear learning-rate warmup from ~0 to lr."""

    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Learning-rate decay after warmup: cosine | linear | constant."""

    min_lr_ratio: Float = Field(0.0, ge=0, le=1)
    """Final learning rate as a fraction of lr (cosine and linear schedules)."""


@dataclass(config=_FIELDS)
class TrainConfig:
    duration: DurationText = Duration(1, "ep")
    """Training length: 'Nep' = N epochs, 'Nst' = N optimizer steps."""

    micro_batch_size: Int = Field(1, ge=1, le=MAX_INT)
    """Packed sequences per forward/backward on each data-parallel rank."""

    grad_accum: Int = Field(1, ge=1, le=MAX_INT)
    """Micro-batches accumulated per optimizer step; derived instead when batch_tokens is set."""

    batch_tokens: Annotated[Int | None, BeforeValidator(_none)] = Field(None, gt=0, le=MAX_INT)
    """Target tokens per optimizer step over all data-parallel ranks; derives grad_accum
    (rounded up). Leave grad_accum at 1 when setting this."""

    seed: Int = Field(0, ge=0, le=2**32 - 1)
    """Seed for model init, data order and dropout; identical on every rank of an SP group."""

    eval_every: Int = Field(0, ge=0, le=MAX_INT)
    """Evaluate every N optimizer steps; 0 = only at the start and at the end."""

    eval_batches: Int = Field(0, ge=0, le=MAX_INT)
    """Micro-batches per evaluation; 0 = the whole eval set."""

    compile: Annotated[Literal["auto", "true", "false"], BeforeValidator(_bool_word)] = "auto"
    """torch.compile each block (fuses norms, RoPE, SwiGLU): auto | true | false (auto = on
    with CUDA, off on CPU)."""

    plan_check: bool = True
    """Before any weight is read, refuse a layout the memory planner predicts will not fit the
    device (false: try anyway)."""


@dataclass(config=_FIELDS)
class ParallelConfig:
    sp: Annotated[int | Literal["auto"], PlainValidator(_degree)] = 1
    """Sequence-parallel (Ulysses) degree: ranks that share one sequence, or auto (the memory
    planner takes the fastest degree whose layout fits the device; with parallel.dp set,
    world_size / dp)."""

    dp: Int = Field(-1, le=MAX_INT)
    """Data-parallel degree; -1 = world_size / sp."""

    timeout_s: Float = Field(300.0, ge=1, le=7 * 24 * 3600)
    """Seconds a collective waits for a peer: if a rank dies (killed, out of memory), the others
    exit with an error after at most this long instead of hanging."""

    keep_exchanges: bool = False
    """With sp > 1 and selective checkpointing: keep the all-to-all outputs instead of
    exchanging again in the backward pass (fewer exchanges, about twice the activation memory)."""

    cpu_offload: bool = False
    """FSDP2's CPUOffloadPolicy: parameters, gradients and optimizer state in host memory, the
    optimizer step on the CPU (CUDA only; for the largest models on few GPUs)."""


@dataclass(config=_FIELDS)
class CheckpointConfig:
    every: Int = Field(0, ge=0, le=MAX_INT)
    """Save a checkpoint every N optimizer steps; 0 = only at the end."""

    keep_last: Int = Field(2, ge=1, le=MAX_INT)
    """Number of complete checkpoints to keep (older ones are deleted)."""

    resume: PathText = "auto"
    """auto = resume from the newest complete checkpoint in output.dir if any; never = start
    fresh; otherwise a checkpoint directory to resume from."""


@dataclass(config=_FIELDS)
class OutputConfig:
    dir: PathText = "runs/longtune"
    """Run directory: checkpoints, metrics.jsonl, train.log, config.yaml, the exported model."""

    tensorboard: bool = False
    """Also write TensorBoard event files (needs the tensorboard package)."""

    mlflow: bool = False
    """Also log to MLflow (needs the mlflow package; uses MLflow's own environment settings)."""


@dataclass(config=_FIELDS)
class ExportConfig:
    formats: Annotated[list[Literal["hf", "gguf"]], BeforeValidator(_words)] = Field(
        default_factory=lambda: ["hf"], min_length=1
    )
    """What the run writes when it ends: hf = a Hugging Face folder (hf/; always written, the
    other formats are made from it), gguf = also one GGUF file for llama.cpp and Ollama."""

    gguf_type: Literal["auto", "f32", "f16", "bf16", "q8_0"] = "auto"
    """Tensor type of the GGUF file: auto (the Hugging Face export's dtype) | f32 | f16 | bf16 |
    q8_0 (8-bit, norms stay f32)."""

    max_shard_gb: Annotated[Float | None, BeforeValidator(_none)] = Field(None, gt=0, le=1e6)
    """Largest safetensors file of the Hugging Face export, in GB (10^9 bytes), with an index;
    none = the files of the source model."""

    lora_adapter: bool = False
    """With model.lora.rank > 0: also write the adapters as a PEFT folder (adapter/:
    adapter_config.json + adapter_model.safetensors) beside the merged Hugging Face folder."""


class _KeyRule(ValueError):
    """A rule between settings is broken; ``key`` is the one to change."""

    def __init__(self, key: str, value: Any, rule: str) -> None:
        super().__init__(f"{value!r} is invalid; {rule}")
        self.key = key


@dataclass(config=_FIELDS)
class JobConfig:
    model: ModelConfig
    data: DataConfig
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)

    @model_validator(mode="after")
    def _rules_between_keys(self) -> JobConfig:
        """Warmup within a run counted in steps, one of batch_tokens and grad_accum, dp."""
        t, o, p = self.train, self.optim, self.parallel
        steps, tokens = t.duration.value, t.batch_tokens
        if t.duration.unit == "st" and o.warmup_steps > steps:
            rule = f"must be <= the {steps} optimizer steps of train.duration={t.duration}"
            raise _KeyRule("optim.warmup_steps", o.warmup_steps, rule)
        if tokens is not None and t.grad_accum != 1:
            rule = f"train.batch_tokens={tokens} derives grad_accum; set only one of the two"
            raise _KeyRule("train.grad_accum", t.grad_accum, rule)
        if p.dp < 1 and p.dp != -1:
            raise _KeyRule("parallel.dp", p.dp, "must be >= 1, or -1 for world_size/sp")
        d = self.data
        if d.format == "text" and d.task_type != "text":
            rule = f"reads .txt documents, which only data.task_type=text trains on ({d.task_type})"
            raise _KeyRule("data.format", d.format, rule)
        if self.export.lora_adapter and self.model.lora.rank == 0:
            rule = "writes LoRA adapters, and model.lora.rank is 0 (full fine-tuning)"
            raise _KeyRule("export.lora_adapter", True, rule)
        if d.mix and len(d.mix) != len(d.train):
            rule = f"give one weight per data.train entry ({len(d.train)}), or none"
            raise _KeyRule("data.mix", ",".join(f"{w:g}" for w in d.mix), rule)
        return self


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

_ADAPTER = TypeAdapter(JobConfig)
_SECTIONS: dict[str, Any] = {
    name: f.annotation for name, f in JobConfig.__pydantic_fields__.items()
}


def _containers(prefix: str, cls: Any) -> dict[str, Any]:
    """``prefix`` and its groups (a field whose type is a pydantic dataclass, such as
    ``model.lora``), at any depth -> their classes."""
    found = {prefix: cls}
    for name, info in cls.__pydantic_fields__.items():
        if is_pydantic_dataclass(info.annotation):
            found.update(_containers(f"{prefix}.{name}", info.annotation))
    return found


_CONTAINERS: dict[str, Any] = {
    path: cls
    for section, body in _SECTIONS.items()
    for path, cls in _containers(section, body).items()
}
"""Every section and group of settings -> its class: ``model``, ``model.lora``, ``data``, ..."""
SETTINGS: dict[str, FieldInfo] = {
    f"{path}.{name}": info
    for path, cls in _CONTAINERS.items()
    for name, info in cls.__pydantic_fields__.items()
    if f"{path}.{name}" not in _CONTAINERS
}
"""Every setting: ``section.key`` or ``section.group.key`` (``model.lora.rank``) -> its pydantic
field (type, default, bounds, doc). Groups are not settings: their keys are."""


def _base(tp: Any) -> Any:
    """The type under ``X | None`` and ``Annotated[X, ...]``."""
    while typing.get_origin(tp) is Annotated or type(None) in typing.get_args(tp):
        tp = typing.get_args(tp)[0]
    return tp


def choices(key: str) -> tuple[str, ...]:
    """The values a choice setting takes (its ``Literal``), e.g. ``choices("data.task_type")``.

    Args:
        key: the setting, ``section.key`` or ``section.group.key``.

    Returns:
        The choices in order (of each item, for a list of choices); empty for a setting that
        is not a choice.
    """
    tp = _base(SETTINGS[key].annotation)
    if typing.get_origin(tp) is list:
        tp = typing.get_args(tp)[0]
    return typing.get_args(tp) if typing.get_origin(tp) is Literal else ()


assert choices("model.attention") == ATTENTION_BACKENDS, "model.attention: list every backend"


def _check_key(key: str, source: str) -> None:
    """Refuse a key that is not a setting: ``section.name`` or ``section.group.name``."""
    section, dot, _ = key.partition(".")
    if not dot:
        raise ConfigError(
            f"{source}: {key!r} is not a config key; use section.key "
            f"(sections: {', '.join(_SECTIONS)}) or one of the flags {', '.join(FLAG_ALIASES)}"
        )
    if section not in _SECTIONS:
        raise ConfigError(
            f"{source}: unknown section {section!r} in {key!r} (known sections: {', '.join(_SECTIONS)})"
        )
    if key in SETTINGS:
        return
    if key in _CONTAINERS:  # model.lora
        keys = ", ".join(k for k in SETTINGS if k.startswith(f"{key}."))
        raise ConfigError(f"{source}: {key!r} is a group of settings; set its keys ({keys})")
    parent = max((c for c in _CONTAINERS if key.startswith(f"{c}.")), key=len)
    known = ", ".join(_CONTAINERS[parent].__pydantic_fields__)
    raise ConfigError(f"{source}: unknown key {key!r} (known keys in {parent}: {known})")


_METAVARS = {str: "PATH", list: "PATH[,PATH...]", tuple: "B1,B2", dict: "NAME=COLUMN[,...]"}


class _FlagParser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:
        # One line, and no exit: the web form reads flags too.
        raise ConfigError(message.replace("expected one argument", "needs a value (--flag=VALUE)"))


class _AsTyped(argparse.Action):
    """Keeps the flag as typed with the value, for the error message."""

    def __call__(self, parser: Any, namespace: Any, values: Any, option: Any = None) -> None:
        setattr(namespace, self.dest, (values, option))


def flag_parser(description: str | None = None) -> argparse.ArgumentParser:
    """The command line of ``longtune train``: a ``--section.key`` (``--section.group.key``)
    flag for every setting, with its type or choices, default and doc, grouped by section and
    group, and the aliases.

    Args:
        description: text under the usage line of ``--help``.

    Returns:
        The parser. It leaves values as typed (:func:`flag_values` reads them) and has no -h.
    """
    parser = _FlagParser(
        prog="longtune train",
        usage="%(prog)s [CONFIG.yaml] [--section.key=value ...] [--flag value ...]",
        description=description,
        allow_abbrev=False,  # --optim.l is not --optim.lr
        add_help=False,
    )
    groups = {path: parser.add_argument_group(f"{path} settings") for path in _CONTAINERS}
    for path, group in groups.items():
        if path not in _SECTIONS:  # a group: its field's doc says what it is
            parent, _, name = path.rpartition(".")
            group.description = _CONTAINERS[parent].__pydantic_fields__[name].description
        for key in (k for k in SETTINGS if k.rpartition(".")[0] == path):
            info, name = SETTINGS[key], key.rpartition(".")[2]
            aliases = [f"--{flag}" for flag, k in FLAG_ALIASES.items() if k == key]
            bare = {"nargs": "?", "const": "true"} if info.annotation is bool else {}
            kw = dict(dest=key, action=_AsTyped, default=argparse.SUPPRESS, **bare)
            default = "required" if info.is_required() else f"default: {_as_flag(info)}"
            doc = f"{' '.join(str(info.description).split())} ({default})".replace("%", "%%")
            tp = _base(info.annotation)
            metavar = _METAVARS.get(typing.get_origin(tp) or tp) or tp.__name__.upper()
            if typing.get_origin(tp) is list and _base(typing.get_args(tp)[0]) is float:
                metavar = "W1,W2,..."
            if typing.get_origin(tp) in (typing.Union, types.UnionType):  # a number or a word
                words = [a for t in typing.get_args(tp) for a in typing.get_args(t)]
                metavar = "|".join(["N", *words])
            if choices(key):
                many = "[,...]" if typing.get_origin(tp) is list else ""
                metavar = "{" + ",".join(choices(key)) + "}" + many
            group.add_argument(f"--{key}", *aliases, metavar=metavar, help=doc, **kw)
            if "_" in key:  # --train.batch-tokens works too, without a second line in --help
                group.add_argument(f"--{key.replace('_', '-')}", help=argparse.SUPPRESS, **kw)
    return parser


def _as_flag(info: FieldInfo) -> str:
    """A field's default as it is written on the command line."""
    value = info.get_default(call_default_factory=True)
    if isinstance(value, list | tuple):
        return ",".join(map(str, value)) or "empty"
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items()) or "empty"
    return str(value).lower() if value is None or isinstance(value, bool) else str(value)


def flag_values(tokens: list[str]) -> dict[str, tuple[str, str]]:
    """Read settings from command-line tokens, as typed (the checks are :func:`load_config`'s).

    Accepted: ``--optim.lr=3e-5``, ``--optim.lr 3e-5``, ``optim.lr=3e-5``, the keys of a group
    (``--model.lora.rank=16``), the aliases of :data:`FLAG_ALIASES` (``--lr=3e-5``,
    ``--task-type chat``), dashes for underscores (``--train.batch-tokens``), a bare boolean
    flag for true (``--output.tensorboard``) and ``--data.columns.NAME=COLUMN`` for one column
    of ``data.columns``.

    Args:
        tokens: the tokens, in command-line order (later ones win).

    Returns:
        ``{section.key or section.group.key: (value as typed, flag as typed)}``.

    Raises:
        ConfigError: for an unknown key or flag, a flag without a value, a stray argument.
    """
    parser = flag_parser()
    tokens = _columns_flags(tokens)
    found, rest = parser.parse_known_args(tokens)
    undashed = {t for t in rest if "=" in t and not t.startswith("-")}  # optim.lr=3e-5
    if undashed:
        found, rest = parser.parse_known_args([f"--{t}" if t in undashed else t for t in tokens])
    if rest and rest[0].startswith("--"):
        name = rest[0][2:].partition("=")[0]
        _check_key(FLAG_ALIASES.get(name, name), f"--{name}")
    if rest:
        raise ConfigError(
            f"unexpected argument {rest[0]!r}; overrides look like --section.key=value"
        )
    return vars(found)


def _read_yaml(path: str) -> dict[str, tuple[Any, str]]:
    """``{section.key: (value, "config file PATH")}`` from a YAML file (a group's settings are
    a mapping inside their section's: ``model: {lora: {rank: 16}}`` is ``model.lora.rank``)."""
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
    if not isinstance(data, dict | None):
        raise ConfigError(f"config file {path}: top level must be a mapping of sections")
    source, values = f"config file {path}", {}
    for section, body in (data or {}).items():  # unknown sections and keys: _check_key
        if not isinstance(body, dict | None):
            raise ConfigError(
                f"{source}: section {section!r} must be a mapping of keys, got {body!r}"
            )
        _yaml_settings(str(section), body, source, values)
    return values


def _yaml_settings(
    path: str, body: dict | None, source: str, values: dict[str, tuple[Any, str]]
) -> None:
    """Add the settings of one section or group of a YAML file to ``values``, its groups' too."""
    for name, value in (body or {}).items():
        key = f"{path}.{name}"
        if key in _CONTAINERS:
            if not isinstance(value, dict | None):
                keys = ", ".join(_CONTAINERS[key].__pydantic_fields__)
                raise ConfigError(
                    f"{source}: group {key!r} must be a mapping of keys ({keys}), got {value!r}"
                )
            _yaml_settings(key, value, source, values)
        else:
            _check_key(key, source)
            values[key] = (value, source)


def load_config(path: str | None, overrides: list[str]) -> JobConfig:
    """Build and validate the run configuration from defaults, a YAML file and CLI overrides.

    Args:
        path: YAML file with one mapping per section (``model:``, ``optim:``, ...), a group a
            mapping inside its section (``model: {lora: {rank: 16}}``), or None.
        overrides: command-line tokens such as ``["--optim.lr=3e-5", "--task-type", "chat"]``;
            they take precedence over the file.

    Returns:
        The validated JobConfig.

    Raises:
        ConfigError: naming the key, for unknown keys, missing required keys, unparsable
            values and values out of range (choices are listed).
    """
    return _build({**(_read_yaml(path) if path else {}), **flag_values(overrides)})


def config_from_values(values: dict[str, Any], path: str | None = None) -> JobConfig:
    """Build and validate the run configuration from typed values (the Python API's way).

    Same precedence and checks as :func:`load_config` (values > file > defaults), without a
    round trip through command-line strings: ``{"data.train": ["a.jsonl"], "optim.lr": 3e-5,
    "train.duration": "2ep"}``. A plain string given for a list setting is one item (a path
    with a comma in it stays one path).

    Args:
        values: ``"section.key"`` or ``"section.group.key"`` (``"model.lora.rank"``) -> value
            (Python types: str, int, float, bool, list, tuple, :class:`Duration` or its string
            form).
        path: optional YAML file under the values.

    Returns:
        The validated JobConfig.

    Raises:
        ConfigError: naming the key, exactly as :func:`load_config`.
    """
    merged = _read_yaml(path) if path else {}
    for key, value in values.items():
        _check_key(key, f"argument {key}")
        value = os.fspath(value) if isinstance(value, os.PathLike) else value
        is_list = typing.get_origin(_base(SETTINGS[key].annotation)) is list
        merged[key] = ([value] if is_list and isinstance(value, str) else value, f"argument {key}")
    return _build(merged)


def _build(values: dict[str, tuple[Any, str]]) -> JobConfig:
    """Validate ``{section.key or section.group.key: (value, where it came from)}`` over the
    defaults."""
    sections: dict[str, dict[str, Any]] = {section: {} for section in _SECTIONS}
    for key, (value, _) in values.items():
        *path, name = key.split(".")
        body = sections
        for part in path:
            body = body.setdefault(part, {})
        body[name] = value
    try:
        return _ADAPTER.validate_python(sections)
    except ValidationError as e:
        raise ConfigError(_error_line(e.errors()[0], values)) from None


def _error_line(error: ErrorDetails, values: dict[str, tuple[Any, str]]) -> str:
    """One line for a pydantic error: ``key (from source): value is invalid; what is valid``."""
    exc = error.get("ctx", {}).get("error")
    loc = [str(part) for part in error["loc"]]
    # The setting is the longest start of the location that is one: model.lora.targets of
    # (model, lora, targets, 0); what follows is an item of a list or a key of a mapping.
    depth = next((n for n in range(len(loc), 0, -1) if ".".join(loc[:n]) in SETTINGS), 2)
    key = getattr(exc, "key", None) or ".".join(loc[:depth])
    value, source = values.get(key, (error["input"], None))
    where = f"{key} (from {source})" if source else key
    if error["type"] == "missing":
        alias = "".join(f" or --{flag}" for flag, k in FLAG_ALIASES.items() if k == key)
        return f"missing required key {key!r}: set it in the config file or with --{key}=...{alias}"
    if error["type"] == "literal_error":
        if len(loc) > depth:  # an item of a list, a key of a mapping
            value = error["input"]
        valid = choices(key) or typing.get_args(ColumnName)  # data.columns: its keys
        return f"{where}: {value!r} is not one of {', '.join(valid)}"
    if isinstance(exc, ValueError):  # raised by a validator above; it names the value
        return f"{where}: {exc}"
    rule = re.sub(r"^\w+ should", "must", error["msg"])  # Input should be greater than 0
    return f"{where}: {value!r} is invalid; {rule.replace(' after validation', '')}"


def lora_spec(cfg: JobConfig) -> LoraSpec | None:
    """The adapters of a LoRA run (``model.lora.rank`` > 0), or None for full fine-tuning."""
    from longtune.model.lora import LoraSpec  # (torch: not imported with the config)

    lora = cfg.model.lora
    if lora.rank == 0:
        return None
    return LoraSpec(
        rank=lora.rank,
        alpha=lora.effective_alpha(),
        dropout=lora.dropout,
        targets=tuple(lora.targets),
        rslora=lora.rslora,
        train_embeddings=lora.train_embeddings,
    )


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
    """Plain nested dict of the config (YAML/JSON-safe: durations as strings, tuples as lists,
    paths absolute).

    Args:
        cfg: the configuration.

    Returns:
        ``{section: {key: value}}`` for every field, defaults included; a group is a mapping
        inside its section (``{"model": {"lora": {"rank": 16, ...}, ...}, ...}``).
    """
    return _ADAPTER.dump_python(cfg, mode="json")


def flat_settings(cfg: JobConfig) -> dict[str, Any]:
    """Every setting of the config by its full key, values as :func:`config_to_dict` writes
    them (YAML/JSON-safe).

    Args:
        cfg: the configuration.

    Returns:
        ``{"section.key" or "section.group.key": value}`` for every setting of :data:`SETTINGS`
        (``"optim.lr"``, ``"model.lora.rank"``; ``data.columns`` is one value, a mapping).
    """

    def leaves(path: str, body: dict[str, Any]) -> dict[str, Any]:
        out = {}
        for name, value in body.items():
            key = f"{path}.{name}"
            out.update(leaves(key, value) if key in _CONTAINERS else {key: value})
        return out

    flat = {}
    for section, body in config_to_dict(cfg).items():
        flat.update(leaves(section, body))
    return flat


def save_config(cfg: JobConfig, path: str | Path) -> None:
    """Write the fully resolved configuration as YAML; ``load_config(path, [])`` gives it back.

    Args:
        cfg: the configuration.
        path: the YAML file to write (parent directories are created).
    """
    file = Path(path)
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
