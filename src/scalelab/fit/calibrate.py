"""Extrapolation-calibrated prediction intervals: model-form error measured by rolling-origin backtests.

A bootstrap over runs measures parameter noise only; when the law's form is slightly wrong over the
range, every prediction beyond the runs is off in the same direction and the bootstrap interval misses
(on public ladders it held 10–33 % of the larger runs). This module measures the error the form makes
*from the runs themselves*:

1. **Rolling origin.** For several compute cuts inside the table, fit the law on the runs below the
   cut and predict the runs above it (`rolling_origin`). Each held-out run gives a log error
   ``r = log(actual) − log(predicted)`` and how far it lies beyond its fold's largest run, in log units
   of compute, parameters and tokens: ``x_C, x_N, x_D ≥ 0``.
2. **Error growth.** The typical |r| is modelled as growing linearly with the log extrapolation ratio,
   separately in C, N and D, from a floor: ``s_k(x_k) = σ₀ + g_k·x_k``; the scale at a point is the
   largest of the three (``scale``). σ₀ is never below the run-to-run noise measured from seed
   replicates, and each growth rate never below ``MIN_GROWTH`` (a law that extrapolated perfectly in
   the folds is not trusted to do so without limit).
3. **Calibration.** The normalised errors ``z = |r| / s(x)`` of all folds (each fold weighted equally,
   since runs of one fold share one misfit) give the quantile ``z_q`` for a nominal level; the
   interval at a point is ``log L̂ ± sqrt(h_boot² + (z_q·s(x))²)`` with ``h_boot`` the bootstrap
   half-width (parameter noise of the full fit). This is normalised ("locally weighted") split
   conformal prediction with the rolling-origin folds as calibration set; a Gaussian-tail estimate
   replaces the empirical quantile where the folds are too few to resolve the level.
4. **No silent narrow interval.** With too few distinct compute levels for two folds, the calibration
   falls back to `FALLBACK` (stated in the result, above every growth fitted on the public ladders) and says so.

See `docs/calibration.md` for the choice of method and the measured coverage.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import stats

from scalelab.errors import FitError
from scalelab.fit.table import RunTable

log = logging.getLogger(__name__)

#: least growth of the error scale per e-fold of extrapolation (log units per log unit)
MIN_GROWTH = 0.002
#: least error floor (1 % in log loss is below every public ladder's backtest error)
MIN_FLOOR = 0.002
#: the stated conservative rule when the data cannot support a calibration: floor 2 %, +6 % per e-fold
#: of extrapolation (above the largest growth the backtests fitted on the public ladders: 2.6 % per
#: e-fold in N on Chinchilla and Gadre, 5.6 % in D on open_lm)
FALLBACK = {"floor": 0.02, "growth": 0.06, "z_scale": 1.0}
FEW_RUNS_NOTE = (
    " (few runs: folds of fewer than 3 runs per parameter, never narrower than the conservative rule)"
)
MAX_FOLDS = 6
MIN_FOLDS = 2
DIMENSIONS = ("C", "N", "D")


def _cluster_levels(values: np.ndarray, rel_tol: float = 0.05) -> np.ndarray:
    """Distinct levels of a positive quantity (values within `rel_tol` of the previous level merge)."""
    v = np.sort(np.log(values))
    levels = [v[0]]
    for x in v[1:]:
        if x - levels[-1] > np.log1p(rel_tol):
            levels.append(x)
    return np.exp(np.array(levels))


def extrapolation_coords(
    N: np.ndarray, D: np.ndarray, C: np.ndarray, n_max: float, d_max: float, c_max: float
) -> np.ndarray:
    """(m, 3) array of x_C, x_N, x_D: log ratios beyond the largest fitted C, N, D (0 inside the range)."""
    return np.stack(
        [
            np.maximum(np.log(np.asarray(C, float) / c_max), 0.0),
            np.maximum(np.log(np.asarray(N, float) / n_max), 0.0),
            np.maximum(np.log(np.asarray(D, float) / d_max), 0.0),
        ],
        axis=-1,
    )


def seed_noise(table: RunTable) -> dict[str, Any] | None:
    """Run-to-run spread from seed replicates: pooled sd of log loss within configs with ≥ 2 seeds."""
    if table.seed is None:
        return None
    clusters = table.clusters()
    logy = np.log(table.loss)
    ss, dof, n_configs = 0.0, 0, 0
    for c in np.unique(clusters):
        ys = logy[clusters == c]
        if ys.size >= 2:
            ss += float(np.sum((ys - ys.mean()) ** 2))
            dof += ys.size - 1
            n_configs += 1
    if not dof:
        return None
    return {"log_sd": float(np.sqrt(ss / dof)), "configs": n_configs, "dof": dof}


def residual_scatter(law: Any) -> float:
    """Robust sd (1.4826·MAD) of the full fit's log residuals: the least error of a prediction even
    inside the fitted range."""
    r = np.asarray(getattr(law, "residuals_", []), dtype=np.float64)
    if r.size < 3:
        return 0.0
    return float(1.4826 * np.median(np.abs(r - np.median(r))))


def min_fold_runs(n_params: int, strict: bool = True) -> int:
    """Runs a rolling-origin fold must keep below its cut: 3 per parameter (strict), else n_params + 2."""
    return max(3 * n_params, 10) if strict else n_params + 2


def choose_cuts(
    table: RunTable, n_params: int, max_folds: int = MAX_FOLDS, strict: bool = True
) -> np.ndarray:
    """Compute cuts for the rolling origin: each leaves ≥ `min_fold_runs` runs and ≥ 3 model sizes
    below it and ≥ 1 run above it; up to `max_folds`, spread evenly in log compute."""
    levels = _cluster_levels(table.C)
    min_train = min_fold_runs(n_params, strict)
    ok = []
    for cut in levels[:-1]:
        below = table.C <= cut * 1.0001
        if below.sum() < min_train or (~below).sum() < 1:
            continue
        if _cluster_levels(table.N[below]).size < 3:
            continue
        ok.append(cut)
    if len(ok) <= max_folds:
        return np.array(ok)
    idx = np.unique(np.round(np.linspace(0, len(ok) - 1, max_folds)).astype(int))
    return np.array(ok)[idx]


def rolling_origin(law: Any, table: RunTable, cuts: np.ndarray) -> list[dict[str, Any]]:
    """Fit a copy of `law` (no bootstrap) below each cut, predict the runs above it.

    Returns one dict per fold that could be fitted: cut, train/test sizes, and per held-out run the
    log error and the extrapolation coordinates relative to the fold's largest run."""
    folds = []
    params = {**law.get_params(), "n_bootstrap": 0, "n_jobs": 1, "calibrate": False}
    for cut in cuts:
        below = table.C <= cut * 1.0001
        train, test = table.subset(below), table.subset(~below)
        try:
            sub = type(law)(**params).fit(train)
        except FitError as err:
            log.info("calibration fold at C <= %.3g skipped: %s", cut, err)
            continue
        pred = np.asarray(sub.predict(test), dtype=np.float64)
        r = np.log(test.loss) - np.log(pred)
        x = extrapolation_coords(test.N, test.D, test.C, train.N.max(), train.D.max(), train.C.max())
        folds.append(
            {
                "cut_flops": float(cut),
                "train_runs": len(train),
                "test_runs": len(test),
                "log_errors": r,
                "coords": x,
                "converged": bool(sub.result_.converged),
            }
        )
    return folds


def _scale_of(theta: np.ndarray, x: np.ndarray) -> np.ndarray:
    """s(x) = σ₀ + max_k g_k·x_k with θ = (σ₀, g_C, g_N, g_D)."""
    return theta[0] + (x * theta[1:]).max(axis=1)


def fit_error_scale(r: np.ndarray, x: np.ndarray, w: np.ndarray, floor: float) -> np.ndarray:
    """Heteroscedastic Gaussian maximum likelihood of log errors r ~ N(0, s(x)²), fold-weighted:
    θ = (σ₀, g_C, g_N, g_D) with σ₀ ≥ `floor` and every g_k ≥ MIN_GROWTH."""
    from scipy.optimize import minimize

    w = w / w.sum()
    r2 = r * r

    def nll(theta: np.ndarray) -> float:
        s = _scale_of(theta, x)
        return float(np.sum(w * (np.log(s) + 0.5 * r2 / (s * s))))

    rms = float(np.sqrt(np.sum(w * r2)))
    starts = [np.array([max(floor, rms), *[MIN_GROWTH] * 3])]
    for k in range(3):
        th = np.array([max(floor, 0.5 * rms), MIN_GROWTH, MIN_GROWTH, MIN_GROWTH])
        xs = x[:, k]
        if np.sum(w * xs) > 0:
            th[1 + k] = max(MIN_GROWTH, rms / max(float(np.sum(w * xs) / np.sum(w)), 1e-3))
        starts.append(th)
    bounds = [(floor, None), *[(MIN_GROWTH, None)] * 3]
    best = None
    for th0 in starts:
        res = minimize(nll, th0, method="L-BFGS-B", bounds=bounds)
        if best is None or res.fun < best.fun:
            best = res
    return np.asarray(best.x, dtype=np.float64)


@dataclass
class Calibration:
    """Fitted error model of a law's extrapolations (see the module docstring).

    ``floor`` σ₀ and ``growth`` {C, N, D} define the scale s(x); ``scores`` are the fold-weighted
    normalised errors; ``method`` is "rolling-origin backtest" or "fallback" (then ``reason`` says why).
    """

    method: str
    floor: float
    growth: dict[str, float]
    scores: np.ndarray = field(default_factory=lambda: np.zeros(0))
    score_weights: np.ndarray = field(default_factory=lambda: np.zeros(0))
    folds: list[dict[str, Any]] = field(default_factory=list)
    noise: dict[str, Any] | None = None
    reason: str = ""
    bias: float = 0.0

    @property
    def n_folds(self) -> int:
        return len(self.folds)

    @property
    def max_seen(self) -> dict[str, float]:
        """The largest extrapolation (as a ratio) any fold predicted, per dimension."""
        if not self.folds:
            return dict.fromkeys(DIMENSIONS, 1.0)
        x = np.concatenate([np.asarray(f["coords"]).reshape(-1, 3) for f in self.folds])
        return {k: float(np.exp(x[:, i].max())) for i, k in enumerate(DIMENSIONS)}

    def scale(self, coords: np.ndarray) -> np.ndarray:
        """s(x) = max_k (σ₀ + g_k·x_k) for coords of shape (m, 3)."""
        x = np.asarray(coords, dtype=np.float64).reshape(-1, 3)
        g = np.array([self.growth[k] for k in DIMENSIONS])
        return self.floor + (x * g).max(axis=1)

    def z_quantile(self, level: float) -> float:
        """Multiplier of s(x) for a central interval at `level`: the fold-weighted empirical quantile of
        |z| with a conformal finite-sample correction, never below a Gaussian-tail estimate from the
        scores' root mean square (few folds cannot resolve a 95 % quantile empirically)."""
        if not (0 < level < 1):
            raise FitError(f"interval level must be in (0, 1), got {level!r}")
        if self.method == "fallback" or not self.scores.size:
            return float(FALLBACK["z_scale"] * stats.norm.ppf(0.5 + level / 2))
        z, w = self.scores, self.score_weights / self.score_weights.sum()
        n_eff = max(1.0, 1.0 / float(np.sum(w * w)))  # Kish: runs of one fold share weight 1/n_fold
        q = min(1.0, level * (n_eff + 1) / n_eff)
        order = np.argsort(z)
        cw = np.cumsum(w[order])
        emp = float(z[order][min(np.searchsorted(cw, q - 1e-12), z.size - 1)])
        rms = float(np.sqrt(np.sum(w * z * z)))
        gauss = rms * float(stats.t.ppf(0.5 + level / 2, df=max(n_eff - 1, 2)))
        return max(emp, gauss)

    def half_width(self, coords: np.ndarray, level: float) -> np.ndarray:
        """Model-form half-width in log loss at each point (before combining with the bootstrap)."""
        return self.z_quantile(level) * self.scale(coords)

    def describe(self, coords: np.ndarray | None = None) -> dict[str, Any]:
        """Where the calibration comes from, and (for `coords`) how far the point lies beyond it."""
        seen = self.max_seen
        out: dict[str, Any] = {
            "method": self.method,
            "folds": self.n_folds,
            "fold_cuts_flops": [f["cut_flops"] for f in self.folds],
            "max_extrapolation_seen": seen,
            "floor_log": self.floor,
            "growth_per_efold": dict(self.growth),
            "noise_floor": self.noise,
        }
        if self.reason:
            out["reason"] = self.reason
        if coords is not None:
            x = np.asarray(coords, dtype=np.float64).reshape(-1, 3)[0]
            ratio = {k: float(np.exp(x[i])) for i, k in enumerate(DIMENSIONS)}
            beyond = {k: ratio[k] / seen[k] for k in DIMENSIONS}
            out["extrapolation"] = ratio
            out["beyond_calibration"] = beyond
            out["verdict"] = verdict(ratio, beyond, self)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "floor": self.floor,
            "growth": dict(self.growth),
            "scores": self.scores.tolist(),
            "score_weights": self.score_weights.tolist(),
            "noise": self.noise,
            "reason": self.reason,
            "bias": self.bias,
            "folds": [
                {
                    "cut_flops": f["cut_flops"],
                    "train_runs": f["train_runs"],
                    "test_runs": f["test_runs"],
                    "converged": f.get("converged", True),
                    "log_errors": np.asarray(f["log_errors"]).tolist(),
                    "coords": np.asarray(f["coords"]).tolist(),
                }
                for f in self.folds
            ],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Calibration:
        folds = [
            {**f, "log_errors": np.asarray(f["log_errors"], float), "coords": np.asarray(f["coords"], float)}
            for f in d.get("folds", [])
        ]
        return cls(
            method=d["method"],
            floor=float(d["floor"]),
            growth={k: float(v) for k, v in d["growth"].items()},
            scores=np.asarray(d.get("scores", []), float),
            score_weights=np.asarray(d.get("score_weights", []), float),
            folds=folds,
            noise=d.get("noise"),
            reason=d.get("reason", ""),
            bias=float(d.get("bias", 0.0)),
        )


def source_text(cal: dict[str, Any]) -> str:
    """Where an interval's model-form error comes from, in one line, from a calibration's `to_dict()`
    (as stored in fit.json): folds, floor and growth, or the conservative rule and why."""
    growth = ", ".join(f"{k} {100 * v:.2g} %" for k, v in cal.get("growth", {}).items() if v)
    if cal.get("method") == "fallback":
        return (
            f"no calibration from these runs ({cal.get('reason', '')}); conservative rule: "
            f"{100 * cal['floor']:.2g} % + per e-fold of extrapolation {growth}"
        )
    return (
        f"{len(cal.get('folds', []))} rolling-origin backtest folds: error floor {100 * cal['floor']:.2g} %, "
        f"growth per e-fold of extrapolation {growth or 'none'}"
    )


def verdict(ratio: dict[str, float], beyond: dict[str, float], cal: Calibration) -> str:
    """One honest sentence about how far a prediction reaches beyond what the calibration saw."""
    if cal.method == "fallback":
        return f"no calibration from the data ({cal.reason}); the interval uses the stated conservative rule"
    worst = max(DIMENSIONS, key=lambda k: beyond[k])
    if beyond[worst] <= 1.0 + 1e-9:
        if max(ratio.values()) <= 1.0 + 1e-9:
            return "inside the range of the fitted runs"
        return (
            f"within the extrapolation the calibration saw ({cal.n_folds} backtest folds, up to "
            f"{cal.max_seen['C']:.3g}x in compute)"
        )
    seen = cal.max_seen[worst]
    reached = (
        f"its {cal.n_folds} backtest folds never extrapolated in {worst}"
        if seen <= 1.0 + 1e-9
        else f"its {cal.n_folds} backtest folds reached {seen:.3g}x"
    )
    return (
        f"extrapolating {ratio[worst]:.3g}x beyond the largest run in {worst}, {beyond[worst]:.3g}x beyond "
        f"what the calibration saw ({reached}): the interval's growth there is modelled, not measured"
    )


def calibrate(
    law: Any, table: RunTable, max_folds: int = MAX_FOLDS, dims: tuple[str, ...] = DIMENSIONS
) -> Calibration:
    """Rolling-origin backtests of `law`'s form on `table` → a `Calibration` (or the stated fallback).

    ``dims``: the extrapolation dimensions the law can see (a law of C alone cannot tell how far a
    query lies beyond the runs in N or D); the others get no growth term."""
    noise = seed_noise(table)
    noise_sd = noise["log_sd"] if noise else 0.0
    floor_min = max(MIN_FLOOR, noise_sd, residual_scatter(law))
    n_params = len(getattr(law, "param_names", ())) or 5
    cuts = choose_cuts(table, n_params, max_folds)
    folds = rolling_origin(law, table, cuts) if cuts.size else []
    few_runs = len(folds) < MIN_FOLDS
    if few_runs:  # too few runs for folds of 3 runs per parameter: smaller folds, never below the rule
        cuts = choose_cuts(table, n_params, max_folds, strict=False)
        folds = rolling_origin(law, table, cuts) if cuts.size else []
    if len(folds) < MIN_FOLDS:
        reason = (
            f"only {len(folds)} backtest fold(s) possible: a fold needs >= {min_fold_runs(n_params, False)} "
            "runs and 3 model sizes below a compute level with runs above it"
        )
        return Calibration(
            method="fallback",
            floor=max(FALLBACK["floor"], noise_sd),
            growth={k: FALLBACK["growth"] if k in dims else 0.0 for k in DIMENSIONS},
            noise=noise,
            reason=reason,
        )
    r = np.concatenate([f["log_errors"] for f in folds])
    x = np.concatenate([f["coords"] for f in folds]) * np.array([k in dims for k in DIMENSIONS])
    w = np.concatenate([np.full(f["test_runs"], 1.0 / f["test_runs"]) for f in folds])
    theta = fit_error_scale(r, x, w, floor_min)
    if few_runs:
        theta = np.maximum(theta, [FALLBACK["floor"], *[FALLBACK["growth"]] * 3])
    cal = Calibration(
        method="rolling-origin backtest" + (FEW_RUNS_NOTE if few_runs else ""),
        floor=float(theta[0]),
        growth={k: float(theta[1 + i]) for i, k in enumerate(DIMENSIONS)},
        folds=folds,
        noise=noise,
        bias=float(np.sum(w * r) / np.sum(w)),
    )
    for k in DIMENSIONS:
        if k not in dims:
            cal.growth[k] = 0.0
    cal.scores = np.abs(r) / cal.scale(x)
    cal.score_weights = w
    return cal


def calibrate_law(law: Any, table: RunTable, dims: tuple[str, ...]) -> Calibration:
    """`calibrate` for a fitted law; a table with a degenerate axis gets the fallback, stated."""
    if getattr(law, "unidentified_", ()):
        noise = seed_noise(table)
        return Calibration(
            method="fallback",
            floor=max(FALLBACK["floor"], noise["log_sd"] if noise else 0.0),
            growth={k: FALLBACK["growth"] if k in dims else 0.0 for k in DIMENSIONS},
            noise=noise,
            reason=f"parameters {', '.join(law.unidentified_)} are not identified by these runs",
        )
    return calibrate(law, table, dims=dims)


#: which parameters a law loses when every run shares one value of a variable
UNIDENTIFIED_WHEN_CONSTANT = {
    "chinchilla": {"N": ("E", "A", "alpha"), "D": ("E", "B", "beta")},
    "power": {"N": ("E", "A", "alpha"), "D": ("E", "A", "alpha"), "C": ("E", "A", "alpha")},
    "kaplan": {"N": ("N_c", "alpha_N"), "D": ("D_c", "alpha_D")},
}


def unidentified_params(law: Any, table: RunTable) -> tuple[str, ...]:
    """Parameters the table cannot identify: those tied to a variable every run shares (within 1 %)."""
    by_var = UNIDENTIFIED_WHEN_CONSTANT.get(getattr(law, "name", ""), {})
    cols = {"N": table.N, "D": table.D, "C": table.C}
    out: list[str] = []
    for var in getattr(law, "variables", ()):
        if var in by_var and _cluster_levels(cols[var], 0.01).size < 2:
            out += [p for p in by_var[var] if p not in out]
    return tuple(out)
