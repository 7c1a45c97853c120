"""The IsoFLOP approach (Hoffmann et al. 2022, approach 2) as an estimator.

Runs are grouped into compute budgets (runs whose C agree within ``budget_tolerance``, relative). In each
budget with at least three distinct model sizes, a parabola of loss in log N is fitted by least
squares; its vertex is that budget's N*, with D* = C/(k·N*^γ) from the table's FLOP accounting (6ND
when the table had no C) and L* the parabola's minimum. Then

    log N_opt = log G + a · log C,   log D_opt = log H + b · log C      (least squares over budgets)

and, with at least four budgets, L*(C) = E + A / C^α (Huber in log space) gives the loss at the optimum.
Budgets whose parabola opens downward or whose vertex lies outside the sizes tried are left out of the
fit and named in ``warnings_``. The bootstrap resamples runs (or configs with seeds) and refits all of it.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from scalelab.errors import FitError
from scalelab.fit import estimate as est
from scalelab.fit._blas import one_blas_thread
from scalelab.fit.laws import (
    ScalingLaw,
    _floats,
    _percentiles,
    compute_for_loss_report,
    optimal_report,
)
from scalelab.fit.optimal import Accounting, check_budget
from scalelab.fit.table import RunTable

log = logging.getLogger(__name__)


def group_budgets(C: np.ndarray, tolerance: float) -> np.ndarray:
    """Budget label per run: runs sorted by C start a new budget when C grows by more than `tolerance`."""
    order = np.argsort(C)
    labels = np.empty(C.size, dtype=np.int64)
    current, start_c = 0, C[order[0]]
    for i in order:
        if C[i] > start_c * (1 + tolerance):
            current += 1
            start_c = C[i]
        labels[i] = current
    return labels


def _budget_minima(
    logN: np.ndarray,
    loss: np.ndarray,
    logC: np.ndarray,
    budgets: np.ndarray,
    w: np.ndarray,
    acc: Accounting,
) -> tuple[np.ndarray, list[str]]:
    """Per budget: (log C, log N*, log D*, L*) rows for usable budgets, and notes for skipped ones."""
    rows, notes = [], []
    for b in np.unique(budgets):
        sel = (budgets == b) & (w > 0)
        if np.unique(logN[sel]).size < 3:
            notes.append(
                f"budget {np.exp(logC[budgets == b].mean()):.3g} FLOPs: fewer than 3 model sizes, skipped"
            )
            continue
        x, y, ww = logN[sel], loss[sel], w[sel]
        c2, c1, c0 = np.polyfit(x, y, 2, w=np.sqrt(ww))
        lc = float(np.average(logC[sel], weights=ww))
        if c2 <= 0:
            notes.append(f"budget {np.exp(lc):.3g} FLOPs: loss is not convex in log N, skipped")
            continue
        xs = -c1 / (2 * c2)
        if xs < x.min() or xs > x.max():
            notes.append(
                f"budget {np.exp(lc):.3g} FLOPs: the minimum lies outside the sizes tried "
                f"(N* = {np.exp(xs):.3g}), skipped; extend the sizes"
            )
            continue
        ls = c0 + c1 * xs + c2 * xs * xs
        ld = lc - np.log(acc.k) - acc.gamma * xs
        rows.append((lc, xs, ld, ls))
    return np.array(rows, dtype=np.float64).reshape(-1, 4), notes


class IsoFLOPLaw(ScalingLaw):
    """N_opt = G·C^a and D_opt = H·C^b from per-budget parabola minima (Hoffmann et al. approach 2).

    Fitted attributes: ``params_`` {G, a, H, b} (+ {E, A, alpha} of L*(C) = E + A/C^α when ≥ 4 budgets),
    ``intervals_``, ``minima_`` (per budget: C, N*, D*, L*), ``warnings_``, ``accounting_``.
    """

    name = "isoflop"
    form = "N_opt = G * C^a, D_opt = H * C^b (vertices of per-budget parabolas in log N)"
    param_names = ("G", "a", "H", "b")
    variables = ("C",)

    def __init__(self, *, budget_tolerance: float = 0.05, **kw: Any) -> None:
        if not (0 <= budget_tolerance < 1):
            raise FitError(f"budget_tolerance must be in [0, 1), got {budget_tolerance!r}")
        super().__init__(**kw)
        self.budget_tolerance = float(budget_tolerance)

    def get_params(self) -> dict[str, Any]:
        return {"budget_tolerance": self.budget_tolerance, **super().get_params()}

    def _fit_once(
        self,
        table: RunTable,
        budgets: np.ndarray,
        w: np.ndarray,
        loss_law: bool,
        warm: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray, list[str]]:
        minima, notes = _budget_minima(
            np.log(table.N), table.loss, np.log(table.C), budgets, w, self.accounting_
        )
        if minima.shape[0] < 2:
            raise FitError(
                f"isoflop fit on {table.source}: {minima.shape[0]} usable compute budgets; need at least 2 "
                "(each with >= 3 model sizes bracketing the minimum)"
            )
        a, logG = np.polyfit(minima[:, 0], minima[:, 1], 1)
        b, logH = np.polyfit(minima[:, 0], minima[:, 2], 1)
        theta = [logG, a, logH, b]
        if loss_law:
            if minima.shape[0] >= 4:
                p = est.PowerSumProblem.from_features(np.exp(minima[:, 0]), minima[:, 3], None, self.delta)
                r = p.search() if warm is None else p.polish(p.from_natural(warm))
                theta += list(p.to_natural(r.theta))
            else:
                theta += [np.nan, np.nan, np.nan]
        return np.array(theta), minima, notes

    def fit(self, X: Any, y: Any = None, *, weights: Any = None) -> IsoFLOPLaw:
        table = self._as_table(X, y, weights)
        self.table_ = table
        self.n_runs_ = len(table)
        self.largest_run_flops_ = float(table.C.max())
        self.accounting_ = Accounting.from_runs(table.N, table.D, table.C, table.compute_source)
        budgets = group_budgets(table.C, self.budget_tolerance)
        self.budgets_ = budgets
        w = table.weight if table.weight is not None else np.ones(len(table))
        with one_blas_thread():
            theta, minima, notes = self._fit_once(table, budgets, w, True)
        self.has_loss_law_ = bool(np.isfinite(theta[4]))
        self.theta_ = theta
        self.minima_ = minima
        samples = []
        if self.n_bootstrap:
            counts = est.resample_counts(table.clusters(), self.n_bootstrap, self.seed)
            failed = 0
            with one_blas_thread():
                for c in counts:
                    try:
                        warm = self.theta_[4:] if self.has_loss_law_ else None
                        t, _, _ = self._fit_once(table, budgets, w * c, self.has_loss_law_, warm)
                    except FitError:
                        failed += 1
                        continue
                    if not self.has_loss_law_:
                        t = np.concatenate([t, [np.nan] * 3])
                    samples.append(t)
            self.bootstrap_failed_ = failed
        else:
            self.bootstrap_failed_ = 0
        self.samples_ = np.array(samples).reshape(len(samples), 7) if samples else np.zeros((0, 7))
        self.params_ = {k: float(v) for k, v in self._params(self.theta_).items()}
        self.intervals_ = {}
        if len(self.samples_):
            for k, v in self._params(self.samples_).items():
                lo, hi = _percentiles(v, self.confidence)
                self.intervals_[k] = (float(lo), float(hi))
        self.warnings_ = list(notes)
        if minima.shape[0] < 3:
            self.warnings_.append(f"only {minima.shape[0]} usable budgets: the exponents rest on 2 points")
        if self.bootstrap_failed_:
            self.warnings_.append(f"{self.bootstrap_failed_} bootstrap resamples had too few usable budgets")
        self.warnings_ += list(table.notes)
        return self

    def _params(self, theta: np.ndarray) -> dict[str, np.ndarray]:
        out = {"G": np.exp(theta[..., 0]), "a": theta[..., 1], "H": np.exp(theta[..., 2]), "b": theta[..., 3]}
        if getattr(self, "has_loss_law_", False):
            out.update({"E": np.exp(theta[..., 4]), "A": np.exp(theta[..., 5]), "alpha": theta[..., 6]})
        return out

    def _check_fitted(self) -> None:
        if not hasattr(self, "theta_"):
            raise FitError("IsoFLOPLaw is not fitted yet: call fit(table) first")

    def _optimal_arrays(self, theta: np.ndarray, compute: float) -> dict[str, np.ndarray]:
        lc = np.log(compute)
        N = np.exp(theta[..., 0] + theta[..., 1] * lc)
        D = np.exp(theta[..., 2] + theta[..., 3] * lc)
        out = {"N_opt": N, "D_opt": D, "tokens_per_param": D / N}
        if self.has_loss_law_:
            out["loss"] = np.exp(theta[..., 4]) + np.exp(theta[..., 5]) * compute ** (-theta[..., 6])
        return out

    def predict(self, compute: Any) -> np.ndarray:
        """Loss at the compute-optimal allocation for each budget (needs ≥ 4 budgets)."""
        self._check_fitted()
        if not self.has_loss_law_:
            raise FitError("isoflop: L*(C) needs at least 4 usable budgets; predict is unavailable")
        c = np.asarray(compute, dtype=np.float64)
        t = self.theta_
        return np.exp(t[4]) + np.exp(t[5]) * c ** (-t[6])

    def optimal(self, compute: float) -> dict[str, Any]:
        """N_opt, D_opt, tokens/param (and the loss there, with ≥ 4 budgets) for `compute` FLOPs."""
        self._check_fitted()
        check_budget(compute, None)
        pt = self._optimal_arrays(self.theta_, compute)
        draws = self._optimal_arrays(self.samples_, compute) if len(self.samples_) else None
        out = optimal_report(compute, self.accounting_, pt, draws, self.confidence)
        f = compute / self.largest_run_flops_
        out["extrapolation"] = {
            "largest_run_flops": self.largest_run_flops_,
            "factor": f,
            "far": bool(f > 100),
        }
        return out

    def compute_for_loss(self, target_loss: float) -> dict[str, Any]:
        """Compute whose optimal loss L*(C) = E + A/C^α equals `target_loss` (inf if target ≤ E)."""
        self._check_fitted()
        check_budget(None, target_loss)
        if not self.has_loss_law_:
            raise FitError("isoflop: the inverse needs L*(C), i.e. at least 4 usable budgets")

        return compute_for_loss_report(
            self.theta_, self.samples_, 4, target_loss, self.confidence, self.accounting_.describe()
        )

    def to_dict(self) -> dict[str, Any]:
        self._check_fitted()
        return _floats(
            {
                "law": self.name,
                "form": self.form,
                "variables": list(self.variables),
                "settings": {**self.get_params(), "interval_method": "bootstrap percentile"},
                "params": self.params_,
                "intervals": {k: list(v) for k, v in self.intervals_.items()},
                "derived": {},
                "derived_intervals": {},
                "theta": {
                    "names": ["log_G", "a", "log_H", "b", "log_E", "log_A", "alpha"],
                    "values": self.theta_,
                },
                "minima": [
                    {
                        "C": float(np.exp(m[0])),
                        "N_opt": float(np.exp(m[1])),
                        "D_opt": float(np.exp(m[2])),
                        "loss": float(m[3]),
                    }
                    for m in self.minima_
                ],
                "convergence": {"converged": True, "message": "closed-form least squares", "objective": None},
                "bootstrap": {
                    "n": int(len(self.samples_)),
                    "unit": "run" if self.table_.seed is None else "config (all seeds of one N, D, group)",
                    "seed": self.seed,
                    "failed": self.bootstrap_failed_,
                    "theta_samples": self.samples_,
                },
                "accounting": self.accounting_.to_dict(),
                "n_runs": self.n_runs_,
                "largest_run_flops": self.largest_run_flops_,
                "warnings": self.warnings_,
            }
        )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> IsoFLOPLaw:
        s = d.get("settings", {})
        kw = {k: s[k] for k in ("delta", "n_bootstrap", "confidence", "seed", "budget_tolerance") if k in s}
        law = cls(**kw)
        law.theta_ = np.array([np.nan if v is None else float(v) for v in d["theta"]["values"]])
        law.has_loss_law_ = bool(np.isfinite(law.theta_[4]))
        raw = d.get("bootstrap", {}).get("theta_samples") or []
        law.samples_ = (
            np.array([[np.nan if v is None else float(v) for v in row] for row in raw])
            if raw
            else np.zeros((0, 7))
        )
        law.params_ = {k: float(v) for k, v in d["params"].items()}
        law.intervals_ = {k: (float(v[0]), float(v[1])) for k, v in d.get("intervals", {}).items()}
        law.accounting_ = Accounting.from_dict(d.get("accounting", {}))
        law.n_runs_ = int(d.get("n_runs", 0))
        law.largest_run_flops_ = float(d.get("largest_run_flops") or "nan")
        law.warnings_ = list(d.get("warnings", []))
        law.minima_ = np.array(
            [[np.log(m["C"]), np.log(m["N_opt"]), np.log(m["D_opt"]), m["loss"]] for m in d.get("minima", [])]
        )
        return law
