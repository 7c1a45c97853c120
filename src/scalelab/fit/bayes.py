"""MAP fits of the Chinchilla law with priors, and a Laplace approximation of the posterior.

Model (stated, not hidden): log L_i = log(E + A/N_i^α + B/D_i^β) + ε_i with ε_i ~ Normal(0, σ²) — a
Gaussian likelihood on log residuals (the Huber loss used elsewhere is not a likelihood), σ estimated
with the parameters (flat prior on log σ). Priors are independent Gaussians on any of
(log E, log A, log B, α, β): from published values (`Prior.published`) or from an earlier fit.json
(`Prior.from_fit`, bootstrap spread as the prior width). Unnamed components have flat priors.

Posterior: the MAP by L-BFGS-B (from the Huber fit's optimum and the prior mean), and the Laplace
approximation N(MAP, H⁻¹) with H the finite-difference Hessian of the negative log posterior; its draws
give intervals for parameters, predictions and optima through the same code as bootstrap draws. With
few runs the prior carries the exponents; as runs arrive the posterior tightens around the data's values.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import minimize

from scalelab.errors import FitError
from scalelab.fit import estimate as est
from scalelab.fit._blas import one_blas_thread
from scalelab.fit.laws import ChinchillaLaw
from scalelab.fit.optimal import Accounting
from scalelab.fit.table import RunTable

log = logging.getLogger(__name__)

THETA_NAMES = ("log_E", "log_A", "log_B", "alpha", "beta")

#: Published approach-3 fits: (E, A, B, alpha, beta).
PUBLISHED = {
    "hoffmann2022": (1.69, 406.4, 410.7, 0.34, 0.28),
    "besiroglu2024": (1.8172, 482.01, 2085.43, 0.3478, 0.3658),
}


@dataclass(frozen=True)
class Prior:
    """Independent Gaussian priors on natural θ components (names from THETA_NAMES): {name: (mean, sd)}."""

    terms: dict[str, tuple[float, float]] = field(default_factory=dict)
    source: str = "none"

    def __post_init__(self) -> None:
        for k, (_, sd) in self.terms.items():
            if k not in THETA_NAMES:
                raise FitError(f"prior on unknown parameter {k!r}; use one of {', '.join(THETA_NAMES)}")
            if not (np.isfinite(sd) and sd > 0):
                raise FitError(f"prior sd of {k} must be positive, got {sd}")

    @classmethod
    def published(
        cls, name: str = "hoffmann2022", exponent_sd: float = 0.1, log_e_sd: float | None = 1.0
    ) -> Prior:
        """Priors on α and β (and weakly on log E: E depends on data and tokenizer) from a paper."""
        if name not in PUBLISHED:
            raise FitError(f"unknown published fit {name!r}; known: {', '.join(PUBLISHED)}")
        E, _, _, al, be = PUBLISHED[name]
        terms = {"alpha": (al, exponent_sd), "beta": (be, exponent_sd)}
        if log_e_sd is not None:
            terms["log_E"] = (float(np.log(E)), log_e_sd)
        return cls(terms, f"published:{name}")

    @classmethod
    def from_fit(cls, path: str | Path, inflate: float = 1.0, names: tuple[str, ...] = THETA_NAMES) -> Prior:
        """Priors centred on an earlier chinchilla fit.json's estimates, sd = bootstrap sd × inflate."""
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise FitError(f"{path}: cannot read fit JSON for a prior ({err})") from None
        fit = d.get("fit", d)
        if fit.get("law") != "chinchilla":
            raise FitError(f"{path}: a prior needs a chinchilla fit, got {fit.get('law')!r}")
        theta = np.asarray(fit["theta"]["values"], dtype=float)
        samples = np.asarray(fit.get("bootstrap", {}).get("theta_samples") or [], dtype=float)
        if samples.ndim != 2 or samples.shape[0] < 10:
            raise FitError(
                f"{path}: the fit has fewer than 10 bootstrap draws; refit with --bootstrap 200 or more"
            )
        sd = samples.std(axis=0, ddof=1) * inflate
        terms = {
            n: (float(theta[i]), float(max(sd[i], 1e-6))) for i, n in enumerate(THETA_NAMES) if n in names
        }
        return cls(terms, f"fit:{path}")

    def neg_log(self, theta_nat: np.ndarray) -> float:
        out = 0.0
        for k, (m, sd) in self.terms.items():
            z = (theta_nat[THETA_NAMES.index(k)] - m) / sd
            out += 0.5 * z * z
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "terms": {k: {"mean": m, "sd": s} for k, (m, s) in self.terms.items()}}


#: names a user may give after ``published:`` (the paper's short name, or the fit it is known by)
PUBLISHED_ALIASES = {"chinchilla": "hoffmann2022", "hoffmann": "hoffmann2022", "epoch": "besiroglu2024"}


def parse_prior(value: str | Path, flag: str = "--prior") -> Prior:
    """A prior from the command line or [study.fit] prior: ``published:NAME`` (chinchilla = hoffmann2022,
    epoch = besiroglu2024), a bare published name, or the path of an earlier chinchilla fit.json."""
    text = str(value).strip()
    kind, sep, name = text.partition(":")
    if sep and kind == "published":
        key = PUBLISHED_ALIASES.get(name, name)
        if key not in PUBLISHED:
            known = ", ".join(sorted({*PUBLISHED, *PUBLISHED_ALIASES}))
            raise FitError(f"{flag} {text!r}: unknown published fit {name!r}; known: {known}")
        return Prior.published(key)
    if text in PUBLISHED or text in PUBLISHED_ALIASES:
        return Prior.published(PUBLISHED_ALIASES.get(text, text))
    path = Path(text)
    if not path.is_file():
        raise FitError(
            f"{flag} {text!r}: not a published fit (published:chinchilla, published:epoch, ...) "
            "and no such fit.json file"
        )
    return Prior.from_fit(path)


class MAPChinchillaLaw(ChinchillaLaw):
    """ChinchillaLaw fitted by MAP under `prior`, intervals from the Laplace approximation.

    Same attributes and methods as `ChinchillaLaw` (``params_``, ``intervals_``, ``predict``,
    ``optimal``, ``to_dict``); ``samples_`` are posterior draws (not bootstrap), ``sigma_`` the fitted
    log-residual sd, ``posterior_cov_`` the Laplace covariance of natural θ."""

    name = "chinchilla"
    optimizer = "MAP (Gaussian log-residual likelihood, Gaussian priors) by L-BFGS-B; Laplace approximation"

    def __init__(self, prior: Prior | None = None, *, n_draws: int = 2000, **kw: Any) -> None:
        kw.setdefault("n_bootstrap", 0)
        super().__init__(**kw)
        self.prior = prior or Prior()
        if n_draws < 10:
            raise FitError(f"n_draws must be >= 10, got {n_draws}")
        self.n_draws = int(n_draws)

    def get_params(self) -> dict[str, Any]:
        return {"prior": self.prior, **super().get_params(), "n_draws": self.n_draws}

    def _fit_table(self, table: RunTable) -> None:
        if len(table) < 3:
            raise FitError(f"MAP fit on {table.source}: {len(table)} runs; need at least 3 even with priors")
        w = table.weight if table.weight is not None else np.ones(len(table))
        problem = est.PowerSumProblem.from_features(self._features(table), table.loss, w, self.delta)
        self.problem_ = problem
        n = len(table)
        # σ's exponent uses residual degrees of freedom (a REML-like correction: each parameter the
        # data must pin down alone costs one; parameters with a prior count half)
        n_free = 5 - 0.5 * len(self.prior.terms)
        wsum = max(float(w.sum()) - n_free, 1.0)

        def nlp(z: np.ndarray) -> float:
            th, log_s = z[:5], z[5]
            r = est.power_sum_log_predict(th, problem.logX) - problem.logy
            s2 = np.exp(2 * log_s)
            val = 0.5 * float(w @ (r * r)) / s2 + wsum * log_s
            return val + self.prior.neg_log(problem.to_natural(th))

        starts = []
        if n >= 6:
            starts.append(problem.search().theta)
        if self.prior.terms:
            nat = np.array([0.0, 0.0, 0.0, 0.3, 0.3])
            nat[0] = float(np.log(table.loss.min()) - 0.5)
            for k, (m, _) in self.prior.terms.items():
                nat[THETA_NAMES.index(k)] = m
            al, be = nat[3], nat[4]
            th, obj = problem.project(np.array([[al, be]]))
            starts.append(th[0])
        if not starts:
            starts.append(problem.search().theta)
        bounds = [*problem.bounds(), (-12.0, 2.0)]
        best = None
        for th0 in starts:
            r0 = est.power_sum_log_predict(th0, problem.logX) - problem.logy
            z0 = np.concatenate([th0, [np.log(max(float(np.std(r0)), 1e-4))]])
            res = minimize(
                nlp, z0, method="L-BFGS-B", bounds=bounds, options={"maxiter": 5000, "ftol": 1e-14}
            )
            if best is None or res.fun < best.fun:
                best = res
        assert best is not None
        z = best.x
        self.result_ = est.FitResult(
            z[:5].copy(), float(best.fun), bool(best.success), str(best.message), int(best.nit)
        )
        self.sigma_ = float(np.exp(z[5]))
        self.theta_ = problem.to_natural(z[:5])
        self.table_ = table
        self.accounting_ = Accounting.from_runs(table.N, table.D, table.C, table.compute_source)
        self.n_runs_ = n
        self.largest_run_flops_ = float(table.C.max())
        self.residuals_ = np.log(table.loss) - self._log_predict_theta(self.theta_, self._features(table))
        self.at_bound_ = self._at_bound(z[:5], problem)
        H = _hessian(nlp, z)
        try:
            cov_z = np.linalg.inv(H)
            ok = bool(np.all(np.linalg.eigvalsh(0.5 * (cov_z + cov_z.T)) > 0))
        except np.linalg.LinAlgError:
            ok = False
        if not ok:
            raise FitError(
                f"MAP fit on {table.source}: the posterior is not locally Gaussian (singular Hessian); "
                "add priors on the exponents and E, or more runs"
            )
        rng = np.random.default_rng(self.seed)
        draws = rng.multivariate_normal(z, 0.5 * (cov_z + cov_z.T), size=self.n_draws, method="cholesky")
        self.samples_ = np.stack([problem.to_natural(d[:5]) for d in draws])
        M = np.eye(5)
        M[1, 3] = problem.log_ref[0]
        M[2, 4] = problem.log_ref[1]
        self.posterior_cov_ = M @ cov_z[:5, :5] @ M.T
        self.bootstrap_ = None
        self.samples_at_bound_ = {}
        self._finish_fit(table)

    def prior_vs_posterior(self) -> dict[str, dict[str, float]]:
        """How much the data moved each prior: posterior/prior sd (< 1: the data narrowed it) and the
        shift of the mean in prior sds."""
        out = {}
        for k, (m, sd) in self.prior.terms.items():
            i = THETA_NAMES.index(k)
            out[k] = _prior_shift(m, sd, float(self.theta_[i]), float(np.sqrt(self.posterior_cov_[i, i])))
        return out

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d["settings"]["prior"] = self.prior.source
        d["settings"]["interval_method"] = "Laplace approximation of the posterior (draws from N(MAP, H^-1))"
        d["settings"]["likelihood"] = "Gaussian on log residuals, sigma fitted"
        d["prior"] = self.prior.to_dict()
        d["posterior"] = {
            "sigma": self.sigma_,
            "sd": {n: float(np.sqrt(self.posterior_cov_[i, i])) for i, n in enumerate(THETA_NAMES)},
            "n_draws": self.n_draws,
        }
        d["prior_vs_posterior"] = self.prior_vs_posterior()
        d["bootstrap"]["kind"] = "posterior draws (Laplace)"
        return d


def _prior_shift(prior_mean: float, prior_sd: float, post_mean: float, post_sd: float) -> dict[str, float]:
    return {
        "prior_mean": prior_mean,
        "prior_sd": prior_sd,
        "posterior_mean": post_mean,
        "posterior_sd": post_sd,
        "width_ratio": post_sd / prior_sd,
        "shift_in_prior_sds": (post_mean - prior_mean) / prior_sd,
    }


def _hessian(f: Any, z: np.ndarray) -> np.ndarray:
    """Central finite-difference Hessian."""
    k = z.size
    h = 1e-4 * np.maximum(1.0, np.abs(z))
    H = np.empty((k, k))
    f0 = f(z)
    for i in range(k):
        for j in range(i, k):
            if i == j:
                e = np.zeros(k)
                e[i] = h[i]
                H[i, i] = (f(z + e) - 2 * f0 + f(z - e)) / h[i] ** 2
            else:
                ei = np.zeros(k)
                ej = np.zeros(k)
                ei[i] = h[i]
                ej[j] = h[j]
                H[i, j] = H[j, i] = (f(z + ei + ej) - f(z + ei - ej) - f(z - ei + ej) + f(z - ei - ej)) / (
                    4 * h[i] * h[j]
                )
    return 0.5 * (H + H.T)


def fit_map(table: RunTable, prior: Prior, **kw: Any) -> MAPChinchillaLaw:
    """Convenience: ``MAPChinchillaLaw(prior, **kw).fit(table)`` with BLAS pinned."""
    with one_blas_thread():
        return MAPChinchillaLaw(prior, **kw).fit(table)
