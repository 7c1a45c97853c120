"""LR schedules: warmup + cosine, WSD, constant — pure functions of the step."""

from __future__ import annotations

import pytest

from scalelab.spec import TrainSpec
from scalelab.train.schedule import constant, cosine, make_schedule, warmup_steps_for, wsd


def test_warmup_is_linear_and_never_zero():
    assert [cosine(s, 100, warmup=4) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert warmup_steps_for(100, 0.05) == 5
    assert warmup_steps_for(10, 0.01) == 1
    assert warmup_steps_for(10, 0.0) == 0


def test_cosine_goes_from_one_to_min_ratio():
    assert cosine(10, 110, warmup=10, min_ratio=0.1) == pytest.approx(1.0)
    assert cosine(109, 110, warmup=10, min_ratio=0.1) == pytest.approx(0.1)
    assert cosine(59.5, 110, warmup=10, min_ratio=0.1) == pytest.approx(0.55)
    values = [cosine(s, 110, 10, 0.1) for s in range(10, 110)]
    assert values == sorted(values, reverse=True)
    assert cosine(500, 110, 10, 0.1) == pytest.approx(0.1)  # clamped past the end


def test_wsd_is_flat_then_decays_over_the_final_fraction():
    total = 100
    vals = [wsd(s, total, warmup=5, decay_fraction=0.2, min_ratio=0.0) for s in range(total)]
    assert all(v == 1.0 for v in vals[5:80])
    assert vals[80] == 1.0 and vals[99] == pytest.approx(0.0)
    assert vals[80:] == sorted(vals[80:], reverse=True)


def test_constant_and_factory():
    assert constant(50, 100, warmup=10) == 1.0
    spec = TrainSpec(schedule="wsd", warmup_fraction=0.1, decay_fraction=0.5, min_lr_ratio=0.2)
    f = make_schedule(spec, 100)
    assert f(0) == pytest.approx(0.1) and f(20) == 1.0 and f(99) == pytest.approx(0.2)
    g = make_schedule(TrainSpec(schedule="constant", warmup_fraction=0.0), 10)
    assert [g(s) for s in range(10)] == [1.0] * 10
