"""Matplotlib figures for the report, rendered headless (Agg) to PNG bytes."""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from scalelab.units import count, flops, si  # noqa: E402

DPI = 110
#: line styles that tell apart the token budgets of one model size in the loss curves
LINESTYLES = ("-", "--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)))


def n_label(n_key: str) -> str:
    """The axis label of N, saying which parameters it counts."""
    return "N, total parameters" if n_key == "n_params_total" else "N, non-embedding parameters"


def _png(fig: Any, as_figure: bool = False) -> Any:
    """PNG bytes of `fig` (closed afterwards), or `fig` itself when `as_figure` (to restyle, in a notebook)."""
    if as_figure:
        return fig
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _style(
    ax: Any, xlabel: str, ylabel: str, title: str, legend_columns: int = 1, legend_outside: bool = False
) -> None:
    """The report's look: log x axis, labels, light grid, small legend (beside the axes when outside)."""
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    if legend_outside:
        ax.legend(
            fontsize=7, ncol=legend_columns, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False
        )
    else:
        ax.legend(fontsize=7 if legend_columns > 1 else 8, ncol=legend_columns)


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The run's metrics.jsonl as a list of dicts (unreadable lines skipped: the file may be in flight)."""
    path = Path(run_dir) / "metrics.jsonl"
    rows = []
    try:
        with open(path) as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    continue
    except OSError:
        return []
    return rows


def _color_by(values: Sequence[float]) -> Callable[[float], Any]:
    lo, hi = math.log(min(values)), math.log(max(values))
    cmap = plt.get_cmap("viridis")
    return lambda v: cmap(0.0 if hi == lo else 0.9 * (math.log(v) - lo) / (hi - lo))


def loss_curves(
    runs: list[dict[str, Any]],
    spikes: dict[str, list[tuple[float, float]]] | None = None,
    as_figure: bool = False,
) -> Any:
    """Training loss (and held-out evals as markers) against tokens, one line per run: colour by N, line
    style by token budget within a size; `spikes` (run id → [(tokens, loss)]) marked with red crosses."""
    series = []
    for r in runs:
        m = read_metrics(r["run_dir"]) if r.get("run_dir") else []
        steps = [x for x in m if "loss" in x and x.get("loss") is not None and "tokens" in x]
        evals = [x for x in m if x.get("eval_loss") is not None and "tokens" in x]
        if steps:
            series.append((r, steps, evals))
    if not series:
        return None
    color = _color_by([max(1, r.get("n_params") or 1) for r, _, _ in series])
    budgets: dict[Any, list[Any]] = {}
    for r, _, _ in series:
        budgets.setdefault(r.get("n_params"), []).append(r.get("tokens") or 0)
    series.sort(key=lambda x: (x[0].get("n_params") or 0, x[0].get("tokens") or 0))
    fig, ax = plt.subplots(figsize=(9, 4.8))
    for r, steps, evals in series:
        c = color(max(1, r.get("n_params") or 1))
        style = LINESTYLES[
            sorted(set(budgets[r.get("n_params")])).index(r.get("tokens") or 0) % len(LINESTYLES)
        ]
        ax.plot(
            [s["tokens"] for s in steps],
            [s["loss"] for s in steps],
            color=c,
            ls=style,
            lw=1.1,
            alpha=0.85,
            label=f"N={count(r.get('n_params'))}, D={count(r.get('tokens'))}",
        )
        marks = (spikes or {}).get(r["run_id"], [])
        if marks:
            ax.plot(*zip(*marks, strict=True), "x", color="#c5221f", ms=8, mew=2, zorder=4)
        if evals:
            ax.plot(
                [e["tokens"] for e in evals],
                [e["eval_loss"] for e in evals],
                "o",
                color=c,
                ms=5,
                mec="black",
                mew=0.6,
                zorder=3,
            )
    if any((spikes or {}).values()):
        ax.plot([], [], "x", color="#c5221f", ms=8, mew=2, label="loss spike")
    _style(
        ax,
        "tokens seen",
        "loss (nats/token); dots: held-out",
        "Loss curves (colour: N non-embedding; line style: D within a size)",
        legend_columns=1 if len(series) <= 16 else 2,
        legend_outside=True,
    )
    return _png(fig, as_figure)


def fit_vs_data(
    points: list[dict[str, Any]],
    predict: Callable[[np.ndarray, np.ndarray], np.ndarray] | None,
    loss_key: str,
    n_key: str = "n_params",
    as_figure: bool = False,
) -> Any:
    """Final loss against N for each D, with the fitted law's curves (when a fit exists)."""
    pts = [p for p in points if p.get(loss_key) is not None and p.get(n_key) and p.get("tokens")]
    if not pts:
        return None
    d_values = sorted({p["tokens"] for p in pts})
    color = _color_by(d_values)
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    n_all = [p[n_key] for p in pts]
    grid = np.geomspace(min(n_all) / 1.5, max(n_all) * 4, 100)
    for d in d_values:
        sel = [p for p in pts if p["tokens"] == d]
        c = color(d)
        ax.plot([p[n_key] for p in sel], [p[loss_key] for p in sel], "o", color=c, label=f"D={si(d)}")
        if predict is not None:
            ax.plot(grid, predict(grid, np.full_like(grid, d)), "-", color=c, lw=1)
    title = "Runs and the fitted law L(N, D)" if predict else "Final loss by model size"
    _style(ax, n_label(n_key), loss_key.replace("_", " "), title)
    return _png(fig, as_figure)


def residuals(
    points: list[dict[str, Any]],
    predict: Callable[[np.ndarray, np.ndarray], np.ndarray] | None,
    loss_key: str,
    n_key: str = "n_params",
    as_figure: bool = False,
) -> Any:
    """Log residuals log(actual) − log(fit) against N, D and C: a trend means the form misfits."""
    pts = [p for p in points if p.get(loss_key) and p.get(n_key) and p.get("tokens") and p.get("flops")]
    if predict is None or len(pts) < 2:
        return None
    N = np.array([p[n_key] for p in pts], float)
    D = np.array([p["tokens"] for p in pts], float)
    C = np.array([p["flops"] for p in pts], float)
    res = np.log([p[loss_key] for p in pts]) - np.log(predict(N, D))
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.2), sharey=True)
    for ax, x, label in zip(axes, (N, D, C), (n_label(n_key), "D (tokens)", "C (FLOPs)"), strict=True):
        ax.axhline(0, color="grey", lw=1)
        ax.plot(x, res, "o", color="#3867d6", ms=4)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel(label)
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("log residual")
    fig.suptitle("Residuals of the fit (log actual − log predicted)")
    return _png(fig, as_figure)


def isoflop_curves(
    points: list[dict[str, Any]],
    loss_key: str,
    n_key: str,
    minima: list[tuple[float, float, float]] | None,
    as_figure: bool = False,
) -> Any:
    """Loss against N for each compute budget of an IsoFLOP design, with a parabola in log N per budget
    (display only) and the fitted per-budget minima (C, N*, L*) from the IsoFLOP estimator."""
    by_budget: dict[float, list[dict[str, Any]]] = {}
    for p in points:
        budget = (p.get("point") or {}).get("budget_flops")
        if budget and p.get(loss_key) and p.get(n_key):
            by_budget.setdefault(float(budget), []).append(p)
    if not by_budget:
        return None
    color = _color_by(list(by_budget))
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for budget, sel in sorted(by_budget.items()):
        n = np.array([p[n_key] for p in sel], float)
        loss = np.array([p[loss_key] for p in sel], float)
        c = color(budget)
        ax.plot(n, loss, "o", color=c, label=f"C={budget:.2g}")
        if np.unique(n).size >= 3:
            coef = np.polyfit(np.log(n), loss, 2)
            grid = np.geomspace(n.min(), n.max(), 60)
            ax.plot(grid, np.polyval(coef, np.log(grid)), "-", color=c, lw=1)
    for _c, n_star, l_star in minima or []:
        ax.plot([n_star], [l_star], marker="*", color="black", ms=12, zorder=4)
    _style(ax, n_label(n_key), loss_key.replace("_", " "), "IsoFLOP curves (stars: fitted minima)")
    return _png(fig, as_figure)


def frontier(
    points: list[dict[str, Any]],
    optimal: Callable[[float], dict[str, Any]] | None,
    n_key: str,
    target_flops: float | None,
    as_figure: bool = False,
) -> Any:
    """The compute-optimal frontier N_opt(C) with its interval, the runs in the (C, N) plane and the target."""
    pts = [p for p in points if p.get(n_key) and p.get("flops")]
    if optimal is None or not pts:
        return None
    c_lo = min(p["flops"] for p in pts) / 2
    c_hi = max([max(p["flops"] for p in pts) * 2, (target_flops or 0) * 2])
    grid = np.geomspace(c_lo, c_hi, 40)
    rows = [optimal(float(c)) for c in grid]
    n_opt = np.array([r["N_opt"] for r in rows], float)
    lo = np.array([(r.get("intervals", {}).get("N_opt") or [np.nan, np.nan])[0] for r in rows], dtype=float)
    hi = np.array([(r.get("intervals", {}).get("N_opt") or [np.nan, np.nan])[1] for r in rows], dtype=float)
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    ax.plot(grid, n_opt, "-", color="#3867d6", label="N_opt(C) from the fit")
    ok = np.isfinite(lo) & np.isfinite(hi) & (lo > 0)
    if ok.any():
        ax.fill_between(grid[ok], lo[ok], hi[ok], color="#3867d6", alpha=0.15, label="interval")
    ax.plot([p["flops"] for p in pts], [p[n_key] for p in pts], "o", color="#444", ms=4, label="runs")
    if target_flops:
        ax.axvline(target_flops, color="#e0a100", ls="--", label=f"target C={flops(target_flops)}")
    ax.set_yscale("log")
    _style(ax, "C (training FLOPs)", n_label(n_key), "Compute-optimal frontier")
    return _png(fig, as_figure)


def loss_vs_compute(
    points: list[dict[str, Any]],
    optimal: Callable[[float], dict[str, Any]] | None,
    loss_key: str,
    n_key: str,
    target_flops: float | None,
    target_runs: list[dict[str, Any]] | None = None,
    as_figure: bool = False,
) -> Any:
    """Final loss against compute: the runs (colour: N), the fitted compute-optimal loss L_opt(C) with its
    interval, running out to the target budget with its predicted interval, and any big runs added."""
    pts = [p for p in points if p.get(loss_key) is not None and p.get("flops")]
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(9, 4.8))
    color = _color_by([max(1, p.get(n_key) or 1) for p in pts])
    ax.scatter(
        [p["flops"] for p in pts],
        [p[loss_key] for p in pts],
        c=[color(max(1, p.get(n_key) or 1)) for p in pts],
        s=28,
        edgecolors="black",
        linewidths=0.4,
        zorder=3,
        label="runs (colour: N)",
    )
    if optimal is not None:
        c_hi = max([max(p["flops"] for p in pts) * 1.5, (target_flops or 0) * 1.5])
        grid = np.geomspace(min(p["flops"] for p in pts), c_hi, 40)
        rows = [optimal(float(c)) for c in grid]
        loss = np.array([r["loss"] for r in rows], float)
        lo = np.array([(r.get("intervals", {}).get("loss") or [np.nan, np.nan])[0] for r in rows], float)
        hi = np.array([(r.get("intervals", {}).get("loss") or [np.nan, np.nan])[1] for r in rows], float)
        ax.plot(grid, loss, "-", color="#3867d6", label="compute-optimal loss from the fit")
        ok = np.isfinite(lo) & np.isfinite(hi)
        if ok.any():
            ax.fill_between(grid[ok], lo[ok], hi[ok], color="#3867d6", alpha=0.15, label="its interval")
        if target_flops:
            t = optimal(float(target_flops))
            iv = t.get("intervals", {}).get("loss")
            yerr = None if not iv else [[t["loss"] - iv[0]], [iv[1] - t["loss"]]]
            ax.errorbar(
                [target_flops],
                [t["loss"]],
                yerr=yerr,
                fmt="D",
                color="#e0a100",
                mec="black",
                ms=8,
                capsize=5,
                zorder=4,
                label=f"target {flops(target_flops)}: {t['loss']:.3f}"
                + (f" [{iv[0]:.3f}, {iv[1]:.3f}]" if iv else ""),
            )
    shown = [p[loss_key] for p in pts]
    if optimal is not None and target_flops:
        shown += [v for v in (iv or [t["loss"]]) if v is not None and np.isfinite(v)]
    done = [p for p in target_runs or [] if p.get(loss_key) is not None and p.get("flops")]
    shown += [p[loss_key] for p in done]
    pad = 0.08 * (max(shown) - min(shown) or 1.0)
    ax.set_ylim(min(shown) - pad, max(shown) + pad)  # the runs and the target; not a band exploding far away
    if done:
        ax.plot(
            [p["flops"] for p in done],
            [p[loss_key] for p in done],
            "*",
            color="#c5221f",
            ms=14,
            mec="black",
            zorder=5,
            label="big run(s), actual",
        )
    _style(
        ax,
        "C (training FLOPs)",
        loss_key.replace("_", " "),
        "Loss against compute, out to the target",
        legend_outside=True,
    )
    return _png(fig, as_figure)
