"""Ulysses pieces on gloo ranks against the single-process reference, in float64.

Every rank builds the same full inputs (same seed), keeps its sequence slice, runs the
sequence-parallel piece, and compares its part of the output and of the input gradients with
the plain computation on the full tensors. Packed documents cross the slice boundaries.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from dist_utils import run_ranks
from torch.utils._python_dispatch import TorchDispatchMode

from longtune.model.args import PRESETS
from longtune.model.attention import AttentionMeta, attention
from longtune.model.llama import CoreAttention, Transformer, positions_from_cu_seqlens
from longtune.parallel.parallelize import apply_activation_checkpointing
from longtune.parallel.ulysses import (
    UlyssesAttention,
    apply_sequence_parallel,
    heads_to_seq,
    seq_to_heads,
)

pytestmark = pytest.mark.slow


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _exchange_checks(rank: int, world: int) -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    bs, seq, heads, d = 2, 4 * world, 2 * world, 3
    full = torch.randn(bs, seq, heads, d, generator=g, dtype=torch.float64)
    cot = torch.randn(bs, seq, heads // world, d, world, generator=g, dtype=torch.float64)
    lo, hi = rank * seq // world, (rank + 1) * seq // world
    hl, hh = rank * heads // world, (rank + 1) * heads // world

    x = full[:, lo:hi].clone().requires_grad_()
    y = seq_to_heads(x, dist.group.WORLD)  # (bs, seq, heads/world, d)
    err_fwd = _rel(y, full[:, :, hl:hh])
    # d/dx of sum(y * c_rank): every rank's cotangent lands on the slice it came from.
    (y * cot[..., rank]).sum().backward()
    expect = torch.cat([cot[:, lo:hi, :, :, r] for r in range(world)], dim=2)
    err_grad = _rel(x.grad, expect)

    back = heads_to_seq(y.detach(), dist.group.WORLD)
    err_inverse = _rel(back, full[:, lo:hi])
    return {"fwd": err_fwd, "grad": err_grad, "inverse": err_inverse}


def _attention_checks(rank: int, world: int, n_heads: int, n_kv: int) -> dict[str, float]:
    g = torch.Generator().manual_seed(1)
    bs, seq, d = 2, 6 * world, 4
    q = torch.randn(bs, seq, n_heads, d, generator=g, dtype=torch.float64)
    k = torch.randn(bs, seq, n_kv, d, generator=g, dtype=torch.float64)
    v = torch.randn(bs, seq, n_kv, d, generator=g, dtype=torch.float64)
    cot = torch.randn(bs, seq, n_heads, d, generator=g, dtype=torch.float64)
    # Documents of uneven lengths that cross every slice boundary (and the sequence boundary
    # between the two sequences of the micro-batch is a document boundary too).
    cuts = sorted({0, 5, seq - 1, seq, seq + 2, seq + 3 * world + 1, 2 * seq})
    cu = torch.tensor(cuts, dtype=torch.int32)
    meta = AttentionMeta.from_cu_seqlens(cu)  # the whole micro-batch, on every rank

    full = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = attention(*full, meta)
    (ref * cot).sum().backward()

    lo, hi = rank * seq // world, (rank + 1) * seq // world
    local = [t[:, lo:hi].clone().requires_grad_() for t in (q, k, v)]
    sp_attn = UlyssesAttention(CoreAttention(), dist.group.WORLD)
    out = sp_attn(*local, meta)
    (out * cot[:, lo:hi]).sum().backward()
    errs = {"out": _rel(out, ref[:, lo:hi])}
    for name, loc, glob in zip("qkv", local, full, strict=True):
        errs[f"d{name}"] = _rel(loc.grad, glob.grad[:, lo:hi])
    return errs


# (query heads, KV heads) per SP degree.
HEAD_CASES = {
    2: [(4, 4), (4, 2)],  # multi-head; KV heads scattered
    3: [(9, 3)],  # the SmolLM2 shape at SP=3
    4: [(4, 2), (8, 1)],  # KV heads repeated: 2 KV heads on 4 ranks; one KV head on every rank
}


def _all_checks(rank: int, world: int) -> dict[str, dict[str, float]]:
    out = {"exchange": _exchange_checks(rank, world)}
    for n_heads, n_kv in HEAD_CASES[world]:
        out[f"attention {n_heads}/{n_kv}"] = _attention_checks(rank, world, n_heads, n_kv)
    return out


@pytest.mark.parametrize("world", sorted(HEAD_CASES))
def test_all_to_all_and_ulysses_attention_equal_the_full_computation(world):
    for rank_errs in run_ranks(world, _all_checks):
        exchange = rank_errs.pop("exchange")
        # The exchange only moves numbers: exact values, gradients to rounding.
        assert exchange["fwd"] == 0.0 and exchange["inverse"] == 0.0, exchange
        assert exchange["grad"] < 1e-15, exchange
        for case, errs in rank_errs.items():
            assert max(errs.values()) < 1e-12, (case, errs)


class _CountExchanges(TorchDispatchMode):
    """Counts the all-to-all ops that reach the process group."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        if func is torch.ops._c10d_functional.all_to_all_single.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _backward_exchanges(rank: int, world: int, ac_mode: str, keep: bool = False) -> int:
    args = PRESETS["debug"]
    torch.manual_seed(0)
    model = Transformer(args)
    apply_sequence_parallel(model, dist.group.WORLD)
    apply_activation_checkpointing(model, ac_mode, keep_exchanges=keep)
    seq = 8 * world
    ids = torch.randint(0, args.vocab_size, (1, seq))
    cu = torch.tensor([0, 5, seq], dtype=torch.int32)
    pos = positions_from_cu_seqlens(cu, seq)[None]
    lo, hi = rank * seq // world, (rank + 1) * seq // world
    loss = model(ids[:, lo:hi], position_ids=pos[:, lo:hi], cu_seqlens=cu, labels=ids[:, lo:hi])
    with _CountExchanges() as mode:
        loss.backward()
    return mode.count


def test_selective_checkpointing_replays_the_exchanges_unless_asked_to_keep_them():
    """Backward of a 2-layer model: 4 gradient exchanges per layer (q, k, v, out). Selective
    checkpointing exchanges the forward's 4 again (memory per rank falls as 1/N), as full
    checkpointing does; with keep_exchanges it replays them from their kept outputs."""
    n_layers = PRESETS["debug"].n_layers
    assert run_ranks(2, _backward_exchanges, "selective") == [8 * n_layers] * 2
    assert run_ranks(2, _backward_exchanges, "selective", True) == [4 * n_layers] * 2
    assert run_ranks(2, _backward_exchanges, "full") == [8 * n_layers] * 2


def _position_check(rank: int, world: int) -> str:
    model = Transformer(PRESETS["debug"])
    apply_sequence_parallel(model, dist.group.WORLD)
    try:
        model(torch.zeros(1, 4, dtype=torch.long), cu_seqlens=torch.tensor([0, 8]))
    except ValueError as e:
        return str(e)
    return ""


def test_sequence_parallel_model_requires_positions():
    for msg in run_ranks(2, _position_check):
        assert "under sequence parallelism the model needs position_ids" in msg
