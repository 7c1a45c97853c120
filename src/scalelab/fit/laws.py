"""Scaling-law forms as estimators (scikit-learn shape).

``law = ChinchillaLaw(n_bootstrap=1000, seed=0).fit(table)`` returns the law; results live in attributes
ending in ``_`` (``params_``, ``intervals_``, ``derived_``, ``warnings_``, ``result_``); ``predict`` and
``optimal`` are pure functions of the fitted state; ``to_dict()`` holds all of it (and ``from_dict``
rebuilds a fitted law, bootstrap draws included, so a saved fit.json can answer new questions).

Forms:

* `ChinchillaLaw`: L(N, D) = E + A/N^α + B/D^β (Hoffmann et al. 2022, approach 3).
* `PowerLaw`: L(x) = E + A/x^α for x ∈ {C, N, D}.
* `KaplanLaw`: L(N, D) = [(N_c/N)^{α_N/α_D} + D_c/D]^{α_D} (Kaplan et al. 2020, eq. 1.5).
* `IsoFLOPLaw`: per compute budget a parabola of loss in log N; its minima fitted as N_opt = G·C^a,
  D_opt = H·C^b (Hoffmann et al. approach 2).

All parametric fits minimise the Huber loss of log residuals (see `scalelab.fit.estimate`).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from scalelab.errors import FitError
from scalelab.fit import estimate as est
from scalelab.fit._blas import one_blas_thread
from scalelab.fit.calibrate import Calibration, calibrate_law, unidentified_params
from scalelab.fit.optimal import Accounting, compute_for_loss, optimal_allocation
from scalelab.fit.table import RunTable, make_table

log = logging.getLogger(__name__)

#: a recommendation is flagged as far when it extrapolates more than this in compute, or in N or D
FAR_C = 100.0
FAR_ND = 10.0

INTERVAL_KIND_CONFIDENCE = "parameter-only (bootstrap percentiles: parameter noise, no model-form error)"
INTERVAL_KIND_PREDICTION = (
    "parameter-only prediction (bootstrap + residual scatter of single runs; no model-form error)"
)
INTERVAL_KIND_CALIBRATED = (
    "calibrated (model-form error measured by rolling-origin backtests, growing with the extrapolation "
    "in C, N and D, combined with the bootstrap's parameter noise)"
)
INTERVAL_KINDS = ("calibrated", "confidence", "prediction")


def _percentiles(samples: np.ndarray, level: float, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval over draws; undefined draws (NaN, e.g. an exponent at 0 in a ratio) are left
    out — `undefined_fraction` reports how many there were."""
    q = 100.0 * np.array([(1 - level) / 2, (1 + level) / 2])
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        lo, hi = np.nanpercentile(samples, q, axis=axis)
    return lo, hi


def _num(v: Any) -> float:
    """A number from fit.json, where infinities are written as "inf"/"-inf" and NaN as null."""
    return float("nan") if v is None else float(v)


def undefined_fraction(samples: np.ndarray) -> float:
    return float(np.mean(np.isnan(samples))) if np.size(samples) else 0.0


def _floats(x: Any) -> Any:
    if isinstance(x, np.ndarray):
        return [_floats(v) for v in x.tolist()]
    if isinstance(x, list | tuple):
        return [_floats(v) for v in x]
    if isinstance(x, dict):
        return {str(k): _floats(v) for k, v in x.items()}
    if isinstance(x, np.floating | float):
        v = float(x)
        return v if np.isfinite(v) else (None if np.isnan(v) else ("inf" if v > 0 else "-inf"))
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


class ScalingLaw:
    """Base class: validated settings, the Huber/bootstrap machinery and serialisation.

    Parameters
    ----------
    delta: Huber threshold on log residuals (default 1e-3, as Hoffmann et al.).
    n_bootstrap: bootstrap refits for intervals (0: none).
    confidence: nominal coverage of every interval (default 0.9).
    seed: seeds the resampling (results do not depend on the number of workers).
    n_jobs: worker processes for the bootstrap (None: the CPUs this process may use).
    calibrate: measure model-form error by rolling-origin backtests (`scalelab.fit.calibrate`) so that
        prediction intervals hold beyond the fitted runs (default True; False: parameter-only).
    """

    name: ClassVar[str] = "law"
    param_names: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        *,
        delta: float = est.DEFAULT_DELTA,
        n_bootstrap: int = 0,
        confidence: float = 0.9,
        seed: int = 0,
        n_jobs: int | None = None,
        calibrate: bool = True,
    ) -> None:
        if not (isinstance(delta, int | float) and np.isfinite(delta) and delta > 0):
            raise FitError(f"delta must be a positive number, got {delta!r}")
        if not (isinstance(n_bootstrap, int | np.integer) and n_bootstrap >= 0):
            raise FitError(f"n_bootstrap must be an integer >= 0, got {n_bootstrap!r}")
        if not (0 < confidence < 1):
            raise FitError(f"confidence must be in (0, 1), got {confidence!r}")
        if n_jobs is not None and (not isinstance(n_jobs, int) or n_jobs < 1):
            raise FitError(f"n_jobs must be a positive integer or None, got {n_jobs!r}")
        self.delta = float(delta)
        self.n_bootstrap = int(n_bootstrap)
        self.confidence = float(confidence)
        self.seed = int(seed)
        self.n_jobs = n_jobs
        self.calibrate = bool(calibrate)

    # -- sklearn-style introspection
    def get_params(self) -> dict[str, Any]:
        return {
            "delta": self.delta,
            "n_bootstrap": self.n_bootstrap,
            "confidence": self.confidence,
            "seed": self.seed,
            "n_jobs": self.n_jobs,
            "calibrate": self.calibrate,
        }

    def set_params(self, **params: Any) -> ScalingLaw:
        """Change settings (validated like the constructor); returns self, unfitted settings only."""
        merged = {**self.get_params(), **params}
        fresh = type(self)(**merged)
        self.__dict__.update({k: v for k, v in fresh.__dict__.items() if not k.endswith("_")})
        return self

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"

    def _check_fitted(self) -> None:
        if not hasattr(self, "theta_"):
            raise FitError(f"{type(self).__name__} is not fitted yet: call fit(table) first")

    @staticmethod
    def _as_table(X: Any, y: Any = None, weights: Any = None) -> RunTable:
        if isinstance(X, RunTable):
            if weights is not None:
                raise FitError("pass weights as the table's 'weight' column")
            return X
        arr = np.asarray(X, dtype=np.float64)
        if y is None:
            raise FitError("fit(X, y): y (the losses) is required when X is not a RunTable")
        if arr.ndim == 1:
            arr = arr[:, None]
        if arr.shape[1] == 2:
            return make_table(arr[:, 0], arr[:, 1], y, weight=weights)
        if arr.shape[1] == 3:
            return make_table(arr[:, 0], arr[:, 1], y, arr[:, 2], weight=weights)
        raise FitError(f"X must have columns (N, D) or (N, D, C); got shape {arr.shape}")

    def to_dict(self) -> dict[str, Any]:  # pragma: no cover - overridden
        raise NotImplementedError


class _PowerSumLaw(ScalingLaw):
    """Laws of the form E + Σ_k A_k/x_k^{α_k}, fitted by variable projection + L-BFGS-B."""

    coef_names: ClassVar[tuple[str, ...]] = ()
    exponent_names: ClassVar[tuple[str, ...]] = ()
    variables: tuple[str, ...] = ()

    def _features(self, table: RunTable) -> np.ndarray:
        cols = {"N": table.N, "D": table.D, "C": table.C}
        return np.stack([cols[v] for v in self.variables], axis=1)

    def fit(self, X: Any, y: Any = None, *, weights: Any = None) -> _PowerSumLaw:
        """Fit to a `RunTable` (or arrays X = (N, D[, C]), y = loss). Returns self."""
        table = self._as_table(X, y, weights)
        with one_blas_thread():
            self._fit_table(table)
        return self

    def _fit_table(self, table: RunTable) -> None:
        n_par = len(self._theta_names())
        est.check_enough_runs(len(table), n_par, f"{self.name} law on {table.source}")
        w = table.weight if table.weight is not None else np.ones(len(table))
        problem = self._make_problem(table, w)
        res = problem.search()
        self.problem_ = problem
        self.result_ = res
        self.theta_ = problem.to_natural(res.theta)
        self.table_ = table
        self.accounting_ = Accounting.from_runs(table.N, table.D, table.C, table.compute_source)
        self.n_runs_ = len(table)
        self.largest_run_flops_ = float(table.C.max())
        log_pred = self._log_predict_theta(self.theta_, self._features(table))
        self.residuals_ = np.log(table.loss) - log_pred
        self.at_bound_ = self._at_bound(res.theta, problem)
        if self.n_bootstrap:
            unit = "config (all seeds of one N, D, group)" if table.seed is not None else "run"
            boot = est.bootstrap(
                problem, res.theta, self.n_bootstrap, table.clusters(), self.seed, self.n_jobs, unit
            )
            self.bootstrap_ = boot
            self.samples_ = np.stack([problem.to_natural(t) for t in boot.thetas])
            self.samples_at_bound_ = {
                name: float(np.mean([name in self._at_bound(t, problem) for t in boot.thetas]))
                for name in self.param_names
            }
        else:
            self.bootstrap_ = None
            self.samples_ = np.zeros((0, n_par))
            self.samples_at_bound_ = {}
        self._finish_fit(table)

    def _finish_fit(self, table: RunTable) -> None:
        """After the point fit and its draws: ranges, identifiability, the calibration, the summaries."""
        cols = (("N", table.N), ("D", table.D), ("C", table.C))
        self.range_ = {k: (float(v.min()), float(v.max())) for k, v in cols}
        self.unidentified_ = unidentified_params(self, table)
        self.calibration_ = calibrate_law(self, table, self._calibration_dims()) if self.calibrate else None
        self._finish()

    def _make_problem(self, table: RunTable, w: np.ndarray) -> Any:
        return est.PowerSumProblem.from_features(self._features(table), table.loss, w, self.delta)

    def _at_bound(self, theta: np.ndarray, problem: Any) -> list[str]:
        names = self._theta_names()
        out = []
        for name, v, (lo, hi) in zip(names, theta, problem.bounds(), strict=True):
            span = max(1.0, abs(hi - lo))
            if v - lo <= 1e-6 * span or hi - v <= 1e-6 * span:
                out.append(self._param_of(name))
        return out

    def _theta_names(self) -> list[str]:
        return ["log_E", *[f"log_{c}" for c in self.coef_names], *self.exponent_names]

    @staticmethod
    def _param_of(theta_name: str) -> str:
        return theta_name.removeprefix("log_")

    @classmethod
    def _params_from_theta(cls, theta: np.ndarray) -> dict[str, np.ndarray]:
        K = len(cls.coef_names)
        out = {"E": np.exp(theta[..., 0])}
        for k, c in enumerate(cls.coef_names):
            out[c] = np.exp(theta[..., 1 + k])
        for k, e in enumerate(cls.exponent_names):
            out[e] = theta[..., 1 + K + k]
        return out

    def _calibration_dims(self) -> tuple[str, ...]:
        """Dimensions whose extrapolation widens the calibrated interval (C follows from N and D)."""
        return ("C", "N", "D") if set(self.variables) == {"N", "D"} else tuple(self.variables)

    def _finish(self) -> None:
        p = self._params_from_theta(self.theta_)
        self.params_ = {k: float(v) for k, v in p.items()}
        self.intervals_ = {}
        if len(self.samples_):
            ps = self._params_from_theta(self.samples_)
            for k, v in ps.items():
                lo, hi = _percentiles(v, self.confidence)
                self.intervals_[k] = (float(lo), float(hi))
        for k in getattr(self, "unidentified_", ()):
            self.intervals_[k] = (float("-inf") if k not in ("E", "A", "B") else 0.0, float("inf"))
        self.derived_, self.derived_intervals_ = self._derived()
        self.warnings_ = self._warnings()

    def _derived(self) -> tuple[dict[str, float], dict[str, tuple[float, float]]]:
        return {}, {}

    def _warnings(self) -> list[str]:
        from scalelab.fit.validate import fit_warnings

        return fit_warnings(self)

    # -- prediction
    def _log_predict_theta(self, theta: np.ndarray, X: np.ndarray) -> np.ndarray:
        return est.power_sum_log_predict(theta, np.log(X))

    def _X(self, *cols: Any) -> np.ndarray:
        arrs = np.broadcast_arrays(*(np.asarray(c, dtype=np.float64) for c in cols))
        X = np.stack([a.ravel() for a in arrs], axis=1)
        if np.any(~np.isfinite(X)) or np.any(X <= 0):
            raise FitError(f"{self.name}: inputs to predict must be positive and finite")
        return X

    def _predict_X(self, X: np.ndarray) -> np.ndarray:
        self._check_fitted()
        return np.exp(self._log_predict_theta(self.theta_, X))

    def _coords(self, X: np.ndarray) -> np.ndarray:
        """Extrapolation coordinates (x_C, x_N, x_D) of query rows X (in the law's variables)."""
        cols = dict(zip(self.variables, X.T, strict=True))
        rng = getattr(self, "range_", None) or {}
        if "N" in cols and "D" in cols and "C" not in cols:
            cols["C"] = self.accounting_.k * cols["N"] ** self.accounting_.gamma * cols["D"]
        x = np.zeros((X.shape[0], 3))
        for i, k in enumerate(("C", "N", "D")):
            if k in cols and k in rng:
                x[:, i] = np.maximum(np.log(cols[k] / rng[k][1]), 0.0)
        return x

    def _calibrated_X(self, X: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
        cal = getattr(self, "calibration_", None)
        if cal is None:
            raise FitError(
                f"{self.name}: no calibration (fitted with calibrate=False, or from an older fit.json); "
                "refit, or ask for kind='confidence' (parameter-only)"
            )
        logp = self._log_predict_theta(self.theta_, X)
        h = cal.half_width(self._coords(X), level)
        lo_b = hi_b = np.zeros_like(logp)
        if len(self.samples_):
            lo, hi = self._interval_X(X, "confidence", level)
            lo_b, hi_b = np.maximum(logp - np.log(lo), 0.0), np.maximum(np.log(hi) - logp, 0.0)
        return np.exp(logp - np.hypot(lo_b, h)), np.exp(logp + np.hypot(hi_b, h))

    def _interval_X(
        self, X: np.ndarray, kind: str = "calibrated", level: float | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        self._check_fitted()
        if kind not in INTERVAL_KINDS:
            raise FitError(f"interval kind must be one of {', '.join(INTERVAL_KINDS)}, got {kind!r}")
        level = self.confidence if level is None else level
        if kind == "calibrated":
            return self._calibrated_X(X, level)
        if not len(self.samples_):
            raise FitError(
                f"{self.name}: parameter-only intervals need a bootstrap (fit with n_bootstrap > 0)"
            )
        logp = np.stack([self._log_predict_theta(t, X) for t in self.samples_])  # (B, m)
        if kind == "prediction":
            rng = np.random.default_rng(self.seed + 1)
            res = self.residuals_ - np.mean(self.residuals_)
            logp = logp + rng.choice(res, size=logp.shape)
        lo, hi = _percentiles(logp, level)
        return np.exp(lo), np.exp(hi)

    # -- serialisation
    def to_dict(self) -> dict[str, Any]:
        """Everything fitted: parameters, intervals, derived quantities, settings, bootstrap draws."""
        self._check_fitted()
        res = self.result_
        boot = self.bootstrap_
        return _floats(
            {
                "law": self.name,
                "form": self.form,
                "variables": list(self.variables),
                "settings": {
                    **self.get_params(),
                    "loss": "Huber on log residuals",
                    "optimizer": self.optimizer,
                    "interval_method": "bootstrap percentile",
                },
                "params": self.params_,
                "intervals": {k: list(v) for k, v in self.intervals_.items()},
                "derived": self.derived_,
                "derived_intervals": {k: list(v) for k, v in self.derived_intervals_.items()},
                "theta": {"names": self._theta_names(), "values": self.theta_},
                "convergence": {
                    "converged": res.converged,
                    "message": res.message,
                    "objective": res.objective,
                    "iterations": res.n_iter,
                    "polish_starts": res.n_starts,
                    "grid_points": res.n_evals_grid,
                    "params_at_bound": self.at_bound_,
                },
                "bootstrap": {
                    "n": 0 if boot is None else boot.n,
                    "unit": None if boot is None else boot.unit,
                    "seed": self.seed,
                    "converged_fraction": None if boot is None else boot.converged_fraction,
                    "params_at_bound_fraction": self.samples_at_bound_,
                    "theta_samples": self.samples_,
                },
                "residuals": {
                    "log_residual_sd": float(np.std(self.residuals_, ddof=1)) if self.n_runs_ > 1 else None,
                    "values": self.residuals_,
                },
                "accounting": self.accounting_.to_dict(),
                "n_runs": self.n_runs_,
                "largest_run_flops": self.largest_run_flops_,
                "range": {k: list(v) for k, v in getattr(self, "range_", {}).items()},
                "unidentified": list(getattr(self, "unidentified_", ())),
                "calibration": None if self.calibration_ is None else self.calibration_.to_dict(),
                "warnings": self.warnings_,
            }
        )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> _PowerSumLaw:
        """Rebuild a fitted law from `to_dict()` output (predictions and intervals work; the table
        itself is not stored)."""
        s = d.get("settings", {})
        kw = {k: s[k] for k in ("delta", "n_bootstrap", "confidence", "seed", "calibrate") if k in s}
        law = _LAWS[d["law"]]._new_from(d, kw)
        law.theta_ = np.asarray(d["theta"]["values"], dtype=np.float64)
        samples = d.get("bootstrap", {}).get("theta_samples") or []
        law.samples_ = (
            np.asarray(samples, dtype=np.float64).reshape(len(samples), -1)
            if samples
            else np.zeros((0, len(law.theta_)))
        )
        law.residuals_ = np.asarray(d.get("residuals", {}).get("values") or [0.0], dtype=np.float64)
        law.accounting_ = Accounting.from_dict(d.get("accounting", {}))
        law.n_runs_ = int(d.get("n_runs", 0))
        law.largest_run_flops_ = float(d.get("largest_run_flops") or "nan")
        law.range_ = {k: (float(v[0]), float(v[1])) for k, v in (d.get("range") or {}).items()}
        law.unidentified_ = tuple(d.get("unidentified") or ())
        law.calibration_ = Calibration.from_dict(d["calibration"]) if d.get("calibration") else None
        law.params_ = {k: float(v) for k, v in d["params"].items()}
        law.intervals_ = {k: (_num(v[0]), _num(v[1])) for k, v in d.get("intervals", {}).items()}
        law.derived_ = dict(d.get("derived", {}))
        law.derived_intervals_ = {k: tuple(v) for k, v in d.get("derived_intervals", {}).items()}
        law.warnings_ = list(d.get("warnings", []))
        return law

    @classmethod
    def _new_from(cls, d: dict[str, Any], kw: dict[str, Any]) -> _PowerSumLaw:
        return cls(**kw)

    form: ClassVar[str] = ""
    optimizer: ClassVar[str] = (
        "variable projection on an exponent grid (IRLS for the linear coefficients) + L-BFGS-B polish "
        "of the best grid points (analytic gradient)"
    )


class _NDPredictMixin:
    """predict(N, D) / predict_interval(N, D) for laws of N and D."""

    def predict(self, N: Any, D: Any | None = None) -> np.ndarray:
        """Predicted loss at (N, D); also accepts a RunTable or an (m, 2) array as the first argument."""
        return self._predict_X(self._nd(N, D))  # type: ignore[attr-defined]

    def predict_interval(
        self, N: Any, D: Any | None = None, kind: str = "calibrated", level: float | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Interval of the loss a run at (N, D) will reach. ``kind="calibrated"`` (default): model-form
        error measured by rolling-origin backtests, widening with the extrapolation, combined with the
        bootstrap; ``"confidence"``: parameter uncertainty only (the mean law); ``"prediction"``:
        parameter uncertainty plus the residual scatter of single runs (no model-form error)."""
        return self._interval_X(self._nd(N, D), kind, level)  # type: ignore[attr-defined]

    def _nd(self, N: Any, D: Any | None) -> np.ndarray:
        if isinstance(N, RunTable):
            return self._X(N.N, N.D)  # type: ignore[attr-defined]
        if D is None:
            arr = np.asarray(N, dtype=np.float64)
            if arr.ndim != 2 or arr.shape[1] < 2:
                raise FitError("predict(N, D): give N and D, or an array with columns (N, D)")
            return self._X(arr[:, 0], arr[:, 1])  # type: ignore[attr-defined]
        return self._X(N, D)  # type: ignore[attr-defined]


class ChinchillaLaw(_NDPredictMixin, _PowerSumLaw):
    """L(N, D) = E + A/N^α + B/D^β, fitted by Huber in log space (Hoffmann et al. 2022, approach 3).

    Fitted attributes: ``params_`` {E, A, B, alpha, beta}; ``intervals_`` (bootstrap percentiles);
    ``derived_`` {a = β/(α+β), b = α/(α+β), G}; ``residuals_`` (log); ``warnings_``; ``result_``
    (convergence); ``samples_`` (bootstrap θ draws); ``accounting_`` (how C relates to N and D).
    """

    name = "chinchilla"
    form = "L(N, D) = E + A / N^alpha + B / D^beta"
    param_names = ("E", "A", "B", "alpha", "beta")
    coef_names = ("A", "B")
    exponent_names = ("alpha", "beta")
    variables = ("N", "D")

    def _derived(self) -> tuple[dict[str, float], dict[str, tuple[float, float]]]:
        def der(theta: np.ndarray) -> dict[str, np.ndarray]:
            p = self._params_from_theta(theta)
            al, be = p["alpha"], p["beta"]
            with np.errstate(all="ignore"):
                G = (al * p["A"] / (be * p["B"])) ** (1.0 / (al + be))
            return {"a": be / (al + be), "b": al / (al + be), "G": G}

        point = {k: float(v) for k, v in der(self.theta_).items()}
        iv: dict[str, tuple[float, float]] = {}
        if len(self.samples_):
            for k, v in der(self.samples_).items():
                lo, hi = _percentiles(v, self.confidence)
                iv[k] = (float(lo), float(hi))
        return point, iv

    def optimal(self, compute: float) -> dict[str, Any]:
        """Compute-optimal N, D, tokens per parameter and predicted loss for a budget of `compute`
        FLOPs, with confidence intervals from the bootstrap draws (when fitted with them)."""
        self._check_fitted()
        from scalelab.fit.optimal import check_budget

        check_budget(compute, None)
        p = self._params_from_theta(self.theta_)
        pt = optimal_allocation(p["E"], p["A"], p["B"], p["alpha"], p["beta"], compute, self.accounting_)
        ss = None
        if len(self.samples_):
            ps = self._params_from_theta(self.samples_)
            ss = optimal_allocation(
                ps["E"], ps["A"], ps["B"], ps["alpha"], ps["beta"], compute, self.accounting_
            )
        out = optimal_report(compute, self.accounting_, pt, ss, self.confidence)
        if ss is not None:
            undefined = undefined_fraction(ss["N_opt"])
            if undefined:
                out["undefined_draw_fraction"] = undefined
        X = self._X(pt["N_opt"], pt["D_opt"])
        self._calibrate_loss(out, X)
        out["extrapolation"] = self._extrapolation(float(compute), X)
        if getattr(self, "unidentified_", ()):
            for k in ("N_opt", "D_opt", "tokens_per_param", "loss"):
                out["intervals"][k] = [0.0, float("inf")]
            out["unidentified"] = list(self.unidentified_)
        return out

    def _calibrate_loss(self, out: dict[str, Any], X: np.ndarray) -> None:
        """Make the loss interval of an `optimal`-style result the calibrated one (the parameter-only
        interval stays, labelled as such) and add where the calibration came from."""
        kinds = dict.fromkeys(out["intervals"], INTERVAL_KIND_CONFIDENCE)
        if "loss" in out["intervals"]:
            out["intervals"]["loss_parameter_only"] = out["intervals"].pop("loss")
            kinds["loss_parameter_only"] = kinds.pop("loss")
        cal = getattr(self, "calibration_", None)
        if cal is not None:
            lo, hi = self._calibrated_X(X, self.confidence)
            out["intervals"]["loss"] = [float(lo[0]), float(hi[0])]
            kinds["loss"] = INTERVAL_KIND_CALIBRATED
            out["calibration"] = cal.describe(self._coords(X))
            out["interval_kind"] = INTERVAL_KIND_CALIBRATED + " for the loss; parameter-only for the rest"
        out["interval_kinds"] = kinds

    def compute_for_loss(self, target_loss: float) -> dict[str, Any]:
        """The compute (FLOPs) whose optimal allocation reaches `target_loss`, with an interval; inf
        when the target is at or below the irreducible loss E."""
        self._check_fitted()
        from scalelab.fit.optimal import check_budget

        check_budget(None, target_loss)
        p = self._params_from_theta(self.theta_)
        c = float(
            compute_for_loss(p["E"], p["A"], p["B"], p["alpha"], p["beta"], target_loss, self.accounting_)
        )
        out: dict[str, Any] = {
            "target_loss": float(target_loss),
            "compute_flops": c,
            "reachable": bool(np.isfinite(c)),
            "accounting": self.accounting_.describe(),
            "intervals": {},
            "interval_kind": INTERVAL_KIND_CONFIDENCE,
            "confidence": self.confidence,
        }
        if np.isfinite(c):
            out["at_optimum"] = {
                k: float(v)
                for k, v in optimal_allocation(
                    p["E"], p["A"], p["B"], p["alpha"], p["beta"], c, self.accounting_
                ).items()
            }
        if len(self.samples_):
            ps = self._params_from_theta(self.samples_)
            cs = compute_for_loss(
                ps["E"], ps["A"], ps["B"], ps["alpha"], ps["beta"], target_loss, self.accounting_
            )
            lo, hi = _percentiles(np.where(np.isfinite(cs), cs, np.inf), self.confidence)
            out["intervals"]["compute_flops"] = [float(lo), float(hi)]
            out["unreachable_fraction"] = float(np.mean(~np.isfinite(cs)))
        out["interval_kinds"] = dict.fromkeys(out["intervals"], INTERVAL_KIND_CONFIDENCE)
        if np.isfinite(c) and getattr(self, "calibration_", None) is not None:
            self._calibrate_compute(out, p, c, float(target_loss))
        if not np.isfinite(c):
            out["warnings"] = [
                f"target loss {target_loss:g} is at or below the fitted irreducible loss E = "
                f"{p['E']:.4g}: no compute budget reaches it under this law"
            ]
        return out

    def _calibrate_compute(self, out: dict[str, Any], p: dict[str, Any], c: float, target: float) -> None:
        """Calibrated interval of the compute that reaches `target`: where the lower and the upper edge
        of the calibrated loss band at the optimal allocation cross the target (scanned in log C)."""
        grid = c * np.geomspace(1e-4, 1e6, 1001)
        alloc = optimal_allocation(p["E"], p["A"], p["B"], p["alpha"], p["beta"], grid, self.accounting_)
        X = np.stack([alloc["N_opt"], alloc["D_opt"]], axis=1)
        lo, hi = self._calibrated_X(X, self.confidence)

        def first_below(edge: np.ndarray) -> float:
            idx = np.flatnonzero(edge <= target)
            return float(grid[idx[0]]) if idx.size else float("inf")

        if "compute_flops" in out["intervals"]:
            out["intervals"]["compute_flops_parameter_only"] = out["intervals"].pop("compute_flops")
            out["interval_kinds"]["compute_flops_parameter_only"] = out["interval_kinds"].pop("compute_flops")
        out["intervals"]["compute_flops"] = [first_below(lo), first_below(hi)]
        out["interval_kinds"]["compute_flops"] = INTERVAL_KIND_CALIBRATED
        out["interval_kind"] = INTERVAL_KIND_CALIBRATED
        Xc = self._X(*(np.interp(np.log(c), np.log(grid), X[:, i]) for i in range(2)))
        out["calibration"] = self._calibration_describe(Xc)
        out["extrapolation"] = self._extrapolation(c, Xc)

    def _calibration_describe(self, X: np.ndarray) -> dict[str, Any]:
        return self.calibration_.describe(self._coords(X))

    def _extrapolation(self, compute: float, X: np.ndarray | None = None) -> dict[str, Any]:
        """How far a point lies beyond the runs: in compute (``factor``) and, given its (N, D), in N
        and D; ``far`` when C > 100x or N or D > 10x beyond the largest run."""
        cmax = float(getattr(self, "largest_run_flops_", float("nan")))
        factor = compute / cmax if np.isfinite(cmax) else float("nan")
        out: dict[str, Any] = {"largest_run_flops": cmax, "factor": factor, "far": bool(factor > FAR_C)}
        rng = getattr(self, "range_", None)
        if X is not None and rng:
            for i, k in enumerate(("N", "D")):
                f = float(X[0, i] / rng[k][1])
                out[f"factor_{k}"] = f
                out["far"] = bool(out["far"] or f > FAR_ND)
        return out


class PowerLaw(_PowerSumLaw):
    """L(x) = E + A/x^α for one variable x ∈ {"C", "N", "D"} (default C)."""

    name = "power"
    param_names = ("E", "A", "alpha")
    coef_names = ("A",)
    exponent_names = ("alpha",)

    def __init__(self, variable: str = "C", **kw: Any) -> None:
        if variable not in ("C", "N", "D"):
            raise FitError(f"PowerLaw variable must be 'C', 'N' or 'D', got {variable!r}")
        super().__init__(**kw)
        self.variable = variable
        self.variables = (variable,)

    @property
    def form(self) -> str:  # type: ignore[override]
        return f"L({self.variable}) = E + A / {self.variable}^alpha"

    def get_params(self) -> dict[str, Any]:
        return {"variable": self.variable, **super().get_params()}

    @classmethod
    def _new_from(cls, d: dict[str, Any], kw: dict[str, Any]) -> PowerLaw:
        return cls(variable=d.get("variables", ["C"])[0], **kw)

    def predict(self, x: Any) -> np.ndarray:
        """Predicted loss at x (in the unit of the fitted variable), or for a RunTable's rows."""
        return self._predict_X(self._x(x))

    def predict_interval(
        self, x: Any, kind: str = "calibrated", level: float | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Interval of the loss at x (kinds as for `ChinchillaLaw.predict_interval`)."""
        return self._interval_X(self._x(x), kind, level)

    def compute_for_loss(self, target_loss: float) -> dict[str, Any]:
        """For L(C): the compute C = (A/(target − E))^{1/α} reaching `target_loss` (inf if target ≤ E)."""
        self._check_fitted()
        from scalelab.fit.optimal import check_budget

        check_budget(None, target_loss)
        if self.variable != "C":
            raise FitError(f"a power law in {self.variable} cannot give a compute; fit power:C")

        return compute_for_loss_report(
            self.theta_,
            self.samples_,
            0,
            target_loss,
            self.confidence,
            "L(C) fitted directly to the runs' compute",
        )

    def _x(self, x: Any) -> np.ndarray:
        if isinstance(x, RunTable):
            return self._X(self._features(x)[:, 0])
        return self._X(x)


def optimal_report(
    compute: float,
    accounting: Accounting,
    point: dict[str, Any],
    draws: dict[str, np.ndarray] | None,
    confidence: float,
) -> dict[str, Any]:
    """The result dict of a law's `optimal(compute)`: the point estimates (N_opt, D_opt, …) and, from
    bootstrap `draws` of the same quantities, their percentile confidence intervals."""
    out: dict[str, Any] = {
        "compute_flops": float(compute),
        "accounting": accounting.describe(),
        **{k: float(v) for k, v in point.items()},
        "intervals": {},
        "interval_kind": INTERVAL_KIND_CONFIDENCE,
        "confidence": confidence,
    }
    for k, v in (draws or {}).items():
        lo, hi = _percentiles(v, confidence)
        out["intervals"][k] = [float(lo), float(hi)]
    return out


def compute_for_loss_report(
    theta: np.ndarray,
    samples: np.ndarray,
    offset: int,
    target_loss: float,
    confidence: float,
    accounting: str,
) -> dict[str, Any]:
    """Invert L(C) = E + A/C^α for `target_loss` (inf where target ≤ E), with a bootstrap interval.

    (log E, log A, α) sit at columns `offset`, `offset+1`, `offset+2` of `theta` and of each sample row.
    """

    def inv(t: np.ndarray) -> np.ndarray:
        E, A, al = np.exp(t[..., offset]), np.exp(t[..., offset + 1]), t[..., offset + 2]
        with np.errstate(all="ignore"):
            c = (A / (target_loss - E)) ** (1 / al)
        return np.where(target_loss > E, c, np.inf)

    c = float(inv(theta))
    out: dict[str, Any] = {
        "target_loss": float(target_loss),
        "compute_flops": c,
        "reachable": bool(np.isfinite(c)),
        "accounting": accounting,
        "intervals": {},
        "interval_kind": INTERVAL_KIND_CONFIDENCE,
        "confidence": confidence,
    }
    if len(samples):
        lo, hi = _percentiles(inv(samples), confidence)
        out["intervals"]["compute_flops"] = [float(lo), float(hi)]
    return out


def _kaplan_log_predict(theta: np.ndarray, logX: np.ndarray) -> np.ndarray:
    """log L = α_D · log((N_c/N)^{α_N/α_D} + D_c/D), θ = (log N_c, log D_c, α_N, α_D), logX = (log N, log D)."""
    t1 = (theta[2] / theta[3]) * (theta[0] - logX[:, 0])
    t2 = theta[1] - logX[:, 1]
    m = np.maximum(t1, t2)
    return theta[3] * (m + np.log(np.exp(t1 - m) + np.exp(t2 - m)))


class KaplanLaw(_NDPredictMixin, _PowerSumLaw):
    """L(N, D) = [(N_c/N)^{α_N/α_D} + D_c/D]^{α_D} (Kaplan et al. 2020, eq. 1.5); no irreducible term.

    Fitted by Huber in log space with L-BFGS-B (finite-difference gradient) from the best of a
    625-point grid of starts, features centred in log space (unit invariant)."""

    name = "kaplan"
    form = "L(N, D) = ((N_c / N)^(alpha_N / alpha_D) + D_c / D)^alpha_D"
    param_names = ("N_c", "D_c", "alpha_N", "alpha_D")
    variables = ("N", "D")
    optimizer = "L-BFGS-B (finite-difference gradient) from the 6 best of a 625-point start grid"

    def _theta_names(self) -> list[str]:
        return ["log_N_c", "log_D_c", "alpha_N", "alpha_D"]

    def _make_problem(self, table: RunTable, w: np.ndarray) -> est.GenericProblem:
        logX = np.log(self._features(table))
        ref = logX.mean(axis=0)
        grid = np.array(
            [
                (lnc, ldc, an, ad)
                for lnc in (0.0, 5.0, 10.0, 20.0, 30.0)
                for ldc in (0.0, 5.0, 10.0, 20.0, 30.0)
                for an in (0.05, 0.1, 0.2, 0.4, 0.7)
                for ad in (0.05, 0.1, 0.2, 0.4, 0.7)
            ]
        )
        return est.GenericProblem(
            log_predict=_kaplan_log_predict,
            X=logX - ref,
            logy=np.log(table.loss),
            weights=w,
            starts=grid,
            bound_list=[(-20.0, 80.0), (-20.0, 80.0), (1e-3, 3.0), (1e-3, 3.0)],
            delta=self.delta,
            offset=np.array([ref[0], ref[1], 0.0, 0.0]),
        )

    def _log_predict_theta(self, theta: np.ndarray, X: np.ndarray) -> np.ndarray:
        return _kaplan_log_predict(theta, np.log(X))

    @classmethod
    def _params_from_theta(cls, theta: np.ndarray) -> dict[str, np.ndarray]:
        return {
            "N_c": np.exp(theta[..., 0]),
            "D_c": np.exp(theta[..., 1]),
            "alpha_N": theta[..., 2],
            "alpha_D": theta[..., 3],
        }


_LAWS: dict[str, type[_PowerSumLaw]] = {"chinchilla": ChinchillaLaw, "power": PowerLaw, "kaplan": KaplanLaw}


def law_from_dict(d: dict[str, Any]) -> Any:
    """Rebuild any fitted law from its `to_dict()`."""
    name = d.get("law")
    if name in _LAWS:
        return _LAWS[name].from_dict(d)
    extra = _extra_laws()
    if name in extra:
        return extra[name].from_dict(d)  # type: ignore[attr-defined]
    raise FitError(f"unknown or non-rebuildable law {name!r} in fit JSON")


def make_law(name: str, **kw: Any) -> ScalingLaw:
    """A law estimator by name: chinchilla, kaplan, power (power:N / power:D / power:C), isoflop."""
    base, _, var = name.partition(":")
    if base == "power":
        return PowerLaw(variable=var or "C", **kw)
    if base in _LAWS:
        return _LAWS[base](**kw)
    extra = _extra_laws()
    if base in extra:
        return extra[base](**kw)
    raise FitError(f"unknown law {name!r}: use chinchilla, kaplan, power[:C|N|D] or isoflop")


def _extra_laws() -> dict[str, type[ScalingLaw]]:
    from scalelab.fit.isoflop import IsoFLOPLaw

    return {"isoflop": IsoFLOPLaw}


__all__: Sequence[str] = (
    "ScalingLaw",
    "ChinchillaLaw",
    "PowerLaw",
    "KaplanLaw",
    "make_law",
    "law_from_dict",
    "INTERVAL_KIND_CONFIDENCE",
    "INTERVAL_KIND_PREDICTION",
)
