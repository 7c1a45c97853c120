"""Learning-rate schedules as pure functions of the step: warmup + cosine, WSD, constant.

Each returns the multiplier of the base learning rate for optimizer step `step` (0-based) out of
`total_steps`. Warmup (`train.warmup_tokens` in tokens, else `warmup_fraction` of the steps) is linear from 1/warmup to 1 over the first `warmup_steps` steps, so the very first
step never has LR 0. The step may be fractional (the batch-size controller measures progress in base-batch
steps) and may exceed `total_steps` (it is clamped).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from scalelab.spec import TrainSpec


def warmup_steps_for(total_steps: int, warmup_fraction: float) -> int:
    """round(warmup_fraction · total_steps), at least 1 when the fraction is positive."""
    if warmup_fraction <= 0:
        return 0
    return max(1, round(warmup_fraction * total_steps))


def warmup_steps(train: TrainSpec, total_steps: int, step_tokens: int | None = None) -> int:
    """The run's warmup in steps: `train.warmup_tokens` rounded to whole steps when set (needs the tokens
    per step), else `warmup_fraction` of the run's steps."""
    if train.warmup_tokens is not None:
        if not step_tokens:
            raise ValueError("train.warmup_tokens needs the tokens per step to convert it into steps")
        return min(total_steps, round(train.warmup_tokens / step_tokens))
    return warmup_steps_for(total_steps, train.warmup_fraction)


def wsd_decay_start(total_steps: int, warmup: int, decay_fraction: float) -> int:
    """First step of a WSD run's decay: the last round(decay_fraction · total_steps) steps decay (≥ 1)."""
    decay_steps = max(1, round(decay_fraction * total_steps))
    return max(warmup, total_steps - decay_steps)


def _warmup(step: float, warmup: int) -> float | None:
    if warmup and step < warmup:
        return (step + 1) / warmup
    return None


def constant(step: float, total_steps: int, warmup: int = 0) -> float:
    """1 after the warmup."""
    w = _warmup(step, warmup)
    return 1.0 if w is None else w


def cosine(step: float, total_steps: int, warmup: int = 0, min_ratio: float = 0.1) -> float:
    """Warmup, then half a cosine from 1 down to `min_ratio` at the last step."""
    w = _warmup(step, warmup)
    if w is not None:
        return w
    span = max(1, total_steps - 1 - warmup)
    progress = min(1.0, max(0.0, (step - warmup) / span))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def wsd(
    step: float, total_steps: int, warmup: int = 0, decay_fraction: float = 0.2, min_ratio: float = 0.0
) -> float:
    """Warmup–stable–decay: 1 until the final `decay_fraction` of steps, then linear down to `min_ratio`."""
    w = _warmup(step, warmup)
    if w is not None:
        return w
    decay_start = wsd_decay_start(total_steps, warmup, decay_fraction)
    if step < decay_start:
        return 1.0
    span = max(1, total_steps - 1 - decay_start)
    progress = min(1.0, (step - decay_start) / span)
    return 1.0 - (1.0 - min_ratio) * progress


def make_schedule(
    train: TrainSpec, total_steps: int, step_tokens: int | None = None
) -> Callable[[float], float]:
    """The multiplier function for this spec (`train.schedule`, warmup, min_lr_ratio, ...); `step_tokens`
    (tokens per optimizer step) is needed when the warmup is given in tokens."""
    warmup = warmup_steps(train, total_steps, step_tokens)
    if train.schedule == "cosine":
        return lambda s: cosine(s, total_steps, warmup, train.min_lr_ratio)
    if train.schedule == "wsd":
        return lambda s: wsd(s, total_steps, warmup, train.decay_fraction, train.min_lr_ratio)
    if train.schedule == "constant":
        return lambda s: constant(s, total_steps, warmup)
    raise ValueError(f"train.schedule: unknown schedule {train.schedule!r}")
