"""LoRA adapters on the native model's projections, meaning exactly what PEFT's mean.

The native model fuses q/k/v into ``wqkv`` and gate/up into ``w13``; an adapter on HF's
``q_proj`` must still be ``q_proj``'s own pair. So a fused projection becomes a
:class:`LoraLinear` holding the same frozen weight (same name: the checkpoint keys do not
change) and one ``(A, B)`` pair per HF projection it is made of: ``lora_A[q_proj]`` is
``(rank, in)``, ``lora_B[q_proj]`` is ``(q_size, rank)``, and the output rows of ``q_proj``
get ``scale * B A x`` added, as PEFT's ``Linear.forward`` does (``base(x) + B(A(dropout(x))) *
scale``). The A matrices of one fused projection run as one matmul (the same dot products).

Initialization and scale are PEFT's: A Kaiming-uniform (``a = sqrt(5)``), B zero, scale
``alpha / rank`` (``alpha / sqrt(rank)`` with rsLoRA). Dropout on the adapters' input is one
mask per fused projection (PEFT draws one per HF projection: the same in expectation; with
``dropout = 0``, PEFT's default, the two are the same function).

Everything else (norms, embeddings, output, the projections' own weights) is frozen;
``train_embeddings`` keeps the embeddings and the output layer trainable in full (PEFT's
``modules_to_save``). Like the model, nothing here knows about distribution.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from longtune.model.args import ModelArgs

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""The projections an adapter can go on, by their HF module names."""

#: The native projection of each block (its path inside a block) -> its HF projections, in
#: fusion order (the order of their rows in the fused weight).
FUSED: dict[str, tuple[str, ...]] = {
    "attention.wqkv": ("q_proj", "k_proj", "v_proj"),
    "attention.wo": ("o_proj",),
    "feed_forward.w13": ("gate_proj", "up_proj"),
    "feed_forward.w2": ("down_proj",),
}
#: HF projection -> its module path inside an HF decoder layer.
HF_MODULE = {
    "q_proj": "self_attn.q_proj",
    "k_proj": "self_attn.k_proj",
    "v_proj": "self_attn.v_proj",
    "o_proj": "self_attn.o_proj",
    "gate_proj": "mlp.gate_proj",
    "up_proj": "mlp.up_proj",
    "down_proj": "mlp.down_proj",
}
#: Native tensors trained in full with ``train_embeddings``.
EMBEDDINGS = ("tok_embeddings.weight", "output.weight")


@dataclass(frozen=True)
class LoraSpec:
    """What adapters a model gets (``model.lora`` of the config, rank > 0)."""

    rank: int
    alpha: float
    dropout: float = 0.0
    targets: tuple[str, ...] = LORA_TARGETS
    rslora: bool = False
    train_embeddings: bool = False

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        if self.alpha <= 0:
            raise ValueError(f"LoRA alpha must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        unknown = [t for t in self.targets if t not in LORA_TARGETS]
        if unknown or not self.targets:
            raise ValueError(
                f"LoRA targets {list(self.targets)} must be some of {', '.join(LORA_TARGETS)}"
            )

    @property
    def scale(self) -> float:
        """The factor of ``B A x``: ``alpha / rank``, or ``alpha / sqrt(rank)`` (rsLoRA)."""
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "targets": list(self.targets)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> LoraSpec:
        return cls(**{**d, "targets": tuple(d["targets"])})


def part_sizes(args: ModelArgs, native: str) -> list[int]:
    """Output rows of each HF projection of a native projection (``FUSED`` order)."""
    sizes = {
        "q_proj": args.q_size,
        "k_proj": args.kv_size,
        "v_proj": args.kv_size,
        "o_proj": args.dim,
        "gate_proj": args.ffn_dim,
        "up_proj": args.ffn_dim,
        "down_proj": args.dim,
    }
    return [sizes[p] for p in FUSED[native]]


class LoraLinear(nn.Module):
    """A frozen linear layer plus one LoRA pair per HF projection it fuses.

    ``weight`` and ``bias`` are the wrapped layer's own parameters (same names, so a
    checkpoint of the base model loads unchanged); ``lora_A[name]`` ``(rank, in)`` and
    ``lora_B[name]`` ``(rows of name, rank)`` for each targeted ``name`` of ``parts``.

    Args:
        base: the ``nn.Linear`` to adapt (its parameters are taken over, not copied).
        parts: ``(HF projection, output rows)`` in the order of the weight's rows.
        targets: the projections of ``parts`` that get adapters.
        rank, scale, dropout: see :class:`LoraSpec`.
    """

    def __init__(
        self,
        base: nn.Linear,
        parts: list[tuple[str, int]],
        targets: list[str],
        rank: int,
        scale: float,
        dropout: float,
    ) -> None:
        super().__init__()
        self.weight = base.weight
        self.bias = base.bias
        self.parts = parts
        self.scale = scale
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        kw = {"device": base.weight.device, "dtype": torch.float32}
        in_features = base.weight.shape[1]
        self.lora_A = nn.ParameterDict(
            {t: nn.Parameter(torch.empty(rank, in_features, **kw)) for t in targets}
        )
        self.lora_B = nn.ParameterDict(
            {
                name: nn.Parameter(torch.empty(rows, rank, **kw))
                for name, rows in parts
                if name in targets
            }
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)  # (..., out)
        names = list(self.lora_A.keys())
        h = self.drop(x)
        a_all = (
            torch.cat([self.lora_A[n] for n in names]) if len(names) > 1 else self.lora_A[names[0]]
        )
        a = F.linear(h, a_all).split(a_all.shape[0] // len(names), dim=-1)  # (..., rank) each
        low = dict(zip(names, a, strict=True))
        deltas = []
        for name, rows in self.parts:
            if name in low:
                deltas.append(F.linear(low[name], self.lora_B[name]) * self.scale)
            else:  # a projection of this fused layer without an adapter
                deltas.append(out.new_zeros(*out.shape[:-1], rows))
        return out + (deltas[0] if len(deltas) == 1 else torch.cat(deltas, dim=-1))


def add_lora(model: nn.Module, spec: LoraSpec) -> None:
    """Put adapters on ``model``'s targeted projections and freeze everything else.

    Call on the plain native model (on any device, the meta device included) before
    :func:`longtune.parallel.parallelize`; the adapters are created in float32 and left
    uninitialized (:func:`init_adapters` fills them once the model is materialized).
    """
    args: ModelArgs = model.args
    for p in model.parameters():
        p.requires_grad_(False)
    for block in model.layers.values():
        for native, hf_parts in FUSED.items():
            targets = [t for t in hf_parts if t in spec.targets]
            if not targets:
                continue
            owner_name, _, attr = native.rpartition(".")
            owner = block.get_submodule(owner_name)
            parts = list(zip(hf_parts, part_sizes(args, native), strict=True))
            lora = LoraLinear(
                getattr(owner, attr), parts, targets, spec.rank, spec.scale, spec.dropout
            )
            setattr(owner, attr, lora)
    if spec.train_embeddings:
        model.tok_embeddings.weight.requires_grad_(True)
        model.output.weight.requires_grad_(True)  # the same tensor when tied


def freeze_base_dtype(model: nn.Module, dtype: torch.dtype) -> None:
    """Store the frozen parameters in ``dtype`` (the compute dtype): no float32 master copy
    of weights that are never updated. Works on the meta device; ties are kept (the
    parameter objects stay, their data is replaced)."""
    for p in model.parameters():
        if not p.requires_grad and p.dtype != dtype:
            p.data = p.data.to(dtype)


def is_adapter(name: str) -> bool:
    """Whether a parameter name (any wrapper prefixes) is a LoRA adapter matrix."""
    return ".lora_A." in name or ".lora_B." in name


def init_adapters(named: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """PEFT's initial adapter values, the same on every rank and layout.

    Args:
        named: adapter name -> tensor (only shapes are read), e.g. from a model's state dict.
        seed: the run's seed; the values depend on it and the names only.

    Returns:
        name -> float32 CPU tensor: ``lora_A`` Kaiming-uniform (``a = sqrt(5)``, as
        ``nn.Linear`` and PEFT), ``lora_B`` zero.
    """
    out = {}
    for name in sorted(named):
        full = torch.zeros(tuple(named[name].shape), dtype=torch.float32)
        if ".lora_A." in name:
            digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
            g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
            nn.init.kaiming_uniform_(full, a=math.sqrt(5), generator=g)
        out[name] = full
    return out


def merged_weight(
    base: torch.Tensor,
    args: ModelArgs,
    native: str,
    adapters: dict[str, tuple[torch.Tensor, torch.Tensor]],
    spec: LoraSpec,
) -> torch.Tensor:
    """``W + scale * B A`` for one native projection, in ``base``'s dtype.

    Args:
        base: the frozen weight ``(out, in)`` as in the source checkpoint.
        args: the model's arguments (the row counts of fused parts).
        native: its projection path in a block, a key of :data:`FUSED`.
        adapters: HF projection -> ``(A, B)`` for the targeted parts of this projection.
        spec: the adapters' spec (scale).

    Returns:
        The merged weight (summed in float32, then cast to ``base.dtype``).
    """
    merged = base.float()  # a copy unless base is float32
    if merged is base:
        merged = merged.clone()
    start = 0
    for name, rows in zip(FUSED[native], part_sizes(args, native), strict=True):
        if name in adapters:
            a, b = (t.float() for t in adapters[name])
            merged[start : start + rows] += spec.scale * (b @ a)
        start += rows
    return merged.to(base.dtype)


def base_fingerprint(path: str | Path) -> str:
    """A content hash of a base model folder without reading its weights: its config (and
    native metadata) bytes, and the name and size of every weight file."""
    root = Path(path)
    h = hashlib.sha256()
    for name in ("config.json", "longtune.json"):
        if (root / name).is_file():
            h.update(name.encode() + b"\0" + (root / name).read_bytes() + b"\0")
    for f in sorted(root.glob("*.safetensors")):
        h.update(f"{f.name}:{f.stat().st_size}\0".encode())
    return h.hexdigest()[:16]


def adapter_config(spec: LoraSpec, base: str, tie_embeddings: bool) -> dict[str, Any]:
    """PEFT's ``adapter_config.json`` for these adapters on an HF ``LlamaForCausalLM``."""
    # Trained embeddings: both modules saved whole; with tied embeddings PEFT must tie its two
    # copies again (ensure_weight_tying), or lm_head would keep the base's matrix.
    modules_to_save = ["embed_tokens", "lm_head"] if spec.train_embeddings else None
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout,
        "use_rslora": spec.rslora,
        "target_modules": sorted(spec.targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "modules_to_save": modules_to_save,
        "ensure_weight_tying": bool(spec.train_embeddings and tie_embeddings),
        "inference_mode": True,
    }


def peft_key(native_adapter: str) -> str:
    """``layers.3.attention.wqkv.lora_A.k_proj`` -> PEFT's saved key
    ``base_model.model.model.layers.3.self_attn.k_proj.lora_A.weight``."""
    head, which, proj = native_adapter.rsplit(".", 2)
    layer = head.split(".")[1]
    return f"base_model.model.model.layers.{layer}.{HF_MODULE[proj]}.{which}.weight"


class LoraRecord:
    """What a LoRA checkpoint's adapters belong to: their spec and the base model (its folder
    and :func:`base_fingerprint`). Registered with the checkpointer as the ``lora`` state, so
    a resume and an export find the base and refuse another one.

    Args:
        spec: the adapters.
        base: the base model folder (``model.path``).
    """

    def __init__(self, spec: LoraSpec, base: str | Path) -> None:
        self.spec, self.base = spec, str(Path(base).resolve())
        self.fingerprint = base_fingerprint(base)

    def state_dict(self) -> dict[str, Any]:
        return {"spec": self.spec.to_json(), "base": self.base, "fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_record(state, self.spec, self.base, "model.path")


def check_record(
    state: dict[str, Any], spec: LoraSpec | None, base: str | Path, what: str
) -> LoraSpec:
    """Refuse adapters saved for another base model or with another spec (one line).

    Args:
        state: a checkpoint's ``lora`` state (:meth:`LoraRecord.state_dict`).
        spec: the spec they must have (None: any, e.g. for an export).
        base: the base model folder meant to go under them.
        what: how the user names ``base`` (``model.path``, ``--base``) for the message.

    Returns:
        The saved spec.

    Raises:
        ValueError: the base folder is missing or differs in config or weight file sizes, or
            the spec differs.
    """
    saved = LoraSpec.from_json(state["spec"])
    if spec is not None and saved != spec:
        raise ValueError(
            f"the checkpoint's adapters are {saved}, the run asks for {spec}; resume with the "
            "run's own model.lora settings"
        )
    if not Path(base, "config.json").is_file():
        if Path(base).resolve() == Path(state["base"]):
            raise ValueError(
                f"the base model these LoRA adapters were trained on, {base}, is not there any "
                f"more (no config.json); if it moved, give its new folder as {what}"
            )
        raise ValueError(
            f"{what}={base} is not a model folder (no config.json); these LoRA adapters were "
            f"trained on {state['base']}"
        )
    if base_fingerprint(base) != state["fingerprint"]:
        raise ValueError(
            f"{what}={base} is not the base model these LoRA adapters were trained on "
            f"({state['base']}, fingerprint {state['fingerprint']}): its config.json or weight "
            "file sizes differ"
        )
    return saved
