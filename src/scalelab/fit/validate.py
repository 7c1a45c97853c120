"""Validation of a fitted law: honest warnings, backtests, k-fold, residual diagnostics, AIC/BIC.

* `fit_warnings`: too few runs, parameters at their bounds, intervals reaching a bound, E/B weakly
  identified when D barely varies at fixed N, refits that did not converge.
* `backtest`: fit below a compute threshold (or without the K largest-compute runs), predict the runs
  above it: relative error, and whether each actual loss is inside its prediction interval.
* `kfold`: K-fold cross-validated log-residual error.
* `residual_diagnostics`: log residuals against log N, log D, log C (slope, correlation, runs of signs).
* `information_criteria`: AIC/BIC from a Gaussian likelihood of the log residuals at the Huber fit
  (σ² profiled out: ``n·log(RSS/n) + k·penalty``), for comparing law forms on the same runs.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from scalelab.errors import FitError
from scalelab.fit.table import RunTable
from scalelab.units import factor

log = logging.getLogger(__name__)

RUNS_PER_PARAM_WARN = 3
D_SPREAD_WARN = np.log(3.0)  # D must vary by at least 3x at some fixed N to pin down B, beta and E
FAR_EXTRAPOLATION = 100.0


def fit_warnings(law: Any) -> list[str]:
    """Warnings for an ill-posed or suspicious fit (each a sentence saying what to do)."""
    out: list[str] = []
    n = int(law.n_runs_)
    k = len(law.param_names)
    if n < RUNS_PER_PARAM_WARN * k:
        out.append(
            f"only {n} runs for {k} parameters: estimates and intervals are fragile; "
            f"aim for at least {RUNS_PER_PARAM_WARN * k} runs or use a law with fewer parameters"
        )
    res = getattr(law, "result_", None)
    if res is not None and not res.converged:
        out.append(
            f"the optimizer did not report convergence ({res.message}): do not use the intervals; add runs "
            "or fit a law with fewer parameters (--law kaplan, or a prior with --prior published:chinchilla)"
        )
    for name in getattr(law, "at_bound_", []):
        out.append(
            f"parameter {name} is at its bound: the data do not constrain it "
            + (
                "(no loss floor is visible: E -> 0); add runs at larger N and D, or fit with "
                "--prior published:chinchilla"
                if name == "E"
                else "; widen the range of runs (model sizes and token budgets)"
            )
        )
    for name, frac in getattr(law, "samples_at_bound_", {}).items():
        if frac > 0.05 and name not in getattr(law, "at_bound_", []):
            out.append(
                f"the interval of {name} reaches its bound ({100 * frac:.0f}% of bootstrap refits end at the "
                f"bound): its upper/lower end is not determined by the data; {_pin_action(name)}"
            )
    boot = getattr(law, "bootstrap_", None)
    if boot is not None and boot.converged_fraction < 0.95:
        out.append(
            f"{100 * (1 - boot.converged_fraction):.0f}% of bootstrap refits did not report convergence: "
            "the intervals are wider than they look; add runs, or fit with a prior (--prior published:chinchilla)"
        )
    table = getattr(law, "table_", None)
    if table is not None and "D" in getattr(law, "variables", ()) and "N" in getattr(law, "variables", ()):
        spread = d_spread_at_fixed_n(table)
        if spread < D_SPREAD_WARN:
            out.append(
                f"D barely varies at fixed N (at most {np.exp(spread):.2f}x across runs of one model size): "
                "E, B and beta are weakly identified (E trades off against B/D^beta); train some sizes "
                "on several token budgets"
            )
    out += degeneracy_warnings(law)
    for name in ("E", "B"):
        iv = getattr(law, "intervals_", {}).get(name)
        if iv and iv[0] > 0 and iv[1] / max(iv[0], 1e-300) > 20 and name not in getattr(law, "at_bound_", []):
            out.append(
                f"{name} is poorly identified: its interval spans a factor {factor(iv[1] / iv[0])}; "
                f"{_pin_action(name)}"
            )
    if table is not None and table.notes:
        out.extend(table.notes)
    return out


def _small(x: float) -> str:
    """A loss-scale value as the reader takes it in: "≈ 0" for the 1e-9 a collapsed E reaches, else "= 1.23"."""
    return "≈ 0" if abs(x) < 1e-4 else f"= {x:.3g}"


def _pin_action(name: str) -> str:
    """What pins a parameter of L = E + A/N^alpha + B/D^beta down: runs that move its term."""
    if name in ("E", "A", "alpha"):
        return "add runs at larger N (4x the largest) on two token budgets, or fit with --prior published:chinchilla"
    if name in ("B", "beta"):
        return "train some model sizes on more token budgets (4x apart), or fit with --prior published:chinchilla"
    return "widen the range of runs, or fit with a prior (--prior)"


#: E below this fraction of the smallest observed loss counts as collapsed (no floor visible)
E_COLLAPSE_FRACTION = 0.05
#: a coefficient above this (N in parameters, D in tokens) has run away (it trades off with its exponent)
HUGE_COEFFICIENT = 1e5


def degeneracy_warnings(law: Any) -> list[str]:
    """E collapsing towards 0, coefficients running to huge values, parameters the table cannot
    identify (every run with one N, or one D): each with what to do."""
    out: list[str] = []
    params = getattr(law, "params_", {})
    table = getattr(law, "table_", None)
    unidentified = tuple(getattr(law, "unidentified_", ()))
    if unidentified:
        same = [
            v
            for v in getattr(law, "variables", ())
            if table is not None and np.ptp(np.log(getattr(table, v))) < 0.01
        ]
        out.append(
            f"every run has the same {' and '.join(same) or 'value of a variable'}: "
            f"{', '.join(unidentified)} are not identified (their intervals are unbounded, not zero-width); "
            f"vary {' and '.join(same) or 'it'} across runs"
        )
    if (
        "E" in params
        and table is not None
        and "E" not in unidentified
        and "E" not in getattr(law, "at_bound_", [])
    ):
        floor = E_COLLAPSE_FRACTION * float(table.loss.min())
        if params["E"] < floor:
            out.append(
                f"E collapses towards 0 (E {_small(params['E'])}, below {100 * E_COLLAPSE_FRACTION:.0f} % of the "
                "smallest loss): no loss floor is visible in these runs, so predictions far beyond them fall "
                "without limit; add runs at larger N and D, or fit with a prior on E"
            )
    for name in ("A", "B"):
        if name in params and name not in unidentified and params[name] > HUGE_COEFFICIENT:
            out.append(
                f"coefficient {name} = {params[name]:.3g} has run to a huge value (it trades off against its "
                "exponent and E): the form is barely constrained along that axis; widen the range of "
                + ("model sizes" if name == "A" else "token budgets")
                + " or fit with a prior"
            )
    return out


def frontier_bracketing(law: Any, table: RunTable) -> str | None:
    """A warning when every run lies on one side of the fitted compute-optimal frontier N_opt(C)."""
    from scalelab.fit.optimal import optimal_allocation

    p = getattr(law, "params_", {})
    if not {"E", "A", "B", "alpha", "beta"} <= set(p) or getattr(law, "unidentified_", ()):
        return None
    n_opt = optimal_allocation(p["E"], p["A"], p["B"], p["alpha"], p["beta"], table.C, law.accounting_)[
        "N_opt"
    ]
    side = np.log(table.N / n_opt)
    if not np.all(np.isfinite(side)) or (np.any(side < 0) and np.any(side > 0)):
        return None
    where = "larger" if side.min() > 0 else "smaller"
    fix = "smaller models trained on more tokens" if where == "larger" else "larger models on fewer tokens"
    return (
        f"the design never brackets the compute-optimal frontier: every run is {where} than N_opt(C) for "
        f"its own compute (by {np.exp(np.abs(side).min()):.2g}x to {np.exp(np.abs(side).max()):.2g}x), so "
        f"N_opt is extrapolated from one side; add runs of {fix} at the same compute"
    )


def d_spread_at_fixed_n(table: RunTable) -> float:
    """Largest spread of log D among runs sharing one N (within 1 %): 0 when no N repeats."""
    logn = np.log(table.N)
    logd = np.log(table.D)
    order = np.argsort(logn)
    best = 0.0
    start = 0
    for i in range(1, len(order) + 1):
        if i == len(order) or logn[order[i]] - logn[order[start]] > 0.01:
            ds = logd[order[start:i]]
            best = max(best, float(np.ptp(ds)) if ds.size > 1 else 0.0)
            start = i
    return best


def information_criteria(residuals: np.ndarray, n_params: int) -> dict[str, float]:
    """AIC/BIC (and AICc) from the Gaussian likelihood of log residuals, σ² profiled out."""
    r = np.asarray(residuals, dtype=np.float64)
    n = r.size
    rss = float(r @ r)
    ll = -0.5 * n * (np.log(2 * np.pi * max(rss, 1e-300) / n) + 1)
    k = n_params + 1  # + the noise variance
    aic = 2 * k - 2 * ll
    bic = k * np.log(n) - 2 * ll
    aicc = aic + (2 * k * (k + 1) / (n - k - 1) if n - k - 1 > 0 else np.inf)
    return {"log_likelihood": ll, "aic": aic, "aicc": aicc, "bic": bic, "n_params": n_params, "n": n}


def residual_diagnostics(table: RunTable, residuals: np.ndarray) -> dict[str, Any]:
    """Slope and correlation of log residuals against log N, log D and log C; sign runs along C."""
    r = np.asarray(residuals, dtype=np.float64)
    out: dict[str, Any] = {
        "log_residual_mean": float(r.mean()),
        "log_residual_sd": float(r.std(ddof=1)) if r.size > 1 else 0.0,
        "max_abs_log_residual": float(np.abs(r).max()),
    }
    for name, x in (("N", table.N), ("D", table.D), ("C", table.C)):
        lx = np.log(x)
        if np.ptp(lx) < 1e-12 or r.size < 3:
            out[f"vs_{name}"] = {"slope": 0.0, "corr": 0.0}
            continue
        slope = float(np.polyfit(lx, r, 1)[0])
        corr = float(np.corrcoef(lx, r)[0, 1]) if np.std(r) > 0 else 0.0
        out[f"vs_{name}"] = {"slope": slope, "corr": corr}
    signs = np.sign(r[np.argsort(table.C)])
    signs = signs[signs != 0]
    n_runs = int(1 + np.sum(signs[1:] != signs[:-1])) if signs.size else 0
    n_pos, n_neg = int(np.sum(signs > 0)), int(np.sum(signs < 0))
    if n_pos and n_neg:
        mu = 1 + 2 * n_pos * n_neg / (n_pos + n_neg)
        var = (
            2
            * n_pos
            * n_neg
            * (2 * n_pos * n_neg - n_pos - n_neg)
            / ((n_pos + n_neg) ** 2 * max(n_pos + n_neg - 1, 1))
        )
        z = (n_runs - mu) / np.sqrt(var) if var > 0 else 0.0
    else:
        z = 0.0
    out["sign_runs_along_C"] = {"runs": n_runs, "z": float(z)}
    flags = []
    for name in ("N", "D", "C"):
        if abs(out[f"vs_{name}"]["corr"]) > 0.5:
            flags.append(
                f"residuals trend with log {name} (corr {out[f'vs_{name}']['corr']:+.2f}): the form misfits"
            )
    if z < -3:
        flags.append(f"residual signs cluster along C (runs z = {z:.1f}): systematic misfit")
    out["flags"] = flags
    return out


def _law_like(law: Any, n_bootstrap: int | None = None) -> Any:
    params = law.get_params()
    if n_bootstrap is not None:
        params["n_bootstrap"] = n_bootstrap
    return type(law)(**params)


def _predict_rows(law: Any, table: RunTable) -> np.ndarray:
    return np.asarray(law.predict(table), dtype=np.float64)


def backtest(
    law: Any,
    table: RunTable,
    *,
    largest: int | None = None,
    threshold_flops: float | None = None,
    n_bootstrap: int | None = None,
    interval: str = "calibrated",
) -> dict[str, Any]:
    """Fit on runs below a compute threshold, predict the rest.

    Give ``largest=K`` (hold out the K largest-compute runs) or ``threshold_flops``. Returns per held-out
    run the actual and predicted loss, the relative error, the interval (``interval`` kind) and whether
    the actual loss lies inside it, plus summaries.
    """
    if (largest is None) == (threshold_flops is None):
        raise FitError("backtest: give exactly one of largest=K or threshold_flops")
    if largest is not None:
        if largest < 1 or largest >= len(table):
            raise FitError(f"backtest: largest={largest} must be between 1 and {len(table) - 1}")
        cut = np.sort(table.C)[-largest]
        held = table.C >= cut
    else:
        held = table.C > float(threshold_flops)  # type: ignore[arg-type]
    if not held.any() or held.all():
        raise FitError("backtest: the threshold leaves no runs to fit or none to predict")
    train = table.subset(~held)
    test = table.subset(held)
    sub = _law_like(law, n_bootstrap).fit(train)
    pred = _predict_rows(sub, test)
    rel = (pred - test.loss) / test.loss
    rows = []
    inside = None
    if interval == "calibrated" and getattr(sub, "calibration_", None) is not None or sub.n_bootstrap:
        lo, hi = sub.predict_interval(test, kind=interval)
        inside = (test.loss >= lo) & (test.loss <= hi)
    for i in range(len(test)):
        row = {
            "run": test.run_id[i] if test.run_id else None,
            "N": float(test.N[i]),
            "D": float(test.D[i]),
            "C": float(test.C[i]),
            "loss": float(test.loss[i]),
            "predicted": float(pred[i]),
            "relative_error": float(rel[i]),
        }
        if inside is not None:
            row["interval"] = [float(lo[i]), float(hi[i])]
            row["inside"] = bool(inside[i])
        rows.append(row)
    return {
        "train_runs": len(train),
        "test_runs": len(test),
        "threshold_flops": float(train.C.max()),
        "extrapolation_factor": float(test.C.max() / train.C.max()),
        "mean_abs_relative_error": float(np.mean(np.abs(rel))),
        "max_abs_relative_error": float(np.max(np.abs(rel))),
        "coverage": None if inside is None else float(np.mean(inside)),
        "interval_kind": interval if inside is not None else None,
        "confidence": sub.confidence,
        "rows": rows,
    }


def kfold(law: Any, table: RunTable, k: int = 5, seed: int = 0) -> dict[str, Any]:
    """K-fold cross-validation (folds over bootstrap clusters, so seeds of a config stay together)."""
    clusters = table.clusters()
    labels = np.unique(clusters)
    if k < 2 or k > labels.size:
        raise FitError(f"kfold: k={k} must be between 2 and the number of distinct configs ({labels.size})")
    rng = np.random.default_rng(seed)
    fold_of = dict(zip(rng.permutation(labels), np.arange(labels.size) % k, strict=True))
    fold = np.array([fold_of[c] for c in clusters])
    errs = np.empty(len(table))
    for f in range(k):
        test = fold == f
        sub = _law_like(law, 0).fit(table.subset(~test))
        errs[test] = np.log(_predict_rows(sub, table.subset(test))) - np.log(table.loss[test])
    return {
        "k": k,
        "rmse_log": float(np.sqrt(np.mean(errs**2))),
        "mean_abs_relative_error": float(np.mean(np.abs(np.expm1(errs)))),
        "per_fold_rmse_log": [float(np.sqrt(np.mean(errs[fold == f] ** 2))) for f in range(k)],
    }
