"""Library entry points behind `scalelab fit` and `scalelab recommend`.

* `fit_source(source, law=..., bootstrap=..., holdout=..., seed=...) -> FitReport`: fit a study directory
  (its `registry.sqlite`, runs with status "done") or a table file (CSV, Parquet, JSONL).
* `fit_study(study_dir, ...)`: the same, for a study directory (defaults from its study.toml [study.fit]).
* `recommend(fit_json_path, compute=... | target_loss=...)`: N_opt, D_opt and the predicted loss for a
  budget, or the compute needed for a target loss, from a saved fit.json.

fit.json (``FitReport.to_json()``) shape::

    {"format": "scalelab.fit/1", "created_at", "source",
     "settings": {law, bootstrap, holdout, seed, delta, confidence, n_params, loss_column, n_jobs},
     "data": {n_runs, compute_source, N_range, D_range, C_range, loss_range, has_seed, groups, notes},
     "fit": {law, form, params, intervals, derived, derived_intervals, theta, convergence, bootstrap
             {n, unit, seed, converged_fraction, theta_samples}, residuals, accounting, range, unidentified,
             calibration {method, floor, growth, scores, folds, noise, reason} | null, warnings, settings},
     "information_criteria": {aic, aicc, bic, log_likelihood, n_params, n},
     "residual_diagnostics": {...}, "comparison": [{law, aic, bic, delta_aic, delta_bic, ...}],
     "backtest": {train_runs, test_runs, threshold_flops, mean_abs_relative_error, coverage, rows} | null,
     "cross_validation": {k, rmse_log, mean_abs_relative_error, per_fold_rmse_log} | null,
     "recommendation": {compute_flops, N_opt, D_opt, loss, tokens_per_param, intervals (loss: calibrated,
                        loss_parameter_only), interval_kind, interval_kinds, calibration {method, folds,
                        max_extrapolation_seen, verdict, ...}, accounting, extrapolation {factor,
                        factor_N, factor_D, far}} | null (from the study's [study.target]),
     "groups": {shared, separate, delta_aic_separate_minus_shared, preferred_by_aic, ...} | null,
     "warnings": [...]}
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from scalelab.errors import FitError, ScalelabError
from scalelab.fit.laws import _floats, law_from_dict, make_law
from scalelab.fit.progress import report as report_progress
from scalelab.fit.table import COMPUTE_TABLE, RunTable, load_table, make_table
from scalelab.fit.validate import (
    backtest,
    frontier_bracketing,
    information_criteria,
    kfold,
    residual_diagnostics,
)
from scalelab.io import atomic_write_text
from scalelab.record import FIT_FIELDS

log = logging.getLogger(__name__)

FORMAT = "scalelab.fit/1"
COMPARE_LAWS = ("chinchilla", "kaplan", "power:C")


@dataclass
class FitReport:
    """A fitted law plus its validation, ready to render or to write as fit.json."""

    law: Any
    table: RunTable
    settings: dict[str, Any]
    criteria: dict[str, float]
    diagnostics: dict[str, Any]
    comparison: list[dict[str, Any]] = field(default_factory=list)
    backtest: dict[str, Any] | None = None
    cross_validation: dict[str, Any] | None = None
    recommendation: dict[str, Any] | None = None
    groups: dict[str, Any] | None = None
    extra_warnings: list[str] = field(default_factory=list)
    created_at: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))

    @property
    def warnings(self) -> list[str]:
        out = list(self.law.warnings_)
        out += self.diagnostics.get("flags", [])
        out += self.extra_warnings
        if self.recommendation and self.recommendation.get("extrapolation", {}).get("far"):
            out.append(extrapolation_warning(self.recommendation))
        if self.groups and "shared" in self.groups:
            out.append(
                f"the table has {len(self.groups['shared']['groups'])} groups; the main fit pools them "
                f"(see 'groups': {self.groups['preferred_by_bic']} exponents preferred by BIC)"
            )
            if self.groups.get("transfers") is False:
                out.append(self.groups["verdict"])
        if self.backtest and self.backtest.get("coverage") is not None and self.backtest["coverage"] < 0.5:
            out.append(
                f"backtest: only {100 * self.backtest['coverage']:.0f}% of held-out runs fall inside their "
                f"{self.backtest.get('interval_kind') or ''} intervals: read every interval as too narrow; "
                "add runs between the largest and the target compute and fit again"
            )
        return out

    def to_dict(self) -> dict[str, Any]:
        return _floats(
            {
                "format": FORMAT,
                "created_at": self.created_at,
                "source": self.table.source,
                "settings": self.settings,
                "data": self.table.describe(),
                "fit": self.law.to_dict(),
                "information_criteria": self.criteria,
                "residual_diagnostics": self.diagnostics,
                "comparison": self.comparison,
                "backtest": self.backtest,
                "cross_validation": self.cross_validation,
                "recommendation": self.recommendation,
                "groups": self.groups,
                "warnings": self.warnings,
            }
        )

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    def save(self, path: str | Path) -> Path:
        """Write fit.json atomically (a temporary file renamed into place)."""
        path = check_output_path(path)
        atomic_write_text(path, self.to_json())
        return path


def check_output_path(path: str | Path) -> Path:
    """`path` as a place for fit.json, or a FitError naming --out (checked before a fit, and at saving)."""
    path = Path(path)
    if not path.name or path.is_dir():
        raise FitError(f"--out {str(path)!r}: a directory, not a file; give a file path such as fit.json")
    folder = next((p for p in path.absolute().parents if p.exists()), None)
    if folder is not None and not folder.is_dir():
        raise FitError(f"--out {str(path)!r}: {str(folder)!r} is a file, not a folder; give a path in a folder")
    return path


def check_prediction(law: Any, n: float, d: float, actual: float) -> dict[str, Any]:
    """A fitted law of N and D against one finished run: predicted loss, relative error, the default
    (calibrated) interval, whether the actual loss fell inside it, and the calibration's verdict there.
    Without an interval (no calibration, no bootstrap) ``interval``/``inside`` are None and
    ``interval_error`` says why. The one check behind the report's predicted-vs-actual and `study add-run`."""
    pred = float(np.asarray(law.predict([n], [d]), dtype=float)[0])
    out: dict[str, Any] = {
        "actual": float(actual),
        "predicted": pred,
        "relative_error": (float(actual) - pred) / pred,
        "interval": None,
        "inside": None,
    }
    try:
        lo, hi = law.predict_interval([n], [d])
    except FitError as err:
        out["interval_error"] = str(err)
        return out
    out["interval"] = [float(lo[0]), float(hi[0])]
    out["inside"] = bool(lo[0] <= float(actual) <= hi[0])
    cal = getattr(law, "calibration_", None)
    out["interval_kind"] = "calibrated" if cal is not None else "parameter-only"
    if cal is not None:
        out["verdict"] = cal.describe(law._coords(law._X([n], [d])))["verdict"]
    return out


def extrapolation_warning(rec: dict[str, Any]) -> str:
    """How far a recommendation reaches beyond the runs, in C, N and D, with the calibration's verdict."""
    ext = rec["extrapolation"]
    parts = [f"{ext['factor']:.3g}x in compute"]
    for k in ("N", "D"):
        if f"factor_{k}" in ext:
            parts.append(f"{ext[f'factor_{k}']:.3g}x in {k}")
    msg = f"the recommendation extrapolates beyond the largest run: {', '.join(parts)}"
    verdict = (rec.get("calibration") or {}).get("verdict")
    msg = f"{msg}; {verdict}" if verdict else msg
    return f"{msg}; to narrow it, add a run half-way to the target in log compute (`scalelab study advise`)"


def preferred_law_warning(
    law: str,
    comparison: list[dict[str, Any]],
    fitted: dict[str, Any],
    target_compute: float | None,
    rec: dict[str, Any] | None = None,
) -> str | None:
    """A warning when another law form is preferred by ΔAIC ≥ 10 on the same runs, with what it predicts
    at the target (at the recommended N and D for laws of N and D)."""
    ok = [c for c in comparison if "aic" in c]
    mine = next((c for c in ok if c["law"] == law), None)
    if mine is None or mine["delta_aic"] < DELTA_AIC_WARN:
        return None
    best = min(ok, key=lambda c: c["aic"])
    msg = (
        f"law {best['law']!r} fits these runs far better than {law!r} (ΔAIC = {mine['delta_aic']:.1f} >= "
        f"{DELTA_AIC_WARN:g}): the {law} form is likely wrong over this range"
    )
    other = fitted.get(best["law"])
    if target_compute is not None and other is not None:
        try:
            if tuple(other.variables) == ("C",):
                pred = float(other.predict([target_compute])[0])
                where = f"at the target {target_compute:.3g} FLOPs"
            elif rec and "N_opt" in rec:
                pred = float(other.predict([rec["N_opt"]], [rec["D_opt"]])[0])
                where = f"at the recommended N = {rec['N_opt']:.3g}, D = {rec['D_opt']:.3g}"
            else:
                pred = float(other.optimal(target_compute)["loss"])
                where = f"at the target {target_compute:.3g} FLOPs"
            mine_pred = f" (this law: {rec['loss']:.4g})" if rec and "loss" in rec else ""
            msg += f"; {where} it predicts a loss of {pred:.4g}{mine_pred}"
        except (FitError, KeyError, ValueError, AttributeError):
            pass
    return msg + "; refit with --law " + best["law"] + " and compare"


DELTA_AIC_WARN = 10.0


# --------------------------------------------------------------------------------------- sources
def _study_fit_defaults(study_dir: Path) -> dict[str, Any]:
    """[study.fit] and [study.target] of the study as it ran: its validated study.json (which includes
    `--set` overrides), else the study.toml copy, when present and valid."""
    from scalelab.spec import FitSpec, TargetSpec, read_toml

    try:
        if (study_dir / "study.json").is_file():
            data = json.loads((study_dir / "study.json").read_text())
        elif (study_dir / "study.toml").is_file():
            data = read_toml(study_dir / "study.toml").get("study", {})
        else:
            return {}
        fit = FitSpec.model_validate(data.get("fit", {}))
        target = TargetSpec.model_validate(data.get("target", {}))
    except (ScalelabError, ValueError, OSError) as err:
        log.warning("%s: fit defaults not read (%s)", study_dir, err)
        return {}
    return {"fit": fit, "target": target}


def table_from_study(study_dir: str | Path, n_params: str = "non_embedding", loss: str = "eval") -> RunTable:
    """Runs with status "done" from a study's registry as a `RunTable` (C from models/flops.py; a `group`
    column when the design grouped its runs: `study.sources` or `study.group_by`)."""
    study_dir = Path(study_dir)
    db = study_dir / "registry.sqlite"
    if not db.is_file():
        raise FitError(f"{study_dir}: no registry.sqlite here (is this a study directory?)")
    try:
        from scalelab.registry import Registry
    except ImportError as err:  # pragma: no cover - depends on the checkout
        raise FitError(f"cannot read {db}: the study registry is unavailable ({err})") from None
    reg = Registry(db, create=False)
    try:
        rows = reg.runs(status="done", role="study")  # target runs check the fit; they are not fitted
    finally:
        close = getattr(reg, "close", None)
        if close:
            close()
    if not rows:
        raise FitError(f"{db}: no runs with status 'done' to fit")
    n_key, l_key = FIT_FIELDS["N"][n_params], FIT_FIELDS["loss"][loss]
    cols: dict[str, list[Any]] = {"N": [], "D": [], "C": [], "loss": [], "seed": [], "run_id": []}
    for r in rows:
        rid = r.get("run_id", "?")
        d_key, c_key = FIT_FIELDS["D"]["any"], FIT_FIELDS["C"]["any"]
        for key in (n_key, d_key, c_key, l_key):
            if r.get(key) is None:
                raise FitError(f"{db}: run {rid}: field '{key}' is missing; re-run it or mark it failed")
        cols["N"].append(r[n_key])
        cols["D"].append(r[d_key])
        cols["C"].append(r[c_key])
        cols["loss"].append(r[l_key])
        cols["seed"].append(r.get("seed") if r.get("seed") is not None else 0)
        cols["run_id"].append(rid)
    groups = [(r.get("point") or {}).get("group") for r in rows]
    return make_table(
        cols["N"],
        cols["D"],
        cols["loss"],
        cols["C"],
        seed=cols["seed"],
        group=[g if g is not None else "" for g in groups] if any(g is not None for g in groups) else None,
        run_id=cols["run_id"],
        compute_source=COMPUTE_TABLE,
        source=str(db),
    )


def parse_holdout(holdout: str | int | None) -> int:
    """ "largest:K" or K → K (0: no backtest)."""
    if holdout is None or holdout == "" or holdout == 0:
        return 0
    if isinstance(holdout, int):
        k = holdout
    else:
        kind, _, num = str(holdout).partition(":")
        if kind != "largest" or not num.strip().isdigit():
            raise FitError(f"--holdout {holdout!r}: expected largest:K, e.g. largest:3")
        k = int(num)
    if k < 0:
        raise FitError(f"--holdout: K must be >= 0, got {k}")
    return k


def fit_table(
    table: RunTable,
    law: str = "chinchilla",
    *,
    bootstrap: int = 1000,
    holdout: str | int | None = None,
    seed: int = 0,
    delta: float = 1e-3,
    confidence: float = 0.9,
    n_jobs: int | None = None,
    compare: bool = True,
    target_compute: float | None = None,
    target_loss: float | None = None,
    extra_settings: dict[str, Any] | None = None,
    prior: str | Path | None = None,
    cv_folds: int = 5,
) -> FitReport:
    """Fit `law` to `table` with bootstrap intervals, validate it and (given a target) recommend.

    ``prior``: ``published:NAME`` (``chinchilla``/``hoffmann2022``, ``epoch``/``besiroglu2024``) or an
    earlier fit.json — then
    the chinchilla law is fitted by MAP with a Laplace posterior instead of the bootstrap
    (see `scalelab.fit.bayes`)."""
    k_hold = parse_holdout(holdout)
    kw = {"delta": delta, "n_bootstrap": bootstrap, "confidence": confidence, "seed": seed, "n_jobs": n_jobs}
    if prior is not None:
        from scalelab.fit.bayes import MAPChinchillaLaw, parse_prior

        if law != "chinchilla":
            raise FitError(f"--prior works with --law chinchilla, not {law!r}")
        pr = parse_prior(prior)
        est = MAPChinchillaLaw(pr, confidence=confidence, seed=seed, delta=delta).fit(table)
    else:
        report_progress(f"fitting {law}")
        est = make_law(law, **kw).fit(table)
    n_par = len(est.param_names)
    crit = information_criteria(est.residuals_, n_par) if hasattr(est, "residuals_") else {}
    diag = residual_diagnostics(table, est.residuals_) if hasattr(est, "residuals_") else {}
    comparison = []
    fitted: dict[str, Any] = {}
    if compare:
        report_progress("comparing laws")
        for other in COMPARE_LAWS:
            try:
                o = est if other == law else make_law(other, delta=delta, calibrate=False).fit(table)
            except FitError as err:
                comparison.append({"law": other, "error": str(err)})
                continue
            fitted[other] = o
            ic = information_criteria(o.residuals_, len(o.param_names))
            comparison.append({"law": other, **ic, "converged": bool(o.result_.converged)})
        ok = [c for c in comparison if "aic" in c]
        if ok:
            best_aic = min(c["aic"] for c in ok)
            best_bic = min(c["bic"] for c in ok)
            for c in ok:
                c["delta_aic"] = c["aic"] - best_aic
                c["delta_bic"] = c["bic"] - best_bic
    bt = None
    if k_hold and law == "isoflop":
        raise FitError(
            "--holdout: the isoflop law predicts optima, not single runs; backtest with --law chinchilla"
        )
    if k_hold:
        report_progress("backtest")
        bt = backtest(est, table, largest=k_hold, n_bootstrap=min(bootstrap, 200))
    rec = None
    if target_compute is not None and hasattr(est, "optimal"):
        rec = est.optimal(target_compute)
    elif target_loss is not None and hasattr(est, "compute_for_loss"):
        rec = est.compute_for_loss(target_loss)
    cv = None
    if cv_folds and prior is None and law != "isoflop":
        n_configs = np.unique(table.clusters()).size
        if n_configs >= max(2 * cv_folds, 10):
            try:
                report_progress("cross-validation")
                cv = kfold(est, table, k=cv_folds, seed=seed)
            except FitError as err:
                cv = {"error": str(err)}
    groups = None
    if table.group is not None and len(table.groups) > 1:
        from scalelab.fit.groups import compare_groups

        try:
            groups = compare_groups(
                table,
                delta=delta,
                n_bootstrap=min(bootstrap, 200),
                confidence=confidence,
                seed=seed,
                n_jobs=n_jobs,
            )
        except FitError as err:
            groups = {"error": str(err)}
    settings = {
        "law": law,
        "prior": None if prior is None else str(prior),
        "bootstrap": bootstrap,
        "holdout": f"largest:{k_hold}" if k_hold else None,
        "seed": seed,
        "delta": delta,
        "confidence": confidence,
        "n_jobs": n_jobs,
        **(extra_settings or {}),
    }
    settings["cv_folds"] = cv_folds
    extra = [
        w
        for w in (
            preferred_law_warning(law, comparison, fitted, target_compute, rec),
            frontier_bracketing(est, table),
        )
        if w
    ]
    return FitReport(est, table, settings, crit, diag, comparison, bt, cv, rec, groups, extra)


def fit_source(
    source: str | Path,
    law: str | None = None,
    bootstrap: int | None = None,
    holdout: str | int | None = None,
    seed: int | None = None,
    *,
    delta: float | None = None,
    confidence: float = 0.9,
    n_params: str | None = None,
    loss: str | None = None,
    n_jobs: int | None = None,
    compare: bool = True,
    prior: str | Path | None = None,
) -> FitReport:
    """Fit a study directory or a table file. Unset options come from the study's [study.fit]
    (for a study directory) or the FitSpec defaults."""
    from scalelab.spec import FitSpec

    path = Path(source)
    if path.is_dir():
        defaults = _study_fit_defaults(path)
        spec: FitSpec = defaults.get("fit") or FitSpec()
        target = defaults.get("target")
        n_params = n_params or spec.n_params
        loss = loss or spec.loss
        table = table_from_study(path, n_params=n_params, loss=loss)
    elif path.exists():
        spec = FitSpec()
        target = None
        table = load_table(path)
    else:
        raise FitError(f"{path}: no such study directory or table file")
    if holdout is None and spec.holdout_largest:
        holdout = spec.holdout_largest
    if prior is None and spec.prior:
        prior = spec.prior
    return fit_table(
        table,
        law or spec.law,
        bootstrap=spec.bootstrap if bootstrap is None else bootstrap,
        holdout=holdout,
        seed=spec.seed if seed is None else seed,
        delta=spec.huber_delta if delta is None else delta,
        confidence=confidence,
        n_jobs=n_jobs,
        compare=compare,
        target_compute=getattr(target, "compute_flops", None),
        target_loss=getattr(target, "loss", None),
        extra_settings={"n_params": n_params, "loss_column": loss} if path.is_dir() else None,
        prior=prior,
    )


def fit_study(study_dir: str | Path, **kw: Any) -> FitReport:
    """`fit_source` for a study directory; also writes DIR/report/fit.json unless ``save=False``."""
    save = kw.pop("save", True)
    path = Path(study_dir)
    if not path.is_dir():
        raise FitError(f"{path}: not a study directory")
    rep = fit_source(path, **kw)
    if save:
        rep.save(default_output(path))
    return rep


def default_output(source: str | Path) -> Path:
    """Where `scalelab fit` writes: DIR/report/fit.json for a study, else fit.json beside the table."""
    p = Path(source)
    if p.is_dir():
        return p / "report" / "fit.json"
    return p.with_name(p.stem + ".fit.json")


# ------------------------------------------------------------------------------------- recommend
def load_fit(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as err:
        raise FitError(f"{path}: cannot read fit JSON ({err.strerror or err})") from None
    except ValueError as err:
        raise FitError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or "fit" not in data:
        raise FitError(
            f"{path}: not a scalelab fit.json (expected format {FORMAT!r}); run `scalelab fit` first"
        )
    return data


def recommend(
    fit_json_path: str | Path, compute: float | None = None, target_loss: float | None = None
) -> dict[str, Any]:
    """N_opt, D_opt, tokens/param and the predicted loss (with intervals) for `compute` FLOPs, or the
    compute needed to reach `target_loss`, from a saved fit.json."""
    from scalelab.fit.optimal import check_budget

    check_budget(compute, target_loss)
    data = load_fit(fit_json_path)
    conv = data.get("fit", {}).get("convergence") or {}
    if conv.get("converged") is False:
        raise FitError(
            f"{fit_json_path}: the fit did not converge ({conv.get('message', 'no message')}), so it cannot "
            "recommend anything; add runs or change --law, and fit again"
        )
    try:
        law = law_from_dict(data["fit"])
    except (KeyError, TypeError, ValueError) as err:
        raise FitError(
            f"{fit_json_path}: fit.params unusable ({type(err).__name__}: {err}); fit again"
        ) from None
    needed = "optimal" if compute is not None else "compute_for_loss"
    if not hasattr(law, needed) or getattr(law, "variables", ("C",)) in (("N",), ("D",)):
        raise FitError(
            f"{fit_json_path}: a '{data['fit']['law']}' fit cannot "
            + ("recommend N and D" if compute is not None else "give the compute for a target loss")
            + "; fit with --law chinchilla or --law isoflop"
            + ("" if compute is not None else " (or power:C)")
        )
    c_max = data.get("data", {}).get("C_range", [None, None])[1]
    if compute is not None:
        out = law.optimal(compute)
    else:
        out = law.compute_for_loss(float(target_loss))  # type: ignore[arg-type]
    if c_max and "extrapolation" not in out and np.isfinite(out["compute_flops"]):
        factor = float(out["compute_flops"]) / float(c_max)
        out["extrapolation"] = {"largest_run_flops": c_max, "factor": factor, "far": factor > 100}
    stale = ("the recommendation extrapolates", "extrapolating ")
    warnings = [w for w in data.get("warnings", []) if not w.startswith(stale)]
    warnings += list(out.pop("warnings", []))
    if out.get("extrapolation", {}).get("far"):
        warnings.append(extrapolation_warning(out))
    if getattr(law, "calibration_", None) is None and getattr(law, "variables", ()) != ("C",):
        warnings.append(
            f"{fit_json_path}: no calibration stored (an older fit.json, or calibrate=False): the loss interval "
            "is parameter-only and will be too narrow beyond the runs; re-run `scalelab fit`"
        )
    out["law"] = data["fit"]["law"]
    out["fit_json"] = str(fit_json_path)
    out["n_params"] = data.get("settings", {}).get("n_params")
    out["warnings"] = warnings
    return _floats(out)


def check_against_fit(study_dir: str | Path, row: dict[str, Any]) -> dict[str, Any] | None:
    """The study's fit (report/fit.json) at an added run's (N, D): predicted loss, its calibrated
    interval and whether the run's actual loss fell inside. None when there is no usable fit."""
    path = Path(study_dir) / "report" / "fit.json"
    if not path.is_file():
        return None
    data = load_fit(path)
    if data["fit"].get("variables") != ["N", "D"]:
        return None
    settings = data.get("settings", {})
    n = row.get("n_params_total" if settings.get("n_params") == "total" else "n_params")
    actual = row.get("final_train_loss" if settings.get("loss_column") == "train" else "eval_loss")
    if n is None or actual is None or row.get("tokens") is None:
        return None
    return {**check_prediction(law_from_dict(data["fit"]), n, row["tokens"], actual), "fit_json": str(path)}
