"""Gradient noise scale: the estimator recovers a known B_simple on a quadratic problem with known noise."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from scalelab.spec import TrainSpec
from scalelab.train.noise_scale import (
    GradientNoiseCallback,
    NoiseScaleAccumulator,
    measure_noise_scale,
    summarize_history,
    two_batch_estimate,
)
from scalelab.train.trainer import Trainer


class QuadraticModel(nn.Module):
    """loss = mean over tokens of ½|θ − θ* − ξ(token)|²: per-token gradient θ − θ* − ξ(token).

    ξ is a fixed, centred table of K noise vectors, so with tokens uniform over K the true gradient is
    G = θ − θ* and the per-token gradient covariance is Σ = cov(table) (population covariance): the
    noise scale B_simple = tr(Σ)/|G|² (in tokens) is known exactly.
    """

    def __init__(self, dim: int, offset: float, noise_std: float, k: int = 512, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        table = torch.randn(k, dim, generator=gen, dtype=torch.float64) * noise_std
        self.register_buffer("table", (table - table.mean(0)).float())
        self.theta = nn.Parameter(torch.full((dim,), offset))  # θ* = 0

    def true_b_simple(self) -> float:
        trace = float(self.table.double().pow(2).sum(1).mean())
        return trace / float(self.theta.detach().double().pow(2).sum())

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        xi = self.table[x]  # (B, T, dim)
        return 0.5 * (self.theta - xi).pow(2).sum(-1).mean()


def _loader(k: int, batch: int, t: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    while True:
        yield torch.randint(0, k, (batch, t + 1), generator=gen)


def test_two_batch_estimate_is_exact_on_expectations():
    g2, trace, b_small, b_big = 4.0, 100.0, 8, 64
    sq_small = g2 + trace / b_small
    sq_big = g2 + trace / b_big
    est = two_batch_estimate(sq_small, b_small, sq_big, b_big)
    assert est == pytest.approx((g2, trace))
    with pytest.raises(ValueError):
        two_batch_estimate(1, 8, 1, 8)


def test_accumulator_state_round_trip():
    acc = NoiseScaleAccumulator(decay=0.9)
    for _ in range(5):
        acc.add(3.0, 4, 1.5, 16)
    other = NoiseScaleAccumulator(decay=0.9)
    other.load_state_dict(acc.state_dict())
    assert other.estimate() == acc.estimate()
    assert acc.estimate().b_simple == pytest.approx(
        two_batch_estimate(3.0, 4, 1.5, 16)[1] / two_batch_estimate(3.0, 4, 1.5, 16)[0]
    )


@pytest.mark.parametrize("noise_std", [0.5, 2.0, 8.0])
def test_callback_recovers_known_noise_scale_during_training(noise_std):
    dim, t, k = 16, 8, 512
    model = QuadraticModel(dim, offset=0.5, noise_std=noise_std)
    truth = model.true_b_simple()  # tokens
    train = TrainSpec(
        tokens=400 * 32 * t,
        global_batch_size=32,
        micro_batch_size=4,
        lr=1e-9,  # θ (hence G) stays put: the truth holds at every step
        weight_decay=0.0,
        grad_clip=None,
        schedule="constant",
        warmup_fraction=0.0,
        device="cpu",
    )
    cb = GradientNoiseCallback(decay=None)
    groups = [{"params": [model.theta], "name": "hidden"}]
    trainer = Trainer(
        model,
        groups,
        train,
        train_loader=_loader(k, 32, t),
        total_steps=400,
        context_tokens=t,
        callbacks=[cb],
    )
    trainer.fit()
    est = cb.estimate()
    assert est.n == 400
    assert est.b_small == 4 * t and est.b_big == 32 * t
    # tokens are uniform over K, so Σ and G are exact up to the sampling noise of 400 steps
    assert est.b_simple == pytest.approx(truth, rel=0.15), (est, truth)
    assert est.trace == pytest.approx(noise_std**2 * dim, rel=0.15)
    assert est.g2 == pytest.approx(0.25 * dim, rel=0.15)
    summary = summarize_history(cb.history)
    assert summary["n"] == 400 and summary["last"] == pytest.approx(truth, rel=0.2)
    # hooks removed at the end: another backward does not touch the callback
    model(torch.zeros(1, t, dtype=torch.long), None).backward()
    assert cb._sq is None


def test_callback_without_accumulation_estimates_nothing():
    model = QuadraticModel(4, offset=0.5, noise_std=1.0)
    train = TrainSpec(tokens=10 * 8 * 4, global_batch_size=8, lr=1e-9, device="cpu", weight_decay=0.0)
    cb = GradientNoiseCallback()
    trainer = Trainer(
        model,
        [{"params": [model.theta]}],
        train,
        train_loader=_loader(512, 8, 4),
        total_steps=10,
        context_tokens=4,
        callbacks=[cb],
    )
    trainer.fit()
    assert cb.estimate().n == 0 and math.isnan(cb.estimate().b_simple)


def test_separate_estimator_recovers_known_noise_scale():
    dim, t, k = 16, 8, 512
    model = QuadraticModel(dim, offset=0.25, noise_std=1.0, seed=3)
    truth = model.true_b_simple()
    loader = _loader(k, 64, t, seed=1)
    est = measure_noise_scale(model, (next(loader) for _ in range(200)), micro_batch_size=8)
    assert est.b_simple == pytest.approx(truth, rel=0.15), (est, truth)
    assert model.theta.grad is None


def test_estimator_unbiased_in_simulation():
    """Pure numbers: Gaussian per-example gradients, many draws; the averaged ratio converges."""
    rng = np.random.default_rng(0)
    dim, g, sigma = 32, 0.3, 1.0
    G = np.full(dim, g)
    truth = dim * sigma**2 / (dim * g**2)
    acc = NoiseScaleAccumulator(decay=None)
    for _ in range(2000):
        small = G + rng.normal(0, sigma, size=(8, dim)) / math.sqrt(4)  # 8 micro-batches of 4 examples
        big = small.mean(0)
        acc.add(float((small**2).sum(1).mean()), 4, float((big**2).sum()), 32)
    assert acc.estimate().b_simple == pytest.approx(truth, rel=0.05)
