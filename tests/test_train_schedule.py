"""Numerical tests of the learning-rate schedule."""

from __future__ import annotations

import math
from itertools import pairwise

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from longtune.train.schedule import build_lr_scheduler, lr_factor

PEAK = 2e-4


def lrs(schedule: str, warmup: int, total: int, min_ratio: float) -> list[float]:
    """The lr used by each of the `total` optimizer steps."""
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=PEAK)
    sched = build_lr_scheduler(opt, schedule, warmup, total, min_ratio)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_warmup_then_cosine_exact_values():
    got = lrs("cosine", warmup_steps := 4, 14, 0.1)
    assert got[:4] == pytest.approx([PEAK * k / 4 for k in (1, 2, 3, 4)])
    for s in range(4, 14):
        p = (s - warmup_steps) / 10
        expected = PEAK * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))
        assert got[s] == pytest.approx(expected, rel=1e-12)
    assert got[4] == pytest.approx(PEAK)  # peak right after warmup


def test_linear_decay_values():
    got = lrs("linear", 0, 5, 0.0)
    assert got == pytest.approx([PEAK * f for f in (1.0, 0.8, 0.6, 0.4, 0.2)])


def test_constant_after_warmup():
    got = lrs("constant", 2, 6, 0.5)
    assert got == pytest.approx([PEAK / 2, PEAK, PEAK, PEAK, PEAK, PEAK])


def test_floor_is_reached_after_last_step_and_held():
    for schedule in ("cosine", "linear"):
        kw = dict(schedule=schedule, warmup_steps=3, total_steps=10, min_lr_ratio=0.2)
        assert lr_factor(10, **kw) == pytest.approx(0.2)
        assert lr_factor(50, **kw) == pytest.approx(0.2)
        assert lr_factor(9, **kw) > 0.2


def test_warmup_equal_to_total():
    assert lrs("cosine", 4, 4, 0.0) == pytest.approx([PEAK * k / 4 for k in (1, 2, 3, 4)])


def test_scheduler_state_round_trip():
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=PEAK)
    sched = build_lr_scheduler(opt, "cosine", 2, 20, 0.0)
    for _ in range(7):
        opt.step()
        sched.step()
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=PEAK)
    sched2 = build_lr_scheduler(opt2, "cosine", 2, 20, 0.0)
    sched2.load_state_dict(sched.state_dict())
    assert sched2.get_last_lr() == sched.get_last_lr()
    opt2.step()
    sched2.step()
    opt.step()
    sched.step()
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("cosin", 0, 10, 0.0), "is not one of cosine, linear, constant"),
        (("cosine", 11, 10, 0.0), "warmup_steps must be in"),
        (("cosine", 0, 0, 0.0), "total_steps must be >= 1"),
        (("linear", 0, 10, 1.5), "min_lr_ratio must be in"),
    ],
)
def test_bad_arguments(args, message):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match=message):
        build_lr_scheduler(opt, *args)


@settings(max_examples=200, deadline=None)
@given(
    schedule=st.sampled_from(["cosine", "linear", "constant"]),
    warmup=st.integers(0, 50),
    extra=st.integers(0, 200),
    min_ratio=st.floats(0.0, 1.0),
)
def test_factor_properties(schedule, warmup, extra, min_ratio):
    total = max(1, warmup + extra)
    kw = dict(schedule=schedule, warmup_steps=warmup, total_steps=total, min_lr_ratio=min_ratio)
    factors = [lr_factor(s, **kw) for s in range(total + 2)]
    assert all(0.0 < f <= 1.0 + 1e-12 for f in factors[:total])  # no step trains at lr 0
    assert all(
        a <= b + 1e-12 for a, b in pairwise(factors[: min(warmup + 1, total)])
    )  # warmup rises
    decay = factors[warmup:]
    assert all(b <= a + 1e-12 for a, b in pairwise(decay))  # then never rises
    if schedule != "constant" and total > warmup:
        assert factors[total] == pytest.approx(min_ratio)
