"""Robust estimation of scaling laws: Huber loss on log residuals, variable projection, L-BFGS-B, bootstrap.

The objective (Hoffmann et al. 2022, App. D.2) for a law ``L = E + Σ_k A_k / x_k^{α_k}`` is

    F(θ) = Σ_i w_i · Huber_δ( LSE(e, a_1 − α_1 log x_1i, …) − log L_i ),   θ = (e, a_k, α_k),

with ``e = log E``, ``a_k = log A_k`` and LSE the log-sum-exp, so predictions stay positive and the loss is
measured in relative (log) terms. ``δ`` defaults to 1e-3.

How it is minimised (``search``): **variable projection**. For fixed exponents the law is linear in
(E, A_k); on a grid of exponents we solve the linear part by iteratively reweighted least squares on
relative residuals (the Huber weights), vectorised over all grid points at once; the best few grid
points are then polished by L-BFGS-B on the exact objective with its analytic gradient. Features are
centred in log space first (``x / geometric_mean(x)``), so the fit is invariant to the units of N, D, C.
`benchmarks/bench_fit_speed.py` compares this with the Hoffmann recipe (L-BFGS-B from 4,500 grid
starts) on the Chinchilla data: same or lower objective, far faster.

Bootstrap (``bootstrap``): resample clusters (runs, or all seeds of one config) with replacement,
refit each resample warm-started from the full-data optimum (plus a cheap variable-projection start),
in a process pool with BLAS pinned to one thread per worker. Every refit's convergence is recorded.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.optimize import minimize

from scalelab.errors import FitError
from scalelab.fit._blas import one_blas_thread, pin_process_to_one_thread
from scalelab.fit.progress import report

log = logging.getLogger(__name__)

DEFAULT_DELTA = 1e-3
BLAS_ENV_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS")


# ------------------------------------------------------------------------------------------ Huber
def huber(r: np.ndarray, delta: float) -> np.ndarray:
    """Huber loss: r²/2 inside ±δ, δ(|r| − δ/2) outside."""
    a = np.abs(r)
    return np.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))


def huber_grad(r: np.ndarray, delta: float) -> np.ndarray:
    return np.clip(r, -delta, delta)


# ---------------------------------------------------------------------------------- the objective
def power_sum_log_predict(theta: np.ndarray, logX: np.ndarray) -> np.ndarray:
    """log(E + Σ_k A_k x_k^{-α_k}) with θ = (e, a_1..a_K, α_1..α_K); logX has shape (n, K)."""
    K = logX.shape[1]
    T = np.empty((logX.shape[0], K + 1))
    T[:, 0] = theta[0]
    T[:, 1:] = theta[1 : K + 1] - logX * theta[K + 1 :]
    m = T.max(axis=1)
    return m + np.log(np.exp(T - m[:, None]).sum(axis=1))


def power_sum_objective(
    theta: np.ndarray, logX: np.ndarray, logy: np.ndarray, w: np.ndarray, delta: float
) -> tuple[float, np.ndarray]:
    """Weighted Huber objective in log space and its analytic gradient.

    Written for speed (it is the inner loop of every fit): the terms are exponentiated directly with
    their arguments capped at 700 (features are centred, so real fits stay far below), and the Huber
    value uses ``g·(r − g/2)`` with ``g = clip(r, ±δ)``, which equals r²/2 inside ±δ and δ(|r| − δ/2)
    outside.
    """
    K = logX.shape[1]
    pe = float(np.exp(min(theta[0], 700.0)))
    terms = []
    s = np.full(logy.shape, pe)
    for k in range(K):
        x = logX[:, k]
        p = np.exp(np.minimum(theta[1 + k] - theta[1 + K + k] * x, 700.0))
        terms.append(p)
        s += p
    r = np.log(s) - logy
    g = np.clip(r, -delta, delta)
    f = float(w @ (g * (r - 0.5 * g)))
    gr = w * g / s
    grad = np.empty(2 * K + 1)
    grad[0] = pe * gr.sum()
    for k in range(K):
        gp = gr * terms[k]
        grad[1 + k] = gp.sum()
        grad[1 + K + k] = -(gp @ logX[:, k])
    return f, grad


# ----------------------------------------------------------------------------------- the problem
@dataclass
class PowerSumProblem:
    """One fitting problem ``L = E + Σ_k A_k/x_k^{α_k}`` in centred log units.

    ``logX`` is centred (``log_ref`` subtracted), so θ here is in normalised units; `to_natural`
    converts ``a_k`` back: ``a_k + α_k · log_ref_k``.
    """

    logX: np.ndarray
    logy: np.ndarray
    log_ref: np.ndarray
    weights: np.ndarray
    delta: float = DEFAULT_DELTA
    exponent_bounds: tuple[float, float] = (0.0, 5.0)
    grid_size: int = 0
    n_polish: int = 4
    maxiter: int = 2000

    @classmethod
    def from_features(
        cls,
        X: np.ndarray,
        y: np.ndarray,
        weights: np.ndarray | None = None,
        delta: float = DEFAULT_DELTA,
        **kw: Any,
    ) -> PowerSumProblem:
        X = np.asarray(X, dtype=np.float64)
        if X.ndim == 1:
            X = X[:, None]
        logX = np.log(X)
        ref = logX.mean(axis=0)
        w = np.ones(len(y)) if weights is None else np.asarray(weights, dtype=np.float64)
        return cls(
            logX=logX - ref, logy=np.log(np.asarray(y, float)), log_ref=ref, weights=w, delta=delta, **kw
        )

    @property
    def K(self) -> int:
        return int(self.logX.shape[1])

    @property
    def n_params(self) -> int:
        return 2 * self.K + 1

    def bounds(self) -> list[tuple[float, float]]:
        lo_y, hi_y = float(self.logy.min()), float(self.logy.max())
        b = [(lo_y - 30.0, hi_y)]
        b += [(lo_y - 60.0, hi_y + 60.0)] * self.K
        b += [self.exponent_bounds] * self.K
        return b

    def to_natural(self, theta: np.ndarray) -> np.ndarray:
        """θ in the table's own units (a_k shifted by α_k·log_ref_k)."""
        t = np.array(theta, dtype=np.float64, copy=True)
        K = self.K
        t[1 : K + 1] = t[1 : K + 1] + t[K + 1 :] * self.log_ref
        return t

    def from_natural(self, theta: np.ndarray) -> np.ndarray:
        t = np.array(theta, dtype=np.float64, copy=True)
        K = self.K
        t[1 : K + 1] = t[1 : K + 1] - t[K + 1 :] * self.log_ref
        return t

    def objective(self, theta: np.ndarray, weights: np.ndarray | None = None) -> float:
        w = self.weights if weights is None else weights
        return power_sum_objective(np.asarray(theta, float), self.logX, self.logy, w, self.delta)[0]

    # -- variable projection over a grid of exponents
    def exponent_grid(self) -> np.ndarray:
        K = self.K
        m = self.grid_size or (240 if K == 1 else 36 if K == 2 else 12)
        lo, hi = max(self.exponent_bounds[0], 0.01), min(self.exponent_bounds[1], 3.0)
        axis = np.geomspace(lo, hi, m)
        mesh = np.meshgrid(*([axis] * K), indexing="ij")
        return np.stack([g.ravel() for g in mesh], axis=1)  # (G, K)

    def project(
        self, alphas: np.ndarray, weights: np.ndarray | None = None, irls_steps: int = 4
    ) -> tuple[np.ndarray, np.ndarray]:
        """For each exponent vector (G, K): the linear coefficients (E, A_k) by IRLS on relative
        residuals (Huber weights), clipped positive, and the exact objective there.
        Returns (thetas (G, 2K+1) in normalised units, objective (G,))."""
        w = self.weights if weights is None else weights
        keep = w > 0
        logX, logy, w = self.logX[keep], self.logy[keep], w[keep]
        y = np.exp(logy)
        G, K = alphas.shape
        M = np.empty((G, y.size, K + 1))
        M[:, :, 0] = 1.0
        M[:, :, 1:] = np.exp(-alphas[:, None, :] * logX[None, :, :])
        base = w / (y * y)
        v = np.broadcast_to(base, (G, y.size))
        eye = np.eye(K + 1) * 1e-12
        coef = np.zeros((G, K + 1))
        for _ in range(irls_steps):
            MvT = (M * v[:, :, None]).transpose(0, 2, 1)
            A = np.matmul(MvT, M) + eye
            b = np.matmul(MvT, y)
            try:
                coef = np.linalg.solve(A, b[:, :, None])[:, :, 0]
            except np.linalg.LinAlgError:
                coef = np.stack([np.linalg.lstsq(A[g], b[g], rcond=None)[0] for g in range(G)])
            rel = (np.matmul(M, coef[:, :, None])[:, :, 0] - y) / y
            v = base * np.minimum(1.0, self.delta / np.maximum(np.abs(rel), 1e-300))
        floor = 1e-9 * float(y.mean())
        coef = np.maximum(coef, floor)
        pred = np.matmul(M, coef[:, :, None])[:, :, 0]
        r = np.log(pred) - logy
        obj = (huber(r, self.delta) * w).sum(axis=1)
        thetas = np.concatenate([np.log(coef), alphas], axis=1)
        return thetas, obj

    def polish(self, theta0: np.ndarray, weights: np.ndarray | None = None) -> FitResult:
        """L-BFGS-B on the exact objective (analytic gradient) from one start, within bounds."""
        w = self.weights if weights is None else weights
        keep = w > 0
        args = (np.ascontiguousarray(self.logX[keep]), self.logy[keep], w[keep], self.delta)
        bounds = self.bounds()
        x0 = np.clip(theta0, [b[0] for b in bounds], [b[1] for b in bounds])
        res = minimize(
            power_sum_objective,
            x0,
            args=args,
            jac=True,
            method="L-BFGS-B",
            bounds=bounds,
            options={"maxiter": self.maxiter, "ftol": 1e-13, "gtol": 1e-10, "maxcor": 20},
        )
        return FitResult(
            theta=np.asarray(res.x, float),
            objective=float(res.fun),
            converged=bool(res.success),
            message=str(res.message),
            n_iter=int(res.nit),
            n_starts=1,
        )

    def search(self, weights: np.ndarray | None = None, extra_starts: Sequence[np.ndarray] = ()) -> FitResult:
        """Full search: variable projection on the exponent grid, polish the best few points."""
        grid = self.exponent_grid()
        thetas, obj = self.project(grid, weights)
        order = np.argsort(obj)
        starts = [thetas[i] for i in order[: self.n_polish]] + list(extra_starts)
        results = [self.polish(t, weights) for t in starts]
        best = min(results, key=lambda r: r.objective)
        best.n_starts = len(results)
        best.n_evals_grid = int(grid.shape[0])
        best.start_objectives = [r.objective for r in results]
        return best

    def objective_many(self, thetas: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
        """The objective at many θ at once (S, 2K+1) → (S,), vectorised over starts."""
        w = self.weights if weights is None else weights
        K = self.K
        out = np.empty(thetas.shape[0])
        for lo in range(0, thetas.shape[0], 512):
            t = thetas[lo : lo + 512]
            T = np.empty((t.shape[0], self.logX.shape[0], K + 1))
            T[:, :, 0] = t[:, None, 0]
            T[:, :, 1:] = t[:, None, 1 : K + 1] - self.logX[None] * t[:, None, K + 1 :]
            m = T.max(axis=2)
            lse = m + np.log(np.exp(T - m[:, :, None]).sum(axis=2))
            out[lo : lo + 512] = (huber(lse - self.logy, self.delta) * w).sum(axis=1)
        return out

    def search_screened(self, starts: np.ndarray, n_polish: int | None = None) -> FitResult:
        """Alternative to `search`: evaluate the objective at many starts (vectorised), polish the best
        few with L-BFGS-B. `starts` are in normalised units. Kept for the benchmark comparison."""
        obj = self.objective_many(starts)
        order = np.argsort(np.where(np.isfinite(obj), obj, np.inf))
        results = [self.polish(starts[i]) for i in order[: n_polish or self.n_polish]]
        best = min(results, key=lambda r: r.objective)
        best.n_starts = len(results)
        best.n_evals_grid = int(starts.shape[0])
        best.start_objectives = [r.objective for r in results]
        return best

    def _batch_terms(self, theta: np.ndarray) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
        K = self.K
        pe = np.exp(np.minimum(theta[:, 0], 700.0))[:, None]
        terms = [
            np.exp(
                np.minimum(theta[:, 1 + k, None] - theta[:, 1 + K + k, None] * self.logX[None, :, k], 700.0)
            )
            for k in range(K)
        ]
        s = pe + sum(terms)
        return pe, terms, s

    def objective_batch(self, theta: np.ndarray, W: np.ndarray) -> np.ndarray:
        """Objective for B parameter vectors (B, P), each with its own row weights W (B, n)."""
        _, _, s = self._batch_terms(theta)
        r = np.log(s) - self.logy
        g = np.clip(r, -self.delta, self.delta)
        return (W * g * (r - 0.5 * g)).sum(axis=1)

    def refit_batch(
        self, theta0: np.ndarray, W: np.ndarray, max_iter: int = 200, tol: float = 1e-10
    ) -> list[tuple[np.ndarray, float, bool]]:
        """Refit many resamples at once (rows of W are their weights), warm-started from `theta0`.

        Levenberg–Marquardt on the Huber objective with IRLS weights (Gauss–Newton matrix
        JᵀΩJ, Ω = w·min(1, δ/|r|); exact gradient), vectorised over resamples; a step is taken only
        if it lowers that resample's objective. Resamples that have not converged after `max_iter`
        steps are finished by L-BFGS-B. Returns (θ, objective, converged) per resample."""
        B, n = W.shape
        K, P = self.K, self.n_params
        bounds = self.bounds()
        lo = np.array([b[0] for b in bounds])
        hi = np.array([b[1] for b in bounds])
        th = np.tile(np.clip(theta0, lo, hi), (B, 1))
        lam = np.full(B, 1e-4)
        F = self.objective_batch(th, W)
        active = np.ones(B, dtype=bool)
        conv = np.zeros(B, dtype=bool)
        eye = np.eye(P)
        d = self.delta
        for _ in range(max_iter):
            idx = np.flatnonzero(active)
            if idx.size == 0:
                break
            ta, Wa = th[idx], W[idx]
            pe, terms, s = self._batch_terms(ta)
            r = np.log(s) - self.logy
            J = np.empty((idx.size, n, P))
            J[:, :, 0] = pe / s
            for k in range(K):
                q = terms[k] / s
                J[:, :, 1 + k] = q
                J[:, :, 1 + K + k] = -q * self.logX[None, :, k]
            om = Wa * np.minimum(1.0, d / np.maximum(np.abs(r), 1e-300))
            JT = J.transpose(0, 2, 1)
            g = np.matmul(JT, (Wa * np.clip(r, -d, d))[:, :, None])[:, :, 0]
            H = np.matmul(JT * om[:, None, :], J)
            diag = np.einsum("bpp->bp", H)
            Hd = H + (lam[idx, None] * diag + 1e-14)[:, :, None] * eye
            try:
                step = -np.linalg.solve(Hd, g[:, :, None])[:, :, 0]
            except np.linalg.LinAlgError:
                step = -np.stack([np.linalg.lstsq(Hd[i], g[i], rcond=None)[0] for i in range(idx.size)])
            tn = np.clip(ta + step, lo, hi)
            Fn = self.objective_batch(tn, Wa)
            better = Fn < F[idx]
            rel = (F[idx] - Fn) / np.maximum(F[idx], 1e-300)
            bi = idx[better]
            th[bi] = tn[better]
            F[bi] = Fn[better]
            lam[bi] = np.maximum(lam[bi] / 3.0, 1e-12)
            lam[idx[~better]] *= 4.0
            done = (better & (rel < tol)) | (~better & (lam[idx] > 1e6))
            conv[idx[done]] = True
            active[idx[done]] = False
        out = []
        for b in range(B):
            if conv[b]:
                out.append((th[b], float(F[b]), True))
            else:
                r = self.polish(th[b], W[b])
                out.append((r.theta, r.objective, r.converged))
        return out

    def refit(self, theta0: np.ndarray, weights: np.ndarray, safe: bool = False) -> FitResult:
        """Bootstrap refit: L-BFGS-B warm-started from the full-data optimum `theta0`.

        With ``safe=True`` also polish the best variable-projection point of a small exponent grid around
        `theta0` and keep the lower objective (slower; the benchmark shows the warm start alone lands
        where a full search does on the reference data)."""
        first = self.polish(theta0, weights)
        if not safe:
            return first
        K = self.K
        around = theta0[K + 1 :][None, :] * np.array([[0.7], [0.85], [1.0], [1.2], [1.4]])
        if K == 2:
            a0, a1 = np.meshgrid(around[:, 0], around[:, 1], indexing="ij")
            around = np.stack([a0.ravel(), a1.ravel()], axis=1)
        around = np.clip(around, *self.exponent_bounds)
        thetas, obj = self.project(around, weights, irls_steps=3)
        second = self.polish(thetas[int(np.argmin(obj))], weights)
        best = first if first.objective <= second.objective else second
        best.n_starts = 2
        return best


@dataclass
class FitResult:
    """One minimisation: θ (the problem's own units), objective, convergence as scipy reported it."""

    theta: np.ndarray
    objective: float
    converged: bool
    message: str
    n_iter: int
    n_starts: int = 1
    n_evals_grid: int = 0
    start_objectives: list[float] = field(default_factory=list)


# ------------------------------------------------------------------------- generic multi-start fits
@dataclass
class GenericProblem:
    """A law given as ``log_predict(θ, X)`` (vectorised), fitted by Huber in log space from many starts
    with L-BFGS-B (finite-difference gradient). Used for forms without a linear part (Kaplan)."""

    log_predict: Callable[[np.ndarray, np.ndarray], np.ndarray]
    X: np.ndarray
    logy: np.ndarray
    weights: np.ndarray
    starts: np.ndarray
    bound_list: list[tuple[float, float]]
    delta: float = DEFAULT_DELTA
    maxiter: int = 2000
    offset: np.ndarray | None = None  # natural θ = θ + offset (undoes the centring of features)

    @property
    def n_params(self) -> int:
        return int(self.starts.shape[1])

    def to_natural(self, theta: np.ndarray) -> np.ndarray:
        return np.asarray(theta, float) + (0.0 if self.offset is None else self.offset)

    def from_natural(self, theta: np.ndarray) -> np.ndarray:
        return np.asarray(theta, float) - (0.0 if self.offset is None else self.offset)

    def bounds(self) -> list[tuple[float, float]]:
        return self.bound_list

    def objective(self, theta: np.ndarray, weights: np.ndarray | None = None) -> float:
        w = self.weights if weights is None else weights
        r = self.log_predict(np.asarray(theta, float), self.X) - self.logy
        return float(w @ huber(r, self.delta))

    def polish(self, theta0: np.ndarray, weights: np.ndarray | None = None) -> FitResult:
        w = self.weights if weights is None else weights

        def f(t: np.ndarray) -> float:
            r = self.log_predict(t, self.X) - self.logy
            val = float(w @ huber(r, self.delta))
            return val if np.isfinite(val) else 1e30

        lo = [b[0] for b in self.bound_list]
        hi = [b[1] for b in self.bound_list]
        res = minimize(
            f,
            np.clip(theta0, lo, hi),
            method="L-BFGS-B",
            bounds=self.bound_list,
            options={"maxiter": self.maxiter, "ftol": 1e-13, "gtol": 1e-10},
        )
        return FitResult(
            np.asarray(res.x, float), float(res.fun), bool(res.success), str(res.message), int(res.nit)
        )

    def search(self, weights: np.ndarray | None = None, extra_starts: Sequence[np.ndarray] = ()) -> FitResult:
        w = self.weights if weights is None else weights
        vals = np.array([self.objective(s, w) for s in self.starts])
        order = np.argsort(np.where(np.isfinite(vals), vals, np.inf))
        starts = [self.starts[i] for i in order[:6]] + list(extra_starts)
        results = [self.polish(s, w) for s in starts]
        best = min(results, key=lambda r: r.objective)
        best.n_starts = len(results)
        best.n_evals_grid = int(len(self.starts))
        best.start_objectives = [r.objective for r in results]
        return best

    def refit(self, theta0: np.ndarray, weights: np.ndarray) -> FitResult:
        return self.polish(theta0, weights)


# ------------------------------------------------------------------------------------- bootstrap
@dataclass
class BootstrapResult:
    """Refits on resampled data: θ per resample (problem units), objective and convergence."""

    thetas: np.ndarray
    objectives: np.ndarray
    converged: np.ndarray
    counts: np.ndarray  # (B, n) multiplicity of each row in each resample
    seed: int
    unit: str  # "run" or "config (all seeds)"
    cpu_seconds: float = 0.0

    @property
    def n(self) -> int:
        return int(self.thetas.shape[0])

    @property
    def converged_fraction(self) -> float:
        return float(self.converged.mean()) if self.converged.size else 1.0


def resample_counts(clusters: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, n_rows) multiplicities: clusters drawn with replacement, every row of a drawn cluster
    included. Deterministic for a seed, whatever the number of workers."""
    labels, inv = np.unique(clusters, return_inverse=True)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, labels.size, size=(n_boot, labels.size))
    per_cluster = np.zeros((n_boot, labels.size), dtype=np.int64)
    np.add.at(per_cluster, (np.repeat(np.arange(n_boot), labels.size), draws.ravel()), 1)
    return per_cluster[:, inv]


def default_jobs() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


@contextlib.contextmanager
def blas_env_one_thread() -> Iterator[None]:
    """Set the BLAS thread variables to 1 while worker processes are started (they inherit them)."""
    old = {k: os.environ.get(k) for k in BLAS_ENV_VARS}
    try:
        for k in BLAS_ENV_VARS:
            os.environ[k] = "1"
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _pin_blas() -> None:
    """Worker initializer: one BLAS thread (env vars for anything started later, plus the live
    libraries via threadpoolctl or OpenBLAS's own setter)."""
    for k in BLAS_ENV_VARS:
        os.environ[k] = "1"
    pin_process_to_one_thread()


def _refit_chunk(
    problem: Any, theta0: np.ndarray, counts: np.ndarray
) -> tuple[list[tuple[np.ndarray, float, bool]], float]:
    """Refit one chunk of resamples; returns the results and the CPU seconds spent."""
    t0 = time.process_time()
    out: list[tuple[np.ndarray, float, bool]] = []
    if hasattr(problem, "refit_batch"):
        for lo in range(0, len(counts), 256):  # bounded memory: (256, n, P) Jacobians
            out += problem.refit_batch(theta0, problem.weights * counts[lo : lo + 256])
    else:
        for c in counts:
            r = problem.refit(theta0, problem.weights * c)
            out.append((r.theta, r.objective, r.converged))
    return out, time.process_time() - t0


def _refit_chunk_args(
    args: tuple[Any, np.ndarray, np.ndarray],
) -> tuple[list[tuple[np.ndarray, float, bool]], float]:
    return _refit_chunk(*args)


def bootstrap(
    problem: PowerSumProblem | GenericProblem,
    theta_hat: np.ndarray,
    n_boot: int,
    clusters: np.ndarray,
    seed: int = 0,
    n_jobs: int | None = None,
    unit: str = "run",
) -> BootstrapResult:
    """Refit `n_boot` cluster resamples in parallel (process pool, BLAS pinned to 1 thread/worker)."""
    if n_boot <= 0:
        P = int(len(theta_hat))
        return BootstrapResult(
            np.zeros((0, P)), np.zeros(0), np.zeros(0, bool), np.zeros((0, len(clusters))), seed, unit
        )
    counts = resample_counts(clusters, n_boot, seed)
    jobs = min(n_jobs or default_jobs(), n_boot)
    if mp.current_process().daemon:  # daemonic workers may not start children: refit serially
        jobs = 1
    report("bootstrap refits", 0, n_boot)
    if jobs <= 1 or n_boot < 16:
        rows, cpu = [], 0.0
        block = 256 if hasattr(problem, "refit_batch") else 32
        with one_blas_thread():
            for lo in range(0, n_boot, block):  # in blocks, to report progress between them
                part, part_cpu = _refit_chunk(problem, theta_hat, counts[lo : lo + block])
                rows += part
                cpu += part_cpu
                report("bootstrap refits", len(rows), n_boot)
    else:
        chunks = np.array_split(counts, jobs * 2)
        # fork is cheap; the initializer pins the inherited BLAS libraries to one thread
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        parts = []
        with blas_env_one_thread(), ctx.Pool(processes=jobs, initializer=_pin_blas) as pool:
            for part in pool.imap(_refit_chunk_args, [(problem, theta_hat, c) for c in chunks if len(c)]):
                parts.append(part)  # in chunk order, as starmap returned them
                report("bootstrap refits", sum(len(p) for p, _ in parts), n_boot)
        rows = [r for part, _ in parts for r in part]
        cpu = float(sum(c for _, c in parts))
    thetas = np.stack([r[0] for r in rows])
    objs = np.array([r[1] for r in rows])
    conv = np.array([r[2] for r in rows], dtype=bool)
    if not conv.all():
        log.warning("bootstrap: %d of %d refits did not report convergence", int((~conv).sum()), n_boot)
    return BootstrapResult(thetas, objs, conv, counts, seed, unit, cpu_seconds=cpu)


def check_enough_runs(n_rows: int, n_params: int, what: str) -> None:
    if n_rows < n_params + 1:
        raise FitError(
            f"{what}: {n_rows} runs for {n_params} parameters; need at least {n_params + 1} "
            "(add runs or use a law with fewer parameters, e.g. --law power)"
        )
