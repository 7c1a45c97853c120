"""Where is the best learning rate, how sure are we, and how does it move with width or depth?

Two fits, both in natural-log coordinates (slopes are base independent):

1. **Per shape** (`fit_optimum`): the final losses of an LR sweep at one (parametrization, width, depth),
   seeds pooled, are fitted by a weighted quadratic in x = ln(lr) through the best grid point and its
   neighbours (`window` points each side): L(x) ≈ c + a·(x − x*)². The optimum is lr* = exp(x*); the
   curvature `a` gives the LR sensitivity (loss increase at ×2 / ×½ of lr* is a·ln(2)²). Weights are
   1/(variance of the mean over seeds), with a floor so that a point with identical seeds cannot dominate.
   The interval on lr* comes from a bootstrap: with ≥ 2 seeds, seeds are resampled (the whole curve of a
   seed stays together, so a lucky seed moves every LR at once, as it does in reality); with one seed the
   fit's residuals are resampled. Diverged/failed points have no loss: they are left out of the fit (they
   only bound it). When the best point is at the edge of the grid the optimum is not bracketed — the fit
   still reports the edge, with `bracketed = False`, and the analysis warns.

2. **Across shapes** (`fit_slope`): ln lr* regressed on ln width (or ln depth), weighted by the inverse
   bootstrap variance of each ln lr*. The slope is the evidence: ≈ 0 means the tuned LR transfers (μP for
   width; depth-μP for depth), clearly negative means it does not (SP with Adam: hidden-weight updates grow
   with fan-in, so the best LR falls roughly like 1/width). Its interval is the spread of the slope over
   the per-shape bootstrap draws.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from scalelab.errors import FitError

LN2 = math.log(2.0)
#: relative floor on the per-point loss variance used for weights (1e-3 of the loss, squared)
VARIANCE_FLOOR_REL = 1e-3


@dataclass
class OptimumFit:
    """The fitted LR optimum of one shape (see the module docstring)."""

    lr_opt: float  # exp(x*)
    lr_opt_interval: tuple[float, float]  # bootstrap percentile interval (nan when not computable)
    log_lr_se: float  # bootstrap standard error of ln lr* (nan when not computable)
    loss_at_opt: float  # c
    curvature: float  # a in L ≈ c + a (ln lr − ln lr*)²
    best_grid_lr: float  # the sampled LR with the lowest mean loss
    best_grid_loss: float
    bracketed: bool  # the best grid point has a sampled neighbour on both sides
    n_points: int  # grid points used in the quadratic
    n_seeds: int
    sensitivity_x2: float  # fitted loss increase at 2·lr*
    sensitivity_half: float  # fitted loss increase at lr*/2
    measured_x2: float | None = None  # measured: loss at the grid LR nearest 2·best minus best (if sampled)
    measured_half: float | None = None
    seed_std: float = math.nan  # mean over LRs of the seed-to-seed std of the final loss
    draws: list[float] = field(default_factory=list, repr=False)  # bootstrap draws of ln lr*

    def to_dict(self, draws: bool = False) -> dict[str, Any]:
        d = asdict(self)
        d["lr_opt_interval"] = list(self.lr_opt_interval)
        if not draws:
            d.pop("draws")
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


def _weighted_quadratic(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> tuple[float, float, float] | None:
    """Fit y ≈ p0 + p1 x + p2 x²; return (x*, c, a) or None when the parabola does not open upwards."""
    if x.size < 3 or np.unique(x).size < 3:
        return None
    A = np.stack([np.ones_like(x), x, x * x], axis=1)
    sw = np.sqrt(w)
    coef, *_ = np.linalg.lstsq(A * sw[:, None], y * sw, rcond=None)
    p0, p1, p2 = (float(c) for c in coef)
    if not p2 > 0:
        return None
    xs = -p1 / (2 * p2)
    return xs, p0 - p1 * p1 / (4 * p2), p2


def _point_estimate(
    x: np.ndarray, mean: np.ndarray, w: np.ndarray, window: int
) -> tuple[float, float, float, np.ndarray, bool]:
    """(x*, c, a, used-mask, bracketed) for one curve of mean losses on the sorted grid x."""
    finite = np.isfinite(mean)
    if not finite.any():
        raise FitError("no sampled learning rate finished with a finite loss")
    best = int(np.nanargmin(np.where(finite, mean, np.nan)))
    lo, hi = max(0, best - window), min(x.size, best + window + 1)
    used = np.zeros(x.size, dtype=bool)
    used[lo:hi] = True
    used &= finite
    bracketed = bool(best > 0 and best < x.size - 1 and finite[best - 1] and finite[best + 1])
    fit = _weighted_quadratic(x[used], mean[used], w[used])
    if fit is None:  # flat or concave neighbourhood: fall back to the grid point
        return float(x[best]), float(mean[best]), 0.0, used, bracketed
    xs, c, a = fit
    # never extrapolate beyond the points used: an unbracketed optimum sits at the edge
    xs = float(np.clip(xs, x[used].min(), x[used].max()))
    c = float(np.sum(w[used] * (mean[used] - a * (x[used] - xs) ** 2)) / np.sum(w[used]))
    return xs, c, a, used, bracketed


def fit_optimum(
    lrs: Sequence[float],
    losses: Sequence[Sequence[float | None]],
    *,
    window: int = 2,
    n_bootstrap: int = 200,
    seed: int = 0,
    level: float = 0.9,
) -> OptimumFit:
    """Fit the LR optimum of one shape.

    `lrs`: the sampled learning rates (any order, distinct). `losses[i][s]`: final loss at `lrs[i]` for
    seed s (None or nan for a diverged/failed run; every row has one entry per seed). `window`: grid
    points each side of the best one used in the quadratic.
    """
    lr_arr = np.asarray(lrs, dtype=float)
    if lr_arr.ndim != 1 or lr_arr.size < 3:
        raise FitError(f"an LR optimum needs at least 3 sampled learning rates, got {lr_arr.size}")
    if np.any(lr_arr <= 0) or np.unique(lr_arr).size != lr_arr.size:
        raise FitError("learning rates must be positive and distinct")
    table = np.array([[np.nan if v is None else float(v) for v in row] for row in losses], dtype=float)
    if table.ndim != 2 or table.shape[0] != lr_arr.size:
        raise FitError(f"losses must have one row (of one value per seed) per LR; got shape {table.shape}")
    order = np.argsort(lr_arr)
    x, table = np.log(lr_arr[order]), table[order]
    n_seeds = table.shape[1]

    def curve(tab: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with np.errstate(all="ignore"):
            # a point is usable only when every seed finished (a diverging seed makes that LR unsafe)
            mean = np.where(np.isfinite(tab).all(axis=1), tab.mean(axis=1), np.nan)
            var = tab.var(axis=1, ddof=1) / tab.shape[1] if tab.shape[1] > 1 else np.zeros(tab.shape[0])
        floor = (VARIANCE_FLOOR_REL * np.nan_to_num(mean, nan=1.0)) ** 2
        w = 1.0 / np.maximum(np.nan_to_num(var, nan=0.0), floor)
        return mean, w

    mean, w = curve(table)
    xs, c, a, used, bracketed = _point_estimate(x, mean, w, window)
    best = int(np.nanargmin(mean))

    rng = np.random.default_rng(seed)
    draws: list[float] = []
    if n_bootstrap > 0:
        if n_seeds >= 2:
            for _ in range(n_bootstrap):
                pick = rng.integers(0, n_seeds, size=n_seeds)
                m_b, w_b = curve(table[:, pick])
                if not np.isfinite(m_b).any():
                    continue
                draws.append(_point_estimate(x, m_b, w_b, window)[0])
        elif a > 0 and used.sum() > 3:
            fitted = c + a * (x - xs) ** 2
            resid = (mean - fitted)[used]
            for _ in range(n_bootstrap):
                m_b = mean.copy()
                m_b[used] = fitted[used] + rng.choice(resid, size=resid.size, replace=True)
                draws.append(_point_estimate(x, m_b, w, window)[0])
    if len(draws) >= 10:
        arr = np.asarray(draws)
        tail = (1 - level) / 2 * 100
        interval = (float(np.exp(np.percentile(arr, tail))), float(np.exp(np.percentile(arr, 100 - tail))))
        se = float(arr.std(ddof=1))
    else:
        interval, se = (math.nan, math.nan), math.nan

    def measured(factor: float) -> float | None:
        target = x[best] + math.log(factor)
        j = int(np.argmin(np.abs(x - target)))
        if abs(x[j] - target) > 0.2 or not np.isfinite(mean[j]):
            return None
        return float(mean[j] - mean[best])

    with np.errstate(all="ignore"):
        seed_std = float(np.nanmean(table.std(axis=1, ddof=1))) if n_seeds > 1 else math.nan
    return OptimumFit(
        lr_opt=float(math.exp(xs)),
        lr_opt_interval=interval,
        log_lr_se=se,
        loss_at_opt=float(c),
        curvature=float(a),
        best_grid_lr=float(math.exp(x[best])),
        best_grid_loss=float(mean[best]),
        bracketed=bracketed,
        n_points=int(used.sum()),
        n_seeds=n_seeds,
        sensitivity_x2=float(a * LN2**2),
        sensitivity_half=float(a * LN2**2),
        measured_x2=measured(2.0),
        measured_half=measured(0.5),
        seed_std=seed_std,
        draws=draws,
    )


@dataclass
class SlopeFit:
    """ln lr* = intercept + slope · ln(size): how the optimum moves with width (or depth)."""

    axis: str
    slope: float
    slope_interval: tuple[float, float]
    slope_se: float
    intercept: float
    sizes: list[float]
    lr_opts: list[float]

    def predict(self, size: float) -> float:
        """The fitted optimum LR at `size` (extrapolates: check the sizes it was fitted on)."""
        return float(math.exp(self.intercept + self.slope * math.log(size)))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["slope_interval"] = list(self.slope_interval)
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


def _wls_line(u: np.ndarray, y: np.ndarray, w: np.ndarray) -> tuple[float, float]:
    A = np.stack([np.ones_like(u), u], axis=1)
    sw = np.sqrt(w)
    coef, *_ = np.linalg.lstsq(A * sw[:, None], y * sw, rcond=None)
    return float(coef[1]), float(coef[0])


def fit_slope(
    sizes: Sequence[float],
    fits: Sequence[OptimumFit],
    *,
    axis: str = "width",
    level: float = 0.9,
    seed: int = 0,
    n_draws: int = 1000,
) -> SlopeFit:
    """Regress ln lr* on ln size over the shapes of one parametrization (at least 2 sizes)."""
    if len(sizes) != len(fits) or len(sizes) < 2:
        raise FitError(f"a slope across {axis} needs at least 2 {axis}s with an optimum, got {len(sizes)}")
    u = np.log(np.asarray(sizes, dtype=float))
    if np.unique(u).size < 2:
        raise FitError(f"a slope across {axis} needs at least 2 distinct {axis}s")
    y = np.log([f.lr_opt for f in fits])
    se = np.array([f.log_lr_se for f in fits], dtype=float)
    # half a grid step of uncertainty at least: a point estimate is never better than the grid allows
    finite_se = se[np.isfinite(se)]
    floor = max(0.05, float(np.median(finite_se)) if finite_se.size else 0.2)
    var = np.maximum(np.where(np.isfinite(se), se, floor) ** 2, floor**2 / 4)
    w = 1.0 / var
    slope, intercept = _wls_line(u, y, w)
    rng = np.random.default_rng(seed)
    boot = []
    for _ in range(n_draws):
        yb = np.array(
            [
                rng.choice(f.draws) if len(f.draws) >= 10 else y[i] + rng.normal(0, math.sqrt(var[i]))
                for i, f in enumerate(fits)
            ]
        )
        boot.append(_wls_line(u, yb, w)[0])
    arr = np.asarray(boot)
    tail = (1 - level) / 2 * 100
    return SlopeFit(
        axis=axis,
        slope=slope,
        slope_interval=(float(np.percentile(arr, tail)), float(np.percentile(arr, 100 - tail))),
        slope_se=float(arr.std(ddof=1)),
        intercept=intercept,
        sizes=[float(s) for s in sizes],
        lr_opts=[f.lr_opt for f in fits],
    )
