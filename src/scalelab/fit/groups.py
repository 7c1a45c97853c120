"""Joint fits over a `group` column (datasets, recipes): shared or separate exponents, compared by AIC/BIC.

* shared: L_g(N, D) = E_g + A_g/N^α + B_g/D^β — one (α, β) for all groups, (E, A, B) per group
  (3G + 2 parameters). Fitted by Huber in log space: variable projection for each group's linear part
  on a common exponent grid (the objectives add up), then L-BFGS-B on all parameters with the analytic
  gradient.
* separate: an independent `ChinchillaLaw` per group (5G parameters).

`compare_groups` fits both and reports AIC/BIC (Gaussian log-residual likelihood, as in
`scalelab.fit.validate.information_criteria`) with the preferred model, bootstrap intervals of every
group's exponents (separate fits, runs resampled within each group), intervals of each group's
difference in α and β from the first group, and a verdict: the law transfers across the groups when
shared exponents are preferred and no difference interval excludes 0.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.optimize import minimize

from scalelab.errors import FitError
from scalelab.fit import estimate as est
from scalelab.fit._blas import one_blas_thread
from scalelab.fit.laws import ChinchillaLaw, ScalingLaw, _floats
from scalelab.fit.table import RunTable
from scalelab.fit.validate import information_criteria


class GroupedChinchillaLaw(ScalingLaw):
    """Chinchilla law per group with shared exponents (``shared_exponents=True``) or separate fits.

    Fitted attributes: ``groups_`` (names), ``params_`` {group: {E, A, B, alpha, beta}},
    ``residuals_`` (log, table order), ``n_params_``, ``criteria_`` (AIC/BIC), ``result_``."""

    name = "chinchilla-grouped"
    param_names = ("E", "A", "B", "alpha", "beta")

    def __init__(self, shared_exponents: bool = True, **kw: Any) -> None:
        super().__init__(**kw)
        self.shared_exponents = bool(shared_exponents)

    def get_params(self) -> dict[str, Any]:
        return {"shared_exponents": self.shared_exponents, **super().get_params()}

    def fit(self, X: Any, y: Any = None, *, weights: Any = None) -> GroupedChinchillaLaw:
        table = self._as_table(X, y, weights)
        if table.group is None:
            raise FitError(f"{table.source}: a grouped fit needs a 'group' column")
        self.groups_ = table.groups
        idx = {g: np.flatnonzero(table.group == g) for g in self.groups_}
        with one_blas_thread():
            if self.shared_exponents:
                self._fit_shared(table, idx)
            else:
                self._fit_separate(table, idx)
        self.criteria_ = information_criteria(self.residuals_, self.n_params_)
        self.theta_ = np.zeros(0)
        return self

    def _fit_separate(self, table: RunTable, idx: dict[str, np.ndarray]) -> None:
        self.params_ = {}
        self.residuals_ = np.empty(len(table))
        self.draws_ = {}
        self.intervals_ = {}
        conv = []
        for g, rows in idx.items():
            law = ChinchillaLaw(
                delta=self.delta,
                n_bootstrap=self.n_bootstrap,
                seed=self.seed,
                n_jobs=self.n_jobs,
                calibrate=False,
            ).fit(table.subset(rows))
            self.params_[g] = law.params_
            self.intervals_[g] = {k: list(v) for k, v in law.intervals_.items()}
            if len(law.samples_):
                self.draws_[g] = {k: np.asarray(v) for k, v in law._params_from_theta(law.samples_).items()}
            self.residuals_[rows] = law.residuals_
            conv.append(law.result_.converged)
        self.n_params_ = 5 * len(idx)
        self.converged_ = all(conv)

    def _fit_shared(self, table: RunTable, idx: dict[str, np.ndarray]) -> None:
        G = len(idx)
        est.check_enough_runs(len(table), 3 * G + 2, f"grouped fit on {table.source}")
        for g, rows in idx.items():
            if rows.size < 3:
                raise FitError(f"{table.source}: group {g!r} has {rows.size} runs; need at least 3")
        w = table.weight if table.weight is not None else np.ones(len(table))
        whole = est.PowerSumProblem.from_features(np.stack([table.N, table.D], 1), table.loss, w, self.delta)
        subs = [
            est.PowerSumProblem(
                logX=np.ascontiguousarray(whole.logX[rows]),
                logy=whole.logy[rows],
                log_ref=whole.log_ref,
                weights=w[rows],
                delta=self.delta,
            )
            for rows in idx.values()
        ]
        grid = subs[0].exponent_grid()
        total = np.zeros(grid.shape[0])
        lin = []
        for p in subs:
            th, obj = p.project(grid)
            total += obj
            lin.append(th)
        order = np.argsort(total)[:4]

        def unpack(z: np.ndarray) -> list[np.ndarray]:
            return [np.array([z[3 * k], z[3 * k + 1], z[3 * k + 2], z[-2], z[-1]]) for k in range(G)]

        def fun(z: np.ndarray) -> tuple[float, np.ndarray]:
            f = 0.0
            grad = np.zeros_like(z)
            for k, (p, th) in enumerate(zip(subs, unpack(z), strict=True)):
                fk, gk = est.power_sum_objective(th, p.logX, p.logy, p.weights, self.delta)
                f += fk
                grad[3 * k : 3 * k + 3] += gk[:3]
                grad[-2:] += gk[3:]
            return f, grad

        b1 = whole.bounds()
        bounds = [b1[0], b1[1], b1[2]] * G + [b1[3], b1[4]]
        best = None
        for i in order:
            z0 = np.concatenate([*(lin[k][i][:3] for k in range(G)), grid[i]])
            res = minimize(
                fun,
                z0,
                jac=True,
                method="L-BFGS-B",
                bounds=bounds,
                options={"maxiter": 5000, "ftol": 1e-13, "gtol": 1e-10},
            )
            if best is None or res.fun < best.fun:
                best = res
        assert best is not None
        self.result_ = est.FitResult(
            best.x, float(best.fun), bool(best.success), str(best.message), int(best.nit)
        )
        self.converged_ = bool(best.success)
        self.params_ = {}
        self.residuals_ = np.empty(len(table))
        for (g, rows), p, th in zip(idx.items(), subs, unpack(best.x), strict=True):
            nat = whole.to_natural(th)
            self.params_[g] = {
                "E": float(np.exp(nat[0])),
                "A": float(np.exp(nat[1])),
                "B": float(np.exp(nat[2])),
                "alpha": float(nat[3]),
                "beta": float(nat[4]),
            }
            self.residuals_[rows] = p.logy - est.power_sum_log_predict(th, p.logX)
        self.n_params_ = 3 * G + 2

    def predict(self, N: Any, D: Any, group: str) -> np.ndarray:
        """Predicted loss for one group."""
        if not hasattr(self, "params_"):
            raise FitError("GroupedChinchillaLaw is not fitted yet")
        if group not in self.params_:
            raise FitError(f"unknown group {group!r}; fitted groups: {', '.join(self.params_)}")
        p = self.params_[group]
        N, D = np.asarray(N, float), np.asarray(D, float)
        return p["E"] + p["A"] / N ** p["alpha"] + p["B"] / D ** p["beta"]

    def to_dict(self) -> dict[str, Any]:
        return _floats(
            {
                "law": self.name,
                "shared_exponents": self.shared_exponents,
                "groups": self.groups_,
                "params": self.params_,
                "n_params": self.n_params_,
                "information_criteria": self.criteria_,
                "converged": self.converged_,
                "intervals": getattr(self, "intervals_", {}),
            }
        )


def exponent_differences(separate: GroupedChinchillaLaw, confidence: float) -> dict[str, Any]:
    """Bootstrap intervals of α_g − α_ref and β_g − β_ref (ref = the first group; draws of different
    groups are independent, so they are paired by index)."""
    from scalelab.fit.laws import _percentiles

    draws = separate.draws_
    if len(draws) < 2:
        return {}
    ref = separate.groups_[0]
    out: dict[str, Any] = {}
    for g in separate.groups_[1:]:
        m = min(len(draws[ref]["alpha"]), len(draws[g]["alpha"]))
        for k in ("alpha", "beta"):
            diff = draws[g][k][:m] - draws[ref][k][:m]
            lo, hi = _percentiles(diff, confidence)
            out[f"{k}[{g}] - {k}[{ref}]"] = {
                "estimate": separate.params_[g][k] - separate.params_[ref][k],
                "interval": [float(lo), float(hi)],
                "excludes_zero": bool(lo > 0 or hi < 0),
            }
    return out


def compare_groups(
    table: RunTable,
    delta: float = est.DEFAULT_DELTA,
    n_bootstrap: int = 100,
    confidence: float = 0.9,
    seed: int = 0,
    n_jobs: int | None = None,
) -> dict[str, Any]:
    """Fit shared-exponent and separate-exponent models: AIC/BIC and the preferred one for each,
    bootstrap intervals of each group's exponents and of their differences, and whether the law
    transfers across the groups."""
    shared = GroupedChinchillaLaw(True, delta=delta).fit(table)
    separate = GroupedChinchillaLaw(
        False, delta=delta, n_bootstrap=n_bootstrap, confidence=confidence, seed=seed, n_jobs=n_jobs
    ).fit(table)
    cs, cp = shared.criteria_, separate.criteria_
    diffs = exponent_differences(separate, confidence) if n_bootstrap else {}
    differ = [k for k, v in diffs.items() if v["excludes_zero"]]
    prefers_shared = cs["aic"] <= cp["aic"]
    if prefers_shared and not differ:
        verdict = "the law transfers across the groups: shared exponents are preferred by AIC"
        if diffs:
            verdict += f" and every {int(100 * confidence)} % interval of an exponent difference contains 0"
        transfers = True
    else:
        why = []
        if not prefers_shared:
            why.append(f"separate exponents are preferred by AIC (ΔAIC {cp['aic'] - cs['aic']:.1f})")
        if differ:
            why.append("the intervals of " + ", ".join(differ) + " exclude 0")
        verdict = (
            "the law does NOT transfer across the groups: " + "; ".join(why) + "; fit each group on its own"
        )
        transfers = False
    return _floats(
        {
            "shared": shared.to_dict(),
            "separate": separate.to_dict(),
            "delta_aic_separate_minus_shared": cp["aic"] - cs["aic"],
            "delta_bic_separate_minus_shared": cp["bic"] - cs["bic"],
            "preferred_by_aic": "shared" if cs["aic"] <= cp["aic"] else "separate",
            "preferred_by_bic": "shared" if cs["bic"] <= cp["bic"] else "separate",
            "exponent_differences": diffs,
            "transfers": transfers,
            "verdict": verdict,
            "confidence": confidence,
        }
    )
