"""The report's reading of `fit.json` (format `scalelab.fit/1`, written by `scalelab fit`).

Every number the report prints about the fit comes from here, formatted from the JSON as written, so
the executive summary and `fit.json` cannot disagree.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from scalelab.units import count, flops

log = logging.getLogger(__name__)


def fmt(x: Any, spec: str = ".4g") -> str:
    """A number as the report prints it ('—' when absent)."""
    if x is None:
        return "—"
    try:
        return format(float(x), spec)
    except (TypeError, ValueError):
        return str(x)


def fmt_interval(iv: Any, spec: str = ".4g") -> str:
    if not iv or len(iv) != 2 or iv[0] is None:
        return ""
    return f" [{fmt(iv[0], spec)}, {fmt(iv[1], spec)}]"


def count_interval(x: Any, iv: Any) -> str:
    """A count with its interval, human-readable: '1.23M [0.98M, 1.6M]'."""
    if not iv or len(iv) != 2 or iv[0] is None:
        return count(x)
    return f"{count(x)} [{count(iv[0])}, {count(iv[1])}]"


@dataclass
class FitView:
    raw: dict[str, Any]

    @classmethod
    def load(cls, path: Path) -> FitView | None:
        try:
            return cls(json.loads(path.read_text()))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as err:
            log.warning("%s: unreadable fit.json (%s); the report shows no fit", path, err)
            return None

    @property
    def fit(self) -> dict[str, Any]:
        return self.raw.get("fit", {})

    @property
    def confidence(self) -> float:
        return float(self.raw.get("settings", {}).get("confidence", 0.9))

    def describe(self) -> str:
        f = self.fit
        data = self.raw.get("data", {})
        boot = f.get("bootstrap", {})
        conv = f.get("convergence", {})
        return (
            f"Law {f.get('law')}: {f.get('form')}, fitted to {data.get('n_runs')} runs "
            f"({self.raw.get('settings', {}).get('loss_column', 'loss')}); Huber loss on log residuals; "
            f"{boot.get('n', 0)} bootstrap resamples by {boot.get('unit') or 'run'}; "
            f"{int(100 * self.confidence)} % intervals. Optimizer "
            f"{'converged' if conv.get('converged') else 'did NOT converge'} (objective {fmt(conv.get('objective'))})."
        )

    def parameter_rows(self) -> list[tuple[str, str]]:
        f = self.fit
        rows = [
            (k, fmt(v) + fmt_interval(f.get("intervals", {}).get(k))) for k, v in f.get("params", {}).items()
        ]
        for k, v in f.get("derived", {}).items():
            rows.append((k, fmt(v) + fmt_interval(f.get("derived_intervals", {}).get(k))))
        ic = self.raw.get("information_criteria") or {}
        if ic:
            rows.append(("AIC / BIC", f"{fmt(ic.get('aic'))} / {fmt(ic.get('bic'))}"))
        for c in self.raw.get("comparison") or []:
            rows.append((f"compare: {c.get('law')}", f"AIC {fmt(c.get('aic'))}, BIC {fmt(c.get('bic'))}"))
        rows += self.noise_rows()
        rows += self.prior_rows()
        rows += self.group_rows()
        return rows

    def group_rows(self) -> list[tuple[str, str]]:
        """Per group: its exponents with intervals (separate fits), and whether the law transfers."""
        grp = self.raw.get("groups") or {}
        if "separate" not in grp:
            return []
        rows = []
        for g, p in grp["separate"].get("params", {}).items():
            iv = (grp["separate"].get("intervals") or {}).get(g, {})
            rows.append(
                (
                    f"group {g}",
                    f"alpha {fmt(p['alpha'])}{fmt_interval(iv.get('alpha'))}, "
                    f"beta {fmt(p['beta'])}{fmt_interval(iv.get('beta'))}",
                )
            )
        if grp.get("verdict"):
            rows.append(("across groups", str(grp["verdict"])))
        return rows

    def prior_rows(self) -> list[tuple[str, str]]:
        """The prior of a MAP fit, the posterior, and how much the data moved each term."""
        pvp = self.fit.get("prior_vs_posterior")
        if not pvp:
            return []
        rows = [("prior", f"{self.fit.get('prior', {}).get('source', '?')} (MAP fit, Laplace posterior)")]
        for k, r in pvp.items():
            moved = "the data narrowed it" if r["width_ratio"] < 0.8 else "the prior still dominates"
            rows.append(
                (
                    f"prior → posterior: {k}",
                    f"{fmt(r['prior_mean'])} ± {fmt(r['prior_sd'], '.3g')} → {fmt(r['posterior_mean'])} ± "
                    f"{fmt(r['posterior_sd'], '.3g')} (width {r['width_ratio']:.2f}× the prior's: {moved})",
                )
            )
        return rows

    def noise_rows(self) -> list[tuple[str, str]]:
        """The run-to-run spread from seed replicates, and the calibration it floors."""
        cal = self.fit.get("calibration")
        if cal is None:
            return [("interval calibration", "none (parameter-only intervals: too narrow beyond the runs)")]
        noise = cal.get("noise")
        if noise:
            spread = (
                f"{100 * noise['log_sd']:.2g} % (sd of log loss between seeds, {noise['configs']} points "
                f"with 2+ seeds); the floor of every interval"
            )
        else:
            spread = "not measured (one seed per point): add design.seeds = [0, 1] to measure it"
        rows = [("run-to-run spread (seeds)", spread)]
        from scalelab.fit.calibrate import source_text

        rows.append(("interval calibration", source_text(cal)))
        return rows

    @staticmethod
    def _loss_interval_name(rec: dict[str, Any]) -> str:
        kind = (rec.get("interval_kinds") or {}).get("loss", "")
        if "calibrated" in kind:
            return "calibrated interval: model-form error from backtests + parameter noise"
        return "parameter-only interval: no model-form error"

    @staticmethod
    def _calibration_rows(rec: dict[str, Any]) -> list[tuple[str, str]]:
        cal = rec.get("calibration")
        if not cal:
            return []
        if cal.get("method") == "fallback":
            source = f"none from these runs ({cal.get('reason', '')}); a stated conservative rule"
        else:
            seen = cal.get("max_extrapolation_seen", {})
            source = (
                f"{cal.get('folds')} rolling-origin backtest folds, reaching {fmt(seen.get('C'), '.3g')}× in "
                f"compute, {fmt(seen.get('N'), '.3g')}× in N, {fmt(seen.get('D'), '.3g')}× in D"
            )
        return [("interval calibration", source), ("verdict", str(cal.get("verdict", "")))]

    def recommendation_rows(self) -> list[tuple[str, str]]:
        rec = self.raw.get("recommendation")
        if not rec:
            return []
        iv = rec.get("intervals", {})
        if "N_opt" in rec:
            rows = [
                ("compute budget", flops(rec.get("compute_flops"))),
                (f"N_opt ({self.n_kind} parameters)", count_interval(rec.get("N_opt"), iv.get("N_opt"))),
                ("D_opt (tokens)", count_interval(rec.get("D_opt"), iv.get("D_opt"))),
                (
                    "tokens per parameter",
                    count_interval(rec.get("tokens_per_param"), iv.get("tokens_per_param")),
                ),
                (
                    "predicted loss",
                    fmt(rec.get("loss"))
                    + fmt_interval(iv.get("loss"))
                    + f" ({int(100 * self.confidence)} % {self._loss_interval_name(rec)})",
                ),
            ]
            if iv.get("loss_parameter_only"):
                rows.append(
                    (
                        "predicted loss, parameter-only",
                        fmt(rec.get("loss"))
                        + fmt_interval(iv["loss_parameter_only"])
                        + " (bootstrap only: no model-form error; too narrow beyond the runs)",
                    )
                )
            rows += self._calibration_rows(rec)
            ex = rec.get("extrapolation") or {}
            if ex:
                parts = [f"{fmt(ex.get('factor'), '.3g')}× the largest run's compute"]
                parts += [
                    f"{fmt(ex[f'factor_{k}'], '.3g')}× in {k}" for k in ("N", "D") if f"factor_{k}" in ex
                ]
                rows.append(("extrapolation", ", ".join(parts)))
            if rec.get("accounting"):
                rows.append(("FLOP accounting", str(rec["accounting"])))
            return rows
        if "target_loss" in rec:
            return [
                ("target loss", fmt(rec.get("target_loss"))),
                (
                    "compute needed",
                    f"{fmt(rec.get('compute_flops'), '.3g')} FLOPs"
                    + fmt_interval(iv.get("compute_flops"), ".3g"),
                ),
            ]
        return []

    def backtest_rows(self) -> list[tuple[str, str]]:
        bt = self.raw.get("backtest")
        if not bt:
            return []
        rows = [
            ("fitted on / predicted", f"{bt.get('train_runs')} runs / {bt.get('test_runs')} runs"),
            ("extrapolation", f"{fmt(bt.get('extrapolation_factor'), '.3g')}× the largest fitted compute"),
            (
                "mean |relative error|",
                fmt(100 * bt["mean_abs_relative_error"], ".2f") + " %"
                if bt.get("mean_abs_relative_error") is not None
                else "—",
            ),
            ("inside interval", "—" if bt.get("coverage") is None else f"{100 * bt['coverage']:.0f} %"),
        ]
        for r in bt.get("rows", []):
            inside = "" if r.get("inside") is None else (" inside" if r["inside"] else " OUTSIDE")
            rows.append(
                (
                    f"run {r.get('run') or ''} (N={fmt(r.get('N'), '.3g')}, D={fmt(r.get('D'), '.3g')})",
                    f"actual {fmt(r.get('loss'))}, predicted {fmt(r.get('predicted'))}"
                    f"{fmt_interval(r.get('interval'))}{inside}",
                )
            )
        return rows

    def warnings(self) -> list[str]:
        return [str(w) for w in self.raw.get("warnings", [])]

    @property
    def n_kind(self) -> str:
        """Which parameters the fit's N counts: 'non-embedding' (Kaplan et al.) or 'total'."""
        return "total" if self.n_params_key == "n_params_total" else "non-embedding"

    @property
    def n_params_key(self) -> str:
        """The registry column the fit used as N (non-embedding or total parameters)."""
        return "n_params_total" if self.raw.get("settings", {}).get("n_params") == "total" else "n_params"

    def predicted_vs_actual(self, runs: list[dict[str, Any]], loss_key: str) -> list[dict[str, Any]]:
        """For each finished run: the fit's prediction at its (N, D) with the single-run prediction
        interval, the actual loss, and whether it fell inside."""
        from scalelab.fit.api import check_prediction

        law = self._law()
        if law is None:
            return []
        out = []
        for r in runs:
            n, d, actual = r.get(self.n_params_key), r.get("tokens"), r.get(loss_key)
            if not n or not d or actual is None:
                continue
            try:
                check = check_prediction(law, n, d, actual)
            except Exception as err:  # noqa: BLE001 - a report without this row beats no report
                log.info("no prediction for %s: %s", r["run_id"], err)
                continue
            if check.get("interval_error"):
                log.info("no prediction interval for %s: %s", r["run_id"], check["interval_error"])
            row = {"run_id": r["run_id"], "N": n, "D": d, **check}
            out.append(row)
        return out

    def _law(self) -> Any:
        if self.fit.get("variables") != ["N", "D"]:
            return None
        try:
            from scalelab.fit.laws import law_from_dict

            return law_from_dict(self.fit)
        except Exception as err:  # noqa: BLE001 - a report without curves beats no report
            log.warning("cannot rebuild the fitted law: %s", err)
            return None

    def optimizer(self) -> Callable[[float], dict[str, Any]] | None:
        """C ↦ the law's compute-optimal allocation (N_opt, D_opt, loss, intervals), when it has one."""
        law = self._law()
        return getattr(law, "optimal", None) if law is not None else None

    def predictor(self) -> Callable[[np.ndarray, np.ndarray], np.ndarray] | None:
        """L(N, D) of the fitted law, or None for laws that are not functions of N and D."""
        law = self._law()
        if law is None:
            return None
        return lambda n, d: np.asarray(law.predict(n, d), dtype=float)
