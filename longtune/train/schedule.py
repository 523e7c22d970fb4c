"""Learning-rate schedule: linear warmup, then cosine or linear decay to a floor, or constant.

The factor for optimizer step ``s`` (0-based; LambdaLR's ``last_epoch`` after ``s`` calls to
``scheduler.step()``) is:

- warmup (``s < warmup_steps``): ``(s + 1) / warmup_steps``, so the first step already trains
  and step ``warmup_steps - 1`` uses the full lr;
- then, with ``p = (s - warmup_steps) / (total_steps - warmup_steps)`` clamped to [0, 1]:
  cosine ``m + (1 - m) * (1 + cos(pi * p)) / 2``, linear ``m + (1 - m) * (1 - p)``,
  constant ``1``, where ``m = min_lr_ratio``. The floor is reached at ``s = total_steps``
  (after the last step), so no step runs with a learning rate of exactly 0.
"""

from __future__ import annotations

import math

import torch

SCHEDULES = ("cosine", "linear", "constant")


def lr_factor(
    step: int, *, schedule: str, warmup_steps: int, total_steps: int, min_lr_ratio: float
) -> float:
    """The multiplier of the peak learning rate at optimizer step ``step`` (0-based).

    Args:
        step: the optimizer step, >= 0.
        schedule: cosine | linear | constant.
        warmup_steps: steps of linear warmup.
        total_steps: total optimizer steps of the run.
        min_lr_ratio: the final multiplier of the decaying schedules.

    Returns:
        The factor in [0, 1].
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    decay_steps = total_steps - warmup_steps
    progress = 1.0 if decay_steps <= 0 else min(1.0, (step - warmup_steps) / decay_steps)
    if schedule == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        shape = 1.0 - progress
    return min_lr_ratio + (1.0 - min_lr_ratio) * shape


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer,
    schedule: str,
    warmup_steps: int,
    total_steps: int,
    min_lr_ratio: float,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR scheduler implementing :func:`lr_factor`; call ``.step()`` after each
    ``optimizer.step()``.

    The schedule's parameters are not part of the scheduler's state_dict, so a resumed run uses
    the values it was built with (only ``last_epoch`` and ``base_lrs`` are restored).

    Args:
        optimizer: the optimizer; its current lr of each group is the peak lr.
        schedule: cosine | linear | constant.
        warmup_steps: steps of linear warmup, 0 <= warmup_steps <= total_steps.
        total_steps: total optimizer steps of the run, >= 1.
        min_lr_ratio: final lr as a fraction of the peak, in [0, 1].

    Returns:
        The scheduler.

    Raises:
        ValueError: for an unknown schedule or out-of-range arguments.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule {schedule!r} is not one of {', '.join(SCHEDULES)}")
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(
            f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}"
        )
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")

    def factor(step: int) -> float:
        return lr_factor(
            step,
            schedule=schedule,
            warmup_steps=warmup_steps,
            total_steps=total_steps,
            min_lr_ratio=min_lr_ratio,
        )

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
