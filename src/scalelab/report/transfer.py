"""The report's transfer section: does the tuned learning rate carry over to the target size?

Reads an LR-sweep study (the study itself when its design sweeps `train.lr`, or one named with
`scalelab report DIR --transfer SWEEP_DIR`) through `scalelab.transfer.analyze`, and turns the verdicts into
rows, a figure and one sentence for the executive summary.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class TransferView:
    source: str
    slope_rows: list[tuple[str, str]] = field(default_factory=list)
    optimum_rows: list[tuple[str, str]] = field(default_factory=list)
    sentence: str = ""
    recommended_lr: float | None = None
    png: bytes | None = None
    warnings: list[str] = field(default_factory=list)
    analysis: dict[str, Any] = field(default_factory=dict)


def is_lr_sweep(study_dir: Path) -> bool:
    """True when the study's design sweeps the learning rate (a grid axis or list runs on `train.lr`)."""
    try:
        design = json.loads((study_dir / "study.json").read_text()).get("design", {})
    except (OSError, ValueError):
        return False
    if "train.lr" in (design.get("axes") or {}):
        return True
    return any("train.lr" in run for run in design.get("runs") or [])


def _fmt_interval(iv: Any) -> str:
    if not iv or None in iv or not all(math.isfinite(x) for x in iv):
        return ""
    return f" [{iv[0]:.3g}, {iv[1]:.3g}]"


def transfer_view(sweep_dir: Path, out_dir: Path, target_width: int | None = None) -> TransferView | None:
    """Analyze the sweep and describe it; None when it is not an analysable sweep (logged, not raised)."""
    from scalelab.errors import ScalelabError
    from scalelab.transfer.analyze import analyze_study
    from scalelab.transfer.plot import plot_analysis

    try:
        analysis = analyze_study(sweep_dir)
    except ScalelabError as err:
        log.warning("%s: no transfer analysis (%s)", sweep_dir, err)
        return None
    view = TransferView(source=str(sweep_dir), analysis=analysis.to_dict(), warnings=list(analysis.warnings))
    for s in analysis.slopes:
        view.slope_rows.append(
            (
                f"{s.parametrization}: ln lr* vs ln {s.axis}",
                f"slope {s.slope.slope:.3g}{_fmt_interval(s.slope.slope_interval)} over {s.axis}s "
                f"{', '.join(f'{x:g}' for x in s.slope.sizes)} → {s.verdict} (|slope| ≤ {s.tolerance:g} counts as flat)",
            )
        )
    for shape in analysis.shapes:
        label = f"{shape.parametrization}, width {shape.width}, depth {shape.depth}"
        if shape.fit is None:
            view.optimum_rows.append((label, f"no optimum: {shape.error or 'not bracketed'}"))
            continue
        f = shape.fit
        view.optimum_rows.append(
            (
                label,
                (
                    f"lr* {f.lr_opt:.3g}{_fmt_interval(f.lr_opt_interval)}; loss +{f.sensitivity_x2:.3g} at 2·lr*, "
                    f"+{f.sensitivity_half:.3g} at lr*/2"
                    + ("" if f.bracketed else " (optimum NOT bracketed)")
                ),
            )
        )
    flat = [s for s in analysis.slopes if s.verdict == "transfers" and s.axis == "width"]
    if flat:
        best = flat[0]
        width = target_width or max(best.slope.sizes)
        view.recommended_lr = best.slope.predict(width)
        view.sentence = (
            f"Learning rate: under {best.parametrization} the optimum stays put across widths "
            f"{min(best.slope.sizes):g}–{max(best.slope.sizes):g} (slope {best.slope.slope:.2g}); use lr ≈ "
            f"{view.recommended_lr:.3g} with {best.parametrization} at the target size."
        )
    elif analysis.slopes:
        view.sentence = (
            "Learning rate: no parametrization kept the optimum flat across widths in the sweep; "
            "re-tune the learning rate near the target size before the big run."
        )
    try:
        path = plot_analysis(analysis, out_dir / "transfer.png")
        view.png = Path(path).read_bytes()
    except Exception as err:  # noqa: BLE001 - a report without this figure beats no report
        log.warning("transfer figure not drawn: %s", err)
    return view
