"""Did the transfer hold? Train the target shape at the transferred LR and at a bracket around it.

`run_check` trains the target run at lr × each multiplier (default ×½, ×1, ×2) for each seed and
`evaluate_check` decides: the check **passes** when the transferred point (×1) finished and its mean final
loss is within `tolerance` (relative) of the best point's: L(×1) ≤ L_best · (1 + tolerance). It fails when
the transferred point diverged or is worse than that — a wrong LR, or a transfer that did not hold. When the
best point is at the bracket's edge, the true optimum may lie further out; the result says so. With two or
more seeds, the seed-to-seed standard error of the gap is reported so that a small gap can be judged
against the noise.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from scalelab.errors import SpecError
from scalelab.spec import RunSpec, set_path

#: relative loss gap to the best bracket point within which a transfer passes
DEFAULT_CHECK_TOLERANCE = 0.01
DEFAULT_MULTIPLIERS = (0.5, 1.0, 2.0)


@dataclass
class CheckPoint:
    """One LR of the bracket: its losses per seed (None: diverged or failed) and their mean."""

    multiplier: float
    lr: float
    losses: list[float | None]
    statuses: list[str] = field(default_factory=list)

    @property
    def mean(self) -> float | None:
        if not self.losses or any(v is None for v in self.losses):
            return None
        return sum(self.losses) / len(self.losses)  # type: ignore[arg-type]


@dataclass
class CheckResult:
    """Pass/fail of a transfer check and the numbers behind it."""

    lr: float
    points: list[CheckPoint]
    tolerance: float
    passed: bool
    transferred_loss: float | None
    best_multiplier: float | None
    best_loss: float | None
    gap: float | None  # L(×1)/L_best − 1
    gap_se: float | None  # seed standard error of the gap (≥ 2 seeds)
    best_at_edge: bool
    reasons: list[str]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for p, raw in zip(d["points"], self.points, strict=True):
            p["mean"] = raw.mean
        return d


def evaluate_check(
    lr: float,
    multipliers: Sequence[float],
    losses: Sequence[Sequence[float | None]],
    *,
    tolerance: float = DEFAULT_CHECK_TOLERANCE,
    statuses: Sequence[Sequence[str]] | None = None,
) -> CheckResult:
    """Decide a check from its measured losses: `losses[i][s]` at lr × multipliers[i], seed s."""
    if len(multipliers) != len(losses) or not multipliers:
        raise SpecError("evaluate_check: one row of losses per multiplier is needed")
    if 1.0 not in [float(m) for m in multipliers]:
        raise SpecError("evaluate_check: the multipliers must include 1 (the transferred LR itself)")
    if tolerance < 0:
        raise SpecError(f"evaluate_check: tolerance must be ≥ 0, got {tolerance}")
    points = [
        CheckPoint(
            float(m),
            lr * float(m),
            [None if v is None or not math.isfinite(v) else float(v) for v in row],
            list(statuses[i]) if statuses else [],
        )
        for i, (m, row) in enumerate(zip(multipliers, losses, strict=True))
    ]
    points.sort(key=lambda p: p.multiplier)
    centre = next(p for p in points if p.multiplier == 1.0)
    finished = [p for p in points if p.mean is not None]
    reasons: list[str] = []
    best = min(finished, key=lambda p: p.mean) if finished else None  # type: ignore[arg-type, return-value]
    t_loss = centre.mean
    gap = gap_se = None
    if t_loss is None:
        passed = False
        reasons.append(f"the transferred LR {lr:.4g} diverged or failed")
    elif best is None or best.mean is None:
        passed = False
    else:
        gap = t_loss / best.mean - 1.0
        passed = gap <= tolerance
        if passed:
            reasons.append(
                f"loss at the transferred LR {t_loss:.4f} is within {tolerance:.2%} of the best "
                f"{best.mean:.4f} (×{best.multiplier:g}): gap {gap:.2%}"
            )
        else:
            reasons.append(
                f"loss at the transferred LR {t_loss:.4f} is {gap:.2%} above the best {best.mean:.4f} at "
                f"×{best.multiplier:g} (tolerance {tolerance:.2%}): the transferred LR is off"
            )
        n = len(centre.losses)
        if n >= 2 and best is not centre and len(best.losses) == n:
            diffs = [a / b - 1.0 for a, b in zip(centre.losses, best.losses, strict=True)]  # type: ignore[operator]
            m = sum(diffs) / n
            gap_se = math.sqrt(sum((d - m) ** 2 for d in diffs) / (n - 1) / n)
            reasons.append(f"seed standard error of the gap: {gap_se:.2%} over {n} seeds")
    edge = (
        best is not None
        and best is not centre
        and best.multiplier in (points[0].multiplier, points[-1].multiplier)
    )
    if edge and best is not None:
        reasons.append(
            f"the best point is at the edge of the bracket (×{best.multiplier:g}): the optimum may lie further "
            "out — widen the bracket to locate it"
        )
    return CheckResult(
        lr=lr,
        points=points,
        tolerance=tolerance,
        passed=passed,
        transferred_loss=t_loss,
        best_multiplier=best.multiplier if best else None,
        best_loss=best.mean if best else None,
        gap=gap,
        gap_se=gap_se,
        best_at_edge=bool(edge),
        reasons=reasons,
    )


def check_specs(
    spec: RunSpec, lr: float, multipliers: Sequence[float], seeds: Sequence[int]
) -> list[tuple[float, int, RunSpec]]:
    """(multiplier, seed, spec) of every run a check trains."""
    out = []
    for m in multipliers:
        s = set_path(spec, "train.lr", float(f"{lr * m:.6g}"), source="transfer check")
        for seed in seeds:
            out.append((float(m), int(seed), set_path(s, "train.seed", int(seed), source="transfer check")))
    return out


def run_check(
    spec: RunSpec,
    lr: float | None = None,
    *,
    multipliers: Sequence[float] = DEFAULT_MULTIPLIERS,
    seeds: Sequence[int] | None = None,
    tolerance: float = DEFAULT_CHECK_TOLERANCE,
    out_dir: str | Path | None = None,
    store: Any = None,
    loader_factory: Any = None,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> CheckResult:
    """Train the bracket and decide. `lr` defaults to `spec.train.lr` (the transferred LR).

    With `out_dir`, each run is a recorded run (`run_training`) in `out_dir/runs/<run_id>/` (re-running
    skips finished ones: their record.json is read back); without, runs are trained in this process.
    """
    from scalelab.transfer.runner import train_in_process

    lr = float(lr if lr is not None else spec.train.lr)
    seeds = list(seeds) if seeds is not None else [spec.train.seed]
    if not seeds:
        raise SpecError("run_check: at least one seed is needed")
    results: dict[tuple[float, int], dict[str, Any]] = {}
    for m, seed, s in check_specs(spec, lr, multipliers, seeds):
        if out_dir is not None:
            from scalelab.train.run import run_training

            run_dir = Path(out_dir) / "runs" / s.run_id
            rec = _finished_record(run_dir)
            if rec is None:
                rec = run_training(s, run_dir, resume=True, store=store, loader_factory=loader_factory)
            res = {"status": rec["status"], "eval_loss": rec.get("eval_loss"), "run_id": s.run_id}
        else:
            res = train_in_process(s, store=store, loader_factory=loader_factory)
        res = {**res, "multiplier": m, "seed": seed, "lr": s.train.lr}
        results[(m, seed)] = res
        if progress is not None:
            progress(res)
    mults = [float(m) for m in multipliers]
    losses = [
        [results[(m, sd)]["eval_loss"] if results[(m, sd)]["status"] == "done" else None for sd in seeds]
        for m in mults
    ]
    statuses = [[str(results[(m, sd)]["status"]) for sd in seeds] for m in mults]
    return evaluate_check(lr, mults, losses, tolerance=tolerance, statuses=statuses)


def _finished_record(run_dir: Path) -> dict[str, Any] | None:
    import json

    try:
        rec = json.loads((run_dir / "record.json").read_text())
    except (OSError, ValueError):
        return None
    return rec if rec.get("status") in ("done", "diverged") else None
