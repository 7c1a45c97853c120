"""The transfer figure: loss-vs-LR curves per width for each parametrization, and lr* against width."""

from __future__ import annotations

import io
import math
from pathlib import Path

from scalelab.io import atomic_write_bytes
from scalelab.transfer.analyze import TransferAnalysis


def plot_analysis(
    analysis: TransferAnalysis, path: str | Path, axis: str | None = None, dpi: int = 120
) -> Path:
    """Write a PNG: one panel of loss vs LR per parametrization (a curve per size, optimum marked) and a
    last panel of the fitted optimum LR against size on log–log axes with each parametrization's slope.

    `axis` ("width" or "depth") defaults to width when the analysis has a width slope, else depth.
    """
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    if axis is None:
        axes_fitted = {s.axis for s in analysis.slopes}
        axis = "width" if "width" in axes_fitted or not axes_fitted else "depth"

    params = sorted({s.parametrization for s in analysis.shapes})
    n = len(params) + 1
    fig = Figure(figsize=(4.2 * n, 3.6), layout="constrained")
    axes = fig.subplots(1, n, squeeze=False)[0]
    sizes = sorted({getattr(s, axis) for s in analysis.shapes})
    cmap = colormaps["viridis"]
    colour = {sz: cmap(i / max(1, len(sizes) - 1)) for i, sz in enumerate(sizes)}
    for ax, p in zip(axes, params, strict=False):
        finite_losses = []
        for s in (s for s in analysis.shapes if s.parametrization == p):
            pts = [(lr, v) for lr, v in zip(s.lrs, s.mean_losses, strict=True) if v is not None]
            if not pts:
                continue
            finite_losses += [v for _, v in pts]
            c = colour[getattr(s, axis)]
            ax.plot(*zip(*pts, strict=True), "o-", color=c, ms=3, lw=1, label=f"{axis} {getattr(s, axis)}")
            if s.fit is not None:
                ax.plot([s.fit.lr_opt], [s.fit.loss_at_opt], "*", color=c, ms=11, mec="k", mew=0.5)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("learning rate")
        ax.set_ylabel("final loss")
        ax.set_title(f"{p}: loss vs LR")
        if finite_losses:  # keep the basin readable: clip the blown-up tail
            lo = min(finite_losses)
            ax.set_ylim(lo - 0.02 * abs(lo), lo + max(0.5, 0.4 * abs(lo)))
        ax.legend(fontsize=7)
    ax = axes[-1]
    markers = "osD^v"
    for i, v in enumerate(s for s in analysis.slopes if s.axis == axis):
        sl = v.slope
        label = f"{v.parametrization}: slope {sl.slope:+.2f} [{sl.slope_interval[0]:+.2f}, {sl.slope_interval[1]:+.2f}]"
        line = ax.plot(sl.sizes, sl.lr_opts, markers[i % len(markers)], label=label)[0]
        xs = [min(sl.sizes), max(sl.sizes)]
        ax.plot(xs, [sl.predict(x) for x in xs], "-", color=line.get_color(), lw=1)
        members = [
            s
            for s in analysis.shapes
            if s.parametrization == v.parametrization
            and s.fit is not None
            and all(getattr(s, k, None) == val for k, val in v.fixed.items() if k in ("width", "depth"))
        ]
        for s in members:
            lo, hi = s.fit.lr_opt_interval if s.fit else (math.nan, math.nan)
            if math.isfinite(lo) and math.isfinite(hi):
                ax.plot([getattr(s, axis)] * 2, [lo, hi], "-", color=line.get_color(), lw=2, alpha=0.5)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel(axis)
    ax.set_ylabel("optimum learning rate")
    ax.set_title(f"optimum LR vs {axis} (tolerance ±{analysis.tolerance:g})")
    ax.legend(fontsize=7)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    out = Path(path)
    atomic_write_bytes(out, buf.getvalue())
    return out
