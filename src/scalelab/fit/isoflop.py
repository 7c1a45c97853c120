"""The IsoFLOP approach (Hoffmann et al. 2022, approach 2) as an estimator.

Runs are grouped into compute budgets (runs whose C agree within ``budget_tolerance``, relative). In each
budget with at least three distinct model sizes, a parabola of loss in log N is fitted by least
squares; its vertex is that budget's N*, with D* = C/(k·N*^γ) from the table's FLOP accounting (6ND
when the table had no C) and L* the parabola's minimum. Then

    log N_opt = log G + a · log C,   log D_opt = log H + b · log C      (least squares over budgets)

and, with at least four budgets, L*(C) = E + A / C^α (Huber in log space) gives the loss at the optimum.
Budgets whose parabola opens downward or whose vertex lies outside the sizes tried are left out of the
fit and named in ``warnings_``.

Intervals come from a vectorised bootstrap that keeps both sources of error: each budget's parabola is
refitted to its fitted curve plus Gaussian noise of the pooled parabola residual sd (the vertex moves
as much as the data allow), and the budgets are resampled with replacement (the scatter of the
vertices around the N_opt(C) line). L*(C) is refitted per draw by least squares in relative error over
an exponent grid. All draws are solved at once with array algebra, so 1,000 draws cost about as much
as one parametric fit. The N_opt, D_opt intervals of `optimal` add the vertices' scatter around the
line, so they hold the optimum a budget would show, not only the mean line.
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
from scalelab.units import factor

log = logging.getLogger(__name__)

#: loss noise (relative) assumed for the parabolas when no budget has more than 3 sizes
PARABOLA_NOISE_FALLBACK = 0.01
#: exponent grid of the vectorised L*(C) refits
ALPHA_GRID = np.linspace(0.005, 1.5, 300)


def _loss_law_draws(logc: np.ndarray, L: np.ndarray, w: np.ndarray) -> np.ndarray:
    """(log E, log A, α) per draw: L = E + A·C^-α by weighted least squares in relative error over
    `ALPHA_GRID` (E, A ≥ 0), all draws at once. logc, L, w have shape (draws, budgets)."""
    c = logc - np.nanmean(logc[0])  # centred: A is in units of the mean budget
    u = np.exp(-ALPHA_GRID[None, :, None] * c[:, None, :])  # (B, G, M)
    ww = (w / np.maximum(L, 1e-12) ** 2)[:, None, :]
    s1, su, suu = ww.sum(-1), (ww * u).sum(-1), (ww * u * u).sum(-1)
    sy, suy = (ww * L[:, None, :]).sum(-1), (ww * u * L[:, None, :]).sum(-1)
    det = s1 * suu - su * su
    with np.errstate(all="ignore"):
        E = (suu * sy - su * suy) / det
        A = (s1 * suy - su * sy) / det
        A0 = suy / suu  # E clamped at 0
        E = np.where(E >= 0, E, 0.0)
        A = np.where(E > 0, A, A0)
        A = np.maximum(A, 1e-300)
        pred = E[..., None] + A[..., None] * u
        obj = (ww * (pred - L[:, None, :]) ** 2).sum(-1)
    best = np.nanargmin(np.where(np.isfinite(obj), obj, np.inf), axis=1)
    idx = np.arange(L.shape[0])
    alpha = ALPHA_GRID[best]
    logE = np.log(np.maximum(E[idx, best], 1e-300))
    logA = np.log(A[idx, best]) + alpha * np.nanmean(logc[0])  # back to natural units of C
    return np.stack([logE, logA, alpha], axis=1)


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
        boot_notes: list[str] = []
        if self.n_bootstrap:
            self.samples_, self.bootstrap_failed_, boot_notes = self._bootstrap(table, budgets, w, minima)
        else:
            self.samples_, self.bootstrap_failed_ = np.zeros((0, 7)), 0
        resid = minima[:, 1] - (theta[0] + theta[1] * minima[:, 0])
        self.vertex_scatter_ = (
            float(np.sqrt(resid @ resid / (minima.shape[0] - 2))) if minima.shape[0] > 2 else 0.0
        )
        self.params_ = {k: float(v) for k, v in self._params(self.theta_).items()}
        self.intervals_ = {}
        if len(self.samples_):
            for k, v in self._params(self.samples_).items():
                lo, hi = _percentiles(v, self.confidence)
                self.intervals_[k] = (float(lo), float(hi))
        self.warnings_ = list(notes) + boot_notes
        if minima.shape[0] < 3:
            self.warnings_.append(
                f"only {minima.shape[0]} usable budgets: the exponents rest on 2 points; add a third compute "
                "budget (an IsoFLOP curve of 5+ sizes)"
            )
        self.warnings_ += self._identifiability_warnings(table)
        if self.bootstrap_failed_ > 0.05 * max(self.n_bootstrap, 1):
            self.warnings_.append(
                f"{self.bootstrap_failed_} of {self.n_bootstrap} bootstrap draws had too few usable budgets: "
                "add sizes on each side of every budget's minimum"
            )
        self.warnings_ += list(table.notes)
        return self

    def _bootstrap(
        self, table: RunTable, budgets: np.ndarray, w: np.ndarray, minima: np.ndarray
    ) -> tuple[np.ndarray, int, list[str]]:
        """Vectorised draws of θ = (log G, a, log H, b, log E, log A, α): parabola noise + budgets
        resampled (see the module docstring). Returns (draws, failed draws, notes)."""
        rng = np.random.default_rng(self.seed)
        B = self.n_bootstrap
        logN, logC = np.log(table.N), np.log(table.C)
        fits, rss, dof = [], 0.0, 0
        for b in np.unique(budgets):
            sel = (budgets == b) & (w > 0)
            x = logN[sel]
            if np.unique(x).size < 3:
                continue
            X = np.stack([x * x, x, np.ones_like(x)], axis=1) * np.sqrt(w[sel])[:, None]
            y = table.loss[sel] * np.sqrt(w[sel])
            coef, *_ = np.linalg.lstsq(X, y, rcond=None)
            r = y - X @ coef
            rss += float(r @ r)
            dof += x.size - 3
            fits.append(
                (
                    X @ coef,
                    np.linalg.pinv(X),
                    x.min(),
                    x.max(),
                    float(np.average(logC[sel], weights=w[sel])),
                )
            )
        notes = []
        if dof > 0:
            sigma = np.sqrt(rss / dof)
        else:
            sigma = PARABOLA_NOISE_FALLBACK * float(np.median(table.loss))
            notes.append(
                f"every budget has exactly 3 sizes: the parabolas' error cannot be measured, so the intervals "
                f"assume {100 * PARABOLA_NOISE_FALLBACK:.0f} % loss noise; train 5 or more sizes per budget"
            )
        M = len(fits)
        vert = np.full((B, M, 4), np.nan)  # (log C, log N*, log D*, L*) per draw and budget
        for j, (yhat, pinv, lo, hi, lc) in enumerate(fits):
            Y = yhat[:, None] + sigma * rng.standard_normal((yhat.size, B))
            c2, c1, c0 = pinv @ Y
            with np.errstate(all="ignore"):
                xs = -c1 / (2 * c2)
                ok = (c2 > 0) & (xs >= lo) & (xs <= hi)
            vert[:, j, 0] = lc
            vert[:, j, 1] = np.where(ok, xs, np.nan)
            vert[:, j, 2] = np.where(
                ok, lc - np.log(self.accounting_.k) - self.accounting_.gamma * xs, np.nan
            )
            vert[:, j, 3] = np.where(ok, c0 + c1 * xs + c2 * xs * xs, np.nan)
        counts = rng.multinomial(M, np.full(M, 1.0 / M), size=B).astype(np.float64)  # budgets resampled
        wt = np.where(np.isnan(vert[:, :, 1]), 0.0, counts)
        usable = (wt > 0).sum(axis=1) >= 2
        out = np.full((B, 7), np.nan)
        lc = vert[:, :, 0]
        for col in (0, 1):  # log N* and log D* against log C
            yv = np.nan_to_num(vert[:, :, 1 + col])
            sw = wt.sum(axis=1)
            with np.errstate(all="ignore"):
                mx = (wt * lc).sum(axis=1) / sw
                my = (wt * yv).sum(axis=1) / sw
                slope = (wt * (lc - mx[:, None]) * (yv - my[:, None])).sum(axis=1) / (
                    wt * (lc - mx[:, None]) ** 2
                ).sum(axis=1)
            out[:, 2 * col] = my - slope * mx
            out[:, 2 * col + 1] = slope
        usable &= np.all(np.isfinite(out[:, :4]), axis=1)
        if self.has_loss_law_:
            out[:, 4:] = _loss_law_draws(lc, np.nan_to_num(vert[:, :, 3], nan=1.0), wt)
            usable &= (wt > 0).sum(axis=1) >= 3
        return out[usable], int(B - usable.sum()), notes

    def _identifiability_warnings(self, table: RunTable) -> list[str]:
        """The parametric law's honesty for L*(C) = E + A/C^α: too few minima for three parameters, E
        collapsing or spanning orders of magnitude."""
        out: list[str] = []
        if not self.has_loss_law_:
            return out
        m = self.minima_.shape[0]
        if m < 6:
            out.append(
                f"L*(C) = E + A/C^alpha rests on {m} budget minima for 3 parameters: E, A and alpha are "
                "weakly identified; predicted losses beyond the budgets are fragile (add budgets, or use "
                "--law chinchilla on the same runs)"
            )
        E = float(np.exp(self.theta_[4]))
        if E < 0.05 * float(self.minima_[:, 3].min()):
            out.append(
                f"E of L*(C) collapses towards 0 (E = {E:.3g}): no loss floor is visible in the minima; add larger "
                "budgets, or read losses far beyond the budgets as unbounded below"
            )
        iv = self.intervals_.get("E")
        if iv and iv[0] > 0 and iv[1] / iv[0] > 20:
            out.append(
                f"E of L*(C) is poorly identified: its interval spans a factor {factor(iv[1] / iv[0])} "
                f"([{iv[0]:.3g}, {iv[1]:.3g}]); read the predicted loss as a rough guide, and add larger budgets to "
                "pin it"
            )
        return out

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
        draws = None
        if len(self.samples_):
            draws = self._optimal_arrays(self.samples_, compute)
            # a budget's own optimum scatters around the line: add the vertices' scatter to N and D
            e = np.random.default_rng(self.seed + 1).standard_normal(len(self.samples_))
            e *= getattr(self, "vertex_scatter_", 0.0)
            draws["N_opt"] = draws["N_opt"] * np.exp(e)
            draws["D_opt"] = draws["D_opt"] * np.exp(-self.accounting_.gamma * e)
            draws["tokens_per_param"] = draws["D_opt"] / draws["N_opt"]
        out = optimal_report(compute, self.accounting_, pt, draws, self.confidence)
        out["interval_kinds"] = {
            k: "bootstrap: parabola error + budgets resampled + the vertices' scatter around the line"
            for k in out["intervals"]
        }
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
                "settings": {
                    **self.get_params(),
                    "interval_method": "vectorised bootstrap: parabola noise + budgets resampled (percentiles)",
                },
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
                "vertex_scatter_log": getattr(self, "vertex_scatter_", 0.0),
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
        law.vertex_scatter_ = float(d.get("vertex_scatter_log") or 0.0)
        law.warnings_ = list(d.get("warnings", []))
        law.minima_ = np.array(
            [[np.log(m["C"]), np.log(m["N_opt"]), np.log(m["D_opt"]), m["loss"]] for m in d.get("minima", [])]
        )
        return law
