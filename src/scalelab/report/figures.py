"""Matplotlib figures for the report, rendered headless (Agg) to PNG bytes."""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from scalelab.units import si  # noqa: E402

DPI = 110


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


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


def loss_curves(runs: list[dict[str, Any]]) -> bytes | None:
    """Training loss (and held-out evals as markers) against tokens, one line per run, coloured by N."""
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
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for r, steps, evals in series:
        c = color(max(1, r.get("n_params") or 1))
        ax.plot(
            [s["tokens"] for s in steps],
            [s["loss"] for s in steps],
            color=c,
            lw=1,
            alpha=0.8,
            label=f"N={si(r.get('n_params'))}, D={si(r.get('tokens'))}",
        )
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
    ax.set_xscale("log")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("loss (nats/token); dots: held-out")
    ax.set_title("Loss curves")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    return _png(fig)


def fit_vs_data(
    points: list[dict[str, Any]],
    predict: Callable[[np.ndarray, np.ndarray], np.ndarray] | None,
    loss_key: str,
) -> bytes | None:
    """Final loss against N for each D, with the fitted law's curves (when a fit exists)."""
    pts = [p for p in points if p.get(loss_key) is not None and p.get("n_params") and p.get("tokens")]
    if not pts:
        return None
    d_values = sorted({p["tokens"] for p in pts})
    color = _color_by(d_values)
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    n_all = [p["n_params"] for p in pts]
    grid = np.geomspace(min(n_all) / 1.5, max(n_all) * 4, 100)
    for d in d_values:
        sel = [p for p in pts if p["tokens"] == d]
        c = color(d)
        ax.plot([p["n_params"] for p in sel], [p[loss_key] for p in sel], "o", color=c, label=f"D={si(d)}")
        if predict is not None:
            ax.plot(grid, predict(grid, np.full_like(grid, d)), "-", color=c, lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("N (parameters)")
    ax.set_ylabel(f"{loss_key.replace('_', ' ')}")
    ax.set_title("Runs and the fitted law L(N, D)" if predict else "Final loss by model size")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return _png(fig)
