"""Analyse an LR-transfer sweep: per-shape optima, how they move with width/depth, and a verdict.

Input rows come from a study's registry (`rows_from_registry`) or from an in-process sweep
(`rows_from_results`). `analyze_rows` groups them by shape — (parametrization, width, depth, init_std,
global_batch_size) — fits each shape's LR optimum (`optimum.fit_optimum`), then for each
parametrization fits ln lr* against ln width (and against ln depth when depth was swept).

Verdict for a slope s with interval [lo, hi] and tolerance τ (default `DEFAULT_SLOPE_TOLERANCE`):
  * ``transfers``       |s| ≤ τ — the tuned LR stays put;
  * ``does not transfer`` |s| > τ and the interval excludes 0 — the optimum moves with size;
  * ``inconclusive``    otherwise (too noisy to tell: add seeds or sizes).
Shapes whose best grid point is at the edge of the LR grid are listed in `warnings`: their optimum is a
bound, not an estimate, and the sweep's LR range should be widened.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scalelab.errors import FitError, RegistryError
from scalelab.transfer.optimum import OptimumFit, SlopeFit, fit_optimum, fit_slope

#: |slope of ln lr* vs ln width| below which the optimum is called flat (the test uses the same value)
DEFAULT_SLOPE_TOLERANCE = 0.3


@dataclass(frozen=True)
class SweepRow:
    """One run of a sweep: its shape, LR, seed and final loss (None: diverged, failed or unfinished)."""

    parametrization: str
    width: int
    depth: int
    lr: float
    seed: int
    loss: float | None
    status: str = "done"
    init_std: float = 0.02
    batch_size: int = 0

    @property
    def shape(self) -> tuple[str, int, int, float, int]:
        return (self.parametrization, self.width, self.depth, self.init_std, self.batch_size)


def _row_from_config(cfg: dict[str, Any], status: str, loss: float | None) -> SweepRow:
    m, t = cfg["model"], cfg["train"]
    ok = status == "done" and loss is not None and math.isfinite(float(loss))
    return SweepRow(
        parametrization=str(m.get("parametrization", "sp")),
        width=int(m["width"]),
        depth=int(m["depth"]),
        lr=float(t["lr"]),
        seed=int(t.get("seed", 0)),
        loss=float(loss) if ok else None,  # type: ignore[arg-type]
        status=status,
        init_std=float(m.get("init_std", 0.02)),
        batch_size=int(t.get("global_batch_size", 0)),
    )


def rows_from_registry(study_dir: str | Path, loss: str = "eval") -> tuple[list[SweepRow], dict[str, int]]:
    """Rows of every finished run (done, diverged, failed, timeout) of a study and the status counts."""
    from scalelab.registry import Registry

    path = Path(study_dir) / "registry.sqlite"
    if not path.exists():
        raise RegistryError(
            f"{study_dir}: no registry.sqlite (run the sweep with `scalelab study run` first)"
        )
    key = "eval_loss" if loss == "eval" else "final_train_loss"
    with Registry(path, create=False) as reg:
        runs = reg.runs()
        counts = reg.counts()
    rows = []
    for r in runs:
        if r["status"] in ("pending", "running"):
            continue
        cfg = json.loads(r["config_json"])
        rows.append(_row_from_config(cfg, r["status"], r.get(key)))
    return rows, counts


def rows_from_results(results: Iterable[dict[str, Any]], loss: str = "eval") -> list[SweepRow]:
    """Rows from `sweep.run_sweep_in_process` results."""
    key = "eval_loss" if loss == "eval" else "final_train_loss"
    return [_row_from_config(r["spec"].model_dump(mode="json"), r["status"], r.get(key)) for r in results]


@dataclass
class ShapeResult:
    """The LR sweep of one shape and its fitted optimum."""

    parametrization: str
    width: int
    depth: int
    init_std: float
    batch_size: int
    lrs: list[float]
    mean_losses: list[float | None]
    seeds: list[int]
    fit: OptimumFit | None
    error: str | None = None
    #: seed-to-seed variance of the final loss at each LR (None: < 2 finished seeds) — the fit's weights
    loss_variances: list[float | None] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "parametrization": self.parametrization,
            "width": self.width,
            "depth": self.depth,
            "init_std": self.init_std,
            "batch_size": self.batch_size,
            "lrs": self.lrs,
            "mean_losses": self.mean_losses,
            "seeds": self.seeds,
            "loss_variances": self.loss_variances,
            "fit": self.fit.to_dict() if self.fit else None,
            "error": self.error,
        }


@dataclass
class SlopeVerdict:
    """A slope of ln lr* against ln width (or depth) for one parametrization, and what it means."""

    parametrization: str
    axis: str
    fixed: dict[str, Any]  # the other shape coordinates held fixed
    slope: SlopeFit
    verdict: str
    tolerance: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "parametrization": self.parametrization,
            "axis": self.axis,
            "fixed": self.fixed,
            **self.slope.to_dict(),
            "verdict": self.verdict,
            "tolerance": self.tolerance,
        }


@dataclass
class TransferAnalysis:
    """Everything `scalelab transfer analyze` shows."""

    shapes: list[ShapeResult]
    slopes: list[SlopeVerdict]
    tolerance: float
    counts: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def slope(self, parametrization: str, axis: str = "width") -> SlopeVerdict | None:
        """The first slope of this parametrization along `axis` (None when there is none)."""
        for s in self.slopes:
            if s.parametrization == parametrization and s.axis == axis:
                return s
        return None

    def recommend_lr(self, parametrization: str, width: int, depth: int | None = None) -> float | None:
        """The LR the width fit predicts at (width, depth) — a transferred LR when the slope is flat."""
        cands = [s for s in self.slopes if s.parametrization == parametrization and s.axis == "width"]
        if depth is not None:
            cands = [s for s in cands if s.fixed.get("depth") == depth] or cands
        return cands[0].slope.predict(width) if cands else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "tolerance": self.tolerance,
            "counts": self.counts,
            "shapes": [s.to_dict() for s in self.shapes],
            "slopes": [s.to_dict() for s in self.slopes],
            "warnings": self.warnings,
        }


def verdict_for(slope: SlopeFit, tolerance: float) -> str:
    """'transfers', 'does not transfer' or 'inconclusive' (see the module docstring)."""
    lo, hi = slope.slope_interval
    if abs(slope.slope) <= tolerance:
        return "transfers"
    if lo > 0 or hi < 0:
        return "does not transfer"
    return "inconclusive"


def _shape_result(key: tuple[str, int, int, float, int], rows: Sequence[SweepRow], **kw: Any) -> ShapeResult:
    lrs = sorted({r.lr for r in rows})
    seeds = sorted({r.seed for r in rows})
    cell = {(r.lr, r.seed): r.loss for r in rows}
    table = [[cell.get((lr, s)) for s in seeds] for lr in lrs]
    means: list[float | None] = []
    variances: list[float | None] = []
    for row in table:
        vals = [v for v in row if v is not None]
        means.append(sum(vals) / len(vals) if len(vals) == len(row) else None)
        if len(vals) >= 2:
            m = sum(vals) / len(vals)
            variances.append(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))
        else:
            variances.append(None)
    fit, err = None, None
    try:
        fit = fit_optimum(lrs, table, **kw)
    except FitError as e:
        err = str(e)
    p, w, d, s, b = key
    return ShapeResult(p, w, d, s, b, lrs, means, seeds, fit, err, variances)


def analyze_rows(
    rows: Sequence[SweepRow],
    *,
    tolerance: float = DEFAULT_SLOPE_TOLERANCE,
    window: int = 2,
    n_bootstrap: int = 200,
    seed: int = 0,
    level: float = 0.9,
) -> TransferAnalysis:
    """Fit every shape's optimum and every parametrization's slope across width and depth."""
    if not rows:
        raise FitError("no finished runs to analyse")
    groups: dict[tuple[str, int, int, float, int], list[SweepRow]] = defaultdict(list)
    for r in rows:
        groups[r.shape].append(r)
    shapes = [
        _shape_result(k, groups[k], window=window, n_bootstrap=n_bootstrap, seed=seed, level=level)
        for k in sorted(groups)
    ]
    warnings = []
    for s in shapes:
        where = f"{s.parametrization} width={s.width} depth={s.depth}"
        if s.fit is None:
            warnings.append(f"{where}: no optimum ({s.error})")
        elif not s.fit.bracketed:
            warnings.append(
                f"{where}: best LR {s.fit.best_grid_lr:.3g} is at the edge of the sampled grid "
                "(or next to a diverged point): the optimum is a bound; widen the LR range"
            )
    slopes: list[SlopeVerdict] = []
    for axis in ("width", "depth"):
        other = "depth" if axis == "width" else "width"
        by_line: dict[tuple[Any, ...], list[ShapeResult]] = defaultdict(list)
        for s in shapes:
            if s.fit is not None:
                by_line[(s.parametrization, getattr(s, other), s.init_std, s.batch_size)].append(s)
        for (p, fixed_val, init_std, bs), members in sorted(by_line.items()):
            members.sort(key=lambda m: getattr(m, axis))
            if len({getattr(m, axis) for m in members}) < 2:
                continue
            sl = fit_slope(
                [getattr(m, axis) for m in members],
                [m.fit for m in members if m.fit is not None],
                axis=axis,
                level=level,
                seed=seed,
            )
            fixed = {other: fixed_val, "init_std": init_std, "batch_size": bs}
            slopes.append(SlopeVerdict(p, axis, fixed, sl, verdict_for(sl, tolerance), tolerance))
    return TransferAnalysis(shapes, slopes, tolerance, warnings=warnings)


def analyze_study(study_dir: str | Path, *, loss: str = "eval", **kw: Any) -> TransferAnalysis:
    """`analyze_rows` on a study directory's registry (runs still pending or running are not used)."""
    rows, counts = rows_from_registry(study_dir, loss=loss)
    analysis = analyze_rows(rows, **kw)
    analysis.counts = counts
    unfinished = counts.get("pending", 0) + counts.get("running", 0)
    if unfinished:
        analysis.warnings.insert(0, f"{unfinished} runs not finished yet: the analysis uses the others")
    return analysis
