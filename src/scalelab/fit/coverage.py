"""Does an interval hold on runs the fit never saw? Held-out evaluation of calibrated and parameter-only
intervals, on the public reference ladders and on simulated studies whose true law is known.

`evaluate_split(table, train_mask)` fits a law on the training runs and checks every held-out run
against its calibrated and parameter-only intervals at several levels; `reference_cases(root)` names
the public backtests (larger runs of each ladder held out); `summarize(results)` pools them. The
figures in `docs/calibration.md` come from `benchmarks/bench_fit_calibration.py`, which calls these.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from scalelab.fit import reference
from scalelab.fit.laws import make_law
from scalelab.fit.table import RunTable

LEVELS = (0.95, 0.9, 0.8)


def evaluate_split(
    table: RunTable,
    train: np.ndarray,
    *,
    law: str = "chinchilla",
    levels: Sequence[float] = LEVELS,
    n_bootstrap: int = 200,
    seed: int = 0,
    n_jobs: int | None = 1,
) -> dict[str, Any]:
    """Fit `law` on ``table[train]``, predict ``table[~train]``; per level, whether each held-out loss
    lies inside the calibrated and the parameter-only interval, and the intervals' relative half-widths."""
    train = np.asarray(train, dtype=bool)
    tr, te = table.subset(train), table.subset(~train)
    est = make_law(law, n_bootstrap=n_bootstrap, seed=seed, n_jobs=n_jobs).fit(tr)
    pred = np.asarray(est.predict(te), dtype=np.float64)
    out: dict[str, Any] = {
        "train_runs": len(tr),
        "test_runs": len(te),
        "extrapolation_C": float(te.C.max() / tr.C.max()),
        "extrapolation_N": float(te.N.max() / tr.N.max()),
        "extrapolation_D": float(te.D.max() / tr.D.max()),
        "relative_error": ((te.loss - pred) / pred).tolist(),
        "calibration": est.calibration_.describe() if est.calibration_ is not None else None,
        "levels": {},
    }
    for level in levels:
        row: dict[str, Any] = {}
        for kind in ("calibrated", "prediction"):
            lo, hi = est.predict_interval(te, kind=kind, level=level)
            row[kind] = {
                "inside": ((te.loss >= lo) & (te.loss <= hi)).tolist(),
                "half_width": (0.5 * (hi - lo) / pred).tolist(),
            }
        out["levels"][str(level)] = row
    return out


def reference_cases(root: str | Path) -> list[tuple[str, RunTable, np.ndarray]]:
    """The public backtests: (name, table, training mask) for each reference set present under `root`.

    Chinchilla: runs up to 1e21 and up to 3e20 FLOPs → the larger ones (13× and 43× in compute).
    open_lm (Li et al. 2025, tuned learning rate): sizes below 1B → the 1.18B runs. Gadre et al. (2024),
    each data set: the 11M–411M ladder → the 1.4B and 6.9B runs."""
    root = Path(root)
    cases: list[tuple[str, RunTable, np.ndarray]] = []
    f = root / "chinchilla_epoch.csv"
    if f.is_file():
        t = reference.chinchilla_epoch(f)
        cases.append(("chinchilla (Epoch), C <= 1e21 -> larger", t, t.C <= 1e21))
        cases.append(("chinchilla (Epoch), C <= 3e20 -> larger", t, t.C <= 3e20))
    f = root / "li2025_openlm_last_ckpt.csv"
    if f.is_file():
        t = reference.openlm_li2025(f)
        cases.append(("open_lm (Li 2025), N < 1B -> 1.18B", t, t.N < 1e9))
    folder = root / "gadre2024"
    if folder.is_dir():
        for ds in reference.GADRE_DATASETS:
            t = reference.gadre2024(folder, ds)
            cases.append((f"Gadre 2024 {ds}, N < 1B -> 1.4B, 6.9B", t, t.N < 1e9))
    return cases


def summarize(results: Sequence[dict[str, Any]], levels: Sequence[float] = LEVELS) -> dict[str, Any]:
    """Pooled coverage of every held-out run over all cases, and the median relative half-width against
    the median relative error of the same predictions."""
    err = np.abs(np.concatenate([r["relative_error"] for r in results]))
    out: dict[str, Any] = {"held_out_runs": int(err.size), "median_abs_relative_error": float(np.median(err))}
    for level in levels:
        row = {}
        for kind in ("calibrated", "prediction"):
            inside = np.concatenate([r["levels"][str(level)][kind]["inside"] for r in results])
            hw = np.concatenate([r["levels"][str(level)][kind]["half_width"] for r in results])
            row[kind] = {
                "coverage": float(np.mean(inside)),
                "median_half_width": float(np.median(hw)),
                "half_width_over_error": float(np.median(hw) / max(np.median(err), 1e-12)),
            }
        out[str(level)] = row
    return out


def simulate_misspecified(
    kind: str, N: np.ndarray, D: np.ndarray, noise: float, rng: np.random.Generator
) -> np.ndarray:
    """Losses from a law the Chinchilla form cannot express exactly, times log-normal noise.

    ``curvature``: the N exponent drifts with log N; ``broken``: the N power law bends at 3e8 params;
    ``kaplan``: the Kaplan et al. (2020) form (no irreducible term)."""
    law = MISSPECIFIED.get(kind)
    if law is None:
        raise ValueError(f"unknown misspecification {kind!r}: use one of {', '.join(MISSPECIFIED)}")
    return law(np.asarray(N, float), np.asarray(D, float)) * np.exp(noise * rng.standard_normal(np.size(N)))


def _curvature(N: np.ndarray, D: np.ndarray) -> np.ndarray:
    """Hoffmann et al.'s law whose N exponent falls by 0.03 per e-fold of N above 1e8."""
    u = np.log(N / 1e8)
    n_term = 406.4 / 1e8**0.34 * np.exp(-(0.34 - 0.015 * u) * u)
    return 1.69 + n_term + 410.7 / D**0.28


def _broken(N: np.ndarray, D: np.ndarray) -> np.ndarray:
    """Hoffmann et al.'s law whose N exponent drops from 0.34 to 0.24 at 3e8 parameters (continuous)."""
    nb = 3e8
    n_term = np.where(N < nb, 406.4 / N**0.34, 406.4 / nb**0.34 * (N / nb) ** -0.24)
    return 1.69 + n_term + 410.7 / D**0.28


def _kaplan(N: np.ndarray, D: np.ndarray) -> np.ndarray:
    return ((8.8e13 / N) ** (0.076 / 0.095) + 5.4e13 / D) ** 0.095


MISSPECIFIED: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "curvature": _curvature,
    "broken": _broken,
    "kaplan": _kaplan,
}
