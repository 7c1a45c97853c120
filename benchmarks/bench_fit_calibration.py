"""Do the fitted intervals hold on larger runs the fit never saw, and what does calibrating them cost?

Coverage (one JSON line per level, plus a Markdown per-case table with ``--markdown``): on every public
backtest in ``../shared/reference`` (`scalelab.fit.coverage.reference_cases`: the larger runs of each
ladder held out) and, when a study directory is given (``--study runs/quickstart``), on its 3
largest-compute runs, fit `chinchilla` on the rest and check each held-out loss against the calibrated
interval (value) and against the parameter-only bootstrap prediction interval (baseline). The baseline
is the fair one because it is exactly what scalelab reported before calibration, from the same fit,
the same bootstrap draws and the same runs; only the model-form error term differs. Goals (issue 16):
pooled coverage ≥ 0.90 at 95 % and ≥ 0.70 at 80 %, median half-width ≤ 3× the median error.

Speed (`benchmarks/harness.py`: interleaved A/B rounds, wall and CPU rates with min/median/max, load):
fit + calibration + 1,000 bootstrap refits on Chinchilla's runs against fit + 1,000 bootstrap without
calibration (what a fit cost before). Same data, same seed, same workers, so the ratio (fits per second,
calibrated over uncalibrated) is the cost of the calibration alone. Goal: ≥ 1/3 (at most 3× slower).

IsoFLOP bootstrap: `IsoFLOPLaw` fit + 1,000 bootstrap draws against a whole Chinchilla fit + 1,000
bootstrap refits (one worker each, no calibration) on the same 54 simulated IsoFLOP runs (6 budgets ×
9 sizes), interleaved; the issue's goal is "at the parametric law's speed", so the parametric law's
fit and bootstrap on the same runs is the yardstick.

Usage: python benchmarks/bench_fit_calibration.py [--rounds 3] [--bootstrap 200] [--study DIR] [--markdown]
Skips (prints a note, exits 0) when ../shared/reference is absent.
"""

from __future__ import annotations

import os

for _k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS"):
    os.environ[_k] = "1"

import argparse  # noqa: E402
import logging  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from harness import Side, compare, emit, measured, skip, timed  # noqa: E402

from scalelab.fit import coverage, reference  # noqa: E402
from scalelab.fit.laws import ChinchillaLaw  # noqa: E402

REF = Path(__file__).resolve().parents[1].parent / "shared" / "reference"


def cases(study: Path | None) -> list[tuple[str, object, np.ndarray]]:
    out = coverage.reference_cases(REF)
    if study is not None:
        from scalelab.fit.api import table_from_study

        t = table_from_study(study)
        cut = np.sort(t.C)[-3]
        out.append((f"{study.name} study, 3 largest held out", t, t.C < cut))
    return out


def coverage_results(args: argparse.Namespace) -> tuple[list[dict], list[str]]:
    results, lines = [], []
    header = (
        "| case | train → test runs | extrapolation C / N / D | median error | 95 %: calibrated (param-only) "
        "| 80 %: calibrated (param-only) | median half-width 95 % | calibration |"
    )
    lines += [header, "|" + "---|" * 8]
    for name, table, mask in cases(args.study):
        r = coverage.evaluate_split(table, mask, n_bootstrap=args.bootstrap, n_jobs=1)
        results.append(r)
        lv = r["levels"]
        cov = {
            (lev, k): float(np.mean(lv[lev][k]["inside"]))
            for lev in ("0.95", "0.8")
            for k in ("calibrated", "prediction")
        }
        cal = r["calibration"] or {}
        lines.append(
            f"| {name} | {r['train_runs']} → {r['test_runs']} | {r['extrapolation_C']:.3g}× / "
            f"{r['extrapolation_N']:.3g}× / {r['extrapolation_D']:.3g}× | "
            f"{100 * np.median(np.abs(r['relative_error'])):.2f} % | "
            f"{cov[('0.95', 'calibrated')]:.0%} ({cov[('0.95', 'prediction')]:.0%}) | "
            f"{cov[('0.8', 'calibrated')]:.0%} ({cov[('0.8', 'prediction')]:.0%}) | "
            f"{100 * np.median(lv['0.95']['calibrated']['half_width']):.2f} % | "
            f"{cal.get('method', '—')}, {cal.get('folds', 0)} folds |"
        )
    return results, lines


def speed(args: argparse.Namespace) -> dict:
    """Fits per second with and without calibration (fit + 1,000 bootstrap each), interleaved."""
    t = reference.chinchilla_epoch(REF / "chinchilla_epoch.csv")

    def fit(calibrate: bool) -> Side:
        return lambda: timed(
            lambda: (
                ChinchillaLaw(n_bootstrap=1000, seed=0, n_jobs=args.jobs, calibrate=calibrate).fit(t) and 1.0
            )
        )

    return compare(
        "fit_calibration_cost_chinchilla",
        fit(True),
        fit(False),
        "fits/s (fit + 1,000 bootstrap; value with calibration, baseline without)",
        rounds=args.rounds,
        goal="ratio >= 1/3 (calibration costs at most 3x)",
        runs=len(t),
    )


def isoflop_speed(args: argparse.Namespace) -> dict:
    """IsoFLOP fit + 1,000 bootstrap draws against a Chinchilla fit + 1,000 bootstrap on the same runs."""
    from scalelab.fit import synthetic
    from scalelab.fit.isoflop import IsoFLOPLaw

    N, D = synthetic.isoflop_design(np.geomspace(1e17, 1e20, 6), 9, span=4.0)
    t = synthetic.simulate(synthetic.HOFFMANN, N, D, noise=0.005, seed=0)
    return compare(
        "fit_isoflop_bootstrap_1000",
        lambda: timed(lambda: IsoFLOPLaw(n_bootstrap=1000, seed=0).fit(t) and 1.0),
        lambda: timed(lambda: ChinchillaLaw(n_bootstrap=1000, n_jobs=1, calibrate=False).fit(t) and 1.0),
        "fits/s (fit + 1,000 bootstrap draws: IsoFLOP vs Chinchilla, same runs)",
        rounds=args.rounds,
        goal="ratio >= 1 (at the parametric law's speed)",
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--bootstrap", type=int, default=200)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--study", type=Path, default=None, help="also backtest this study directory")
    ap.add_argument("--markdown", action="store_true", help="print the per-case table")
    args = ap.parse_args()
    if not REF.is_dir():
        emit(skip("fit_calibration", f"{REF} not present"))
        return
    logging.getLogger("scalelab").setLevel(logging.ERROR)
    results, lines = coverage_results(args)
    s = coverage.summarize(results)
    for level, goal in (("0.95", 0.90), ("0.8", 0.70)):
        row = s[level]
        emit(
            measured(
                f"fit_interval_coverage_{level}",
                row["calibrated"]["coverage"],
                row["prediction"]["coverage"],
                "fraction of held-out larger runs inside (calibrated vs parameter-only)",
                held_out_runs=s["held_out_runs"],
                cases=len(results),
                median_abs_relative_error=s["median_abs_relative_error"],
                half_width_over_error=row["calibrated"]["half_width_over_error"],
                goal=f"coverage >= {goal}, half_width_over_error <= 3",
                met=bool(
                    row["calibrated"]["coverage"] >= goal and row["calibrated"]["half_width_over_error"] <= 3
                ),
            )
        )
    emit(speed(args))
    emit(isoflop_speed(args))
    if args.markdown:
        print("\n".join(lines))


if __name__ == "__main__":
    main()
