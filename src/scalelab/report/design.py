"""Report sections that follow the study's design: per-group curves (data-source or `group_by` axes),
the seed-to-seed spread per config and how it enters the intervals, and the diminishing-returns analysis of
a one-factor-at-a-time design."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from scalelab.fit.returns import FactorReturns, ofat_returns

Figure = Callable[[bytes | None, str, str], str]  # (png, id, caption) → HTML
Table = Callable[[list[tuple[str, Any]]], str]  # rows → HTML
Section = tuple[str, str, str]  # (id, title, HTML body)


def _group_of(r: dict[str, Any]) -> str | None:
    g = (r.get("point") or {}).get("group")
    return None if g is None else str(g)


def group_curves_png(
    runs: Sequence[dict[str, Any]], group_params: dict[str, dict[str, float]], loss_key: str, n_key: str
) -> bytes | None:
    """One panel per group: final loss against N (one colour per D) with that group's own fitted law."""
    from scalelab.report import figures

    groups = list(dict.fromkeys(g for r in runs if (g := _group_of(r)) is not None))
    rows = [r for r in runs if r.get(loss_key) and r.get(n_key) and r.get("tokens")]
    if not groups or not rows:
        return None
    plt = figures.plt
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.6), sharey=True, squeeze=False)
    color = figures._color_by([float(r["tokens"]) for r in rows])
    n_all = np.array([float(r[n_key]) for r in rows])
    grid = np.geomspace(n_all.min() / 1.5, n_all.max() * 1.5, 60)
    for ax, g in zip(axes[0], groups, strict=True):
        mine = [r for r in rows if _group_of(r) == g]
        p = group_params.get(g)
        for d in sorted({float(r["tokens"]) for r in mine}):
            at = [r for r in mine if float(r["tokens"]) == d]
            ax.scatter(
                [r[n_key] for r in at], [r[loss_key] for r in at], color=color(d), s=22, label=f"D={d:.3g}"
            )
            if p:
                fit = p["E"] + p["A"] / grid ** p["alpha"] + p["B"] / d ** p["beta"]
                ax.plot(grid, fit, color=color(d), lw=1)
        title = g if not p else f"{g}: α={p['alpha']:.2f}, β={p['beta']:.2f}"
        figures._style(ax, "N (parameters)", "final loss", title)
        ax.xaxis.set_minor_formatter(figures.matplotlib.ticker.NullFormatter())
    return figures._png(fig)


def groups_section(s: Any, figure: Figure, table: Table) -> Section | None:
    """Each group's runs and own curve, with the transfer verdict (fit.json `groups`)."""
    runs = s.done_runs
    if not any(_group_of(r) is not None for r in runs):
        return None
    grp = (s.fit or {}).get("groups") or {}
    params = (grp.get("separate") or {}).get("params") or {}
    rows: list[tuple[str, Any]] = []
    for g in dict.fromkeys(g for r in runs if (g := _group_of(r)) is not None):
        n = sum(1 for r in runs if _group_of(r) == g)
        iv = ((grp.get("separate") or {}).get("intervals") or {}).get(g, {})
        p = params.get(g)
        fitted = (
            "not fitted yet"
            if not p
            else (
                f"α {p['alpha']:.3g}"
                + (f" [{iv['alpha'][0]:.3g}, {iv['alpha'][1]:.3g}]" if iv.get("alpha") else "")
                + f", β {p['beta']:.3g}"
                + (f" [{iv['beta'][0]:.3g}, {iv['beta'][1]:.3g}]" if iv.get("beta") else "")
            )
        )
        rows.append((f"group {g} ({n} runs)", fitted))
    if grp.get("verdict"):
        rows.append(("does the law transfer?", grp["verdict"]))
    elif grp.get("error"):
        rows.append(("grouped fit", grp["error"]))
    png = group_curves_png(runs, params, s.loss_key, s.n_key)
    caption = (
        "Final loss against N per group (one colour per token budget D), with each group's own fitted law."
    )
    return ("groups", "Groups", table(rows) + figure(png, "groups", caption))


def seed_spread(runs: Sequence[dict[str, Any]], loss_key: str, n_key: str) -> list[dict[str, Any]]:
    """Per config (N, D, group) with 2+ finished seeds: how many, mean loss, sd of log loss, range."""
    configs: dict[tuple[Any, ...], list[float]] = {}
    for r in runs:
        if r.get(loss_key) is None:
            continue
        key = (r.get(n_key), r.get("tokens"), _group_of(r))
        configs.setdefault(key, []).append(float(r[loss_key]))
    out = []
    for (n, d, g), losses in configs.items():
        if len(losses) < 2:
            continue
        logs = np.log(losses)
        out.append(
            {
                "N": n,
                "D": d,
                "group": g,
                "seeds": len(losses),
                "mean": float(np.mean(losses)),
                "log_sd": float(np.std(logs, ddof=1)),
                "range": (min(losses), max(losses)),
            }
        )
    return sorted(out, key=lambda c: (str(c["group"]), c["N"] or 0, c["D"] or 0))


def seeds_section(s: Any, table: Table) -> Section | None:
    """The run-to-run spread per config and what it does to the intervals."""
    spread = seed_spread(s.done_runs, s.loss_key, s.n_key)
    if not spread:
        return None
    head = (
        "<tr><th>N</th><th>D</th><th class=l>group</th><th>seeds</th><th>mean loss</th>"
        "<th>sd (log loss)</th><th>range</th></tr>"
    )
    body = "".join(
        f"<tr><td>{c['N']:.3g}</td><td>{c['D']:.3g}</td><td class=l>{c['group'] or '—'}</td><td>{c['seeds']}</td>"
        f"<td>{c['mean']:.4f}</td><td>{100 * c['log_sd']:.2f} %</td>"
        f"<td>{c['range'][0]:.4f} – {c['range'][1]:.4f}</td></tr>"
        for c in spread
    )
    pooled = math.sqrt(np.mean([c["log_sd"] ** 2 for c in spread]))
    cal = ((s.fit or {}).get("fit") or {}).get("calibration") or {}
    floor = cal.get("floor")
    rows: list[tuple[str, Any]] = [
        ("pooled run-to-run spread", f"{100 * pooled:.2f} % (sd of log loss over {len(spread)} configs)"),
        (
            "parameter intervals",
            "the bootstrap resamples whole configs (all seeds of a config together), so seed noise widens "
            "every bootstrap interval by what it moves the fit",
        ),
    ]
    if floor is not None:
        noise = cal.get("noise") or {}
        rows.append(
            (
                "prediction intervals",
                f"the calibrated error floor is {100 * floor:.2f} %, never below the measured spread "
                f"({100 * noise['log_sd']:.2f} %)"
                if noise
                else f"the calibrated error floor is {100 * floor:.2f} %",
            )
        )
    else:
        rows.append(("prediction intervals", "no fit yet: run `scalelab fit DIR` to see the floor it sets"))
    return ("seeds", "Seed-to-seed spread", f"<table>{head}{body}</table>" + table(rows))


def returns_png(ladders: Sequence[FactorReturns]) -> bytes | None:
    """Loss against doublings of each factor's resource, and the gain per doubling with the threshold."""
    from scalelab.report import figures

    ladders = [f for f in ladders if len(f.levels) >= 2]
    if not ladders:
        return None
    plt = figures.plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(9.5, 3.6))
    for f in ladders:
        x = np.log2(np.asarray(f.levels) / f.levels[0])
        a.plot(x, f.loss, marker="o", label=f"{f.factor} ({f.resource})")
        b.plot((x[:-1] + x[1:]) / 2, f.gain_per_doubling, marker="o", label=f.factor)
    b.axhline(ladders[0].threshold, color="grey", ls="--", lw=1, label=f"threshold {ladders[0].threshold:g}")
    for ax, ylabel, title in (
        (a, "final loss (mean over seeds)", "loss as one factor grows"),
        (b, "loss gain per doubling", "marginal gain per doubling"),
    ):
        ax.set_xlabel("doublings from the base run")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return figures._png(fig)


def returns_section(s: Any, figure: Figure, table: Table, threshold: float) -> Section | None:
    """Diminishing returns per factor of a one-factor-at-a-time design."""
    ladders = ofat_returns(s.done_runs, threshold, s.loss_key, s.n_key)
    if not ladders:
        return None
    rows = [(f.factor, f.sentence()) for f in ladders]
    caption = (
        "Each factor grown alone from the base run: loss per doubling and the marginal gain per doubling."
    )
    return ("returns", "Diminishing returns", table(rows) + figure(returns_png(ladders), "returns", caption))


def ofat_threshold(study_dir: Path) -> float:
    """The `ofat` design's threshold from study.json (the default when absent)."""
    from scalelab.spec import OFATDesign

    default = float(OFATDesign.model_fields["threshold"].default)
    try:
        design = json.loads((study_dir / "study.json").read_text()).get("design") or {}
    except (OSError, ValueError):
        return default
    return float(design.get("threshold", default)) if design.get("kind") == "ofat" else default


def design_sections(s: Any, out_dir: Path, figure: Figure, table: Table) -> list[Section]:
    """Every design-dependent section that applies to this study (none for a plain single-source grid)."""
    found = (
        groups_section(s, figure, table),
        seeds_section(s, table),
        returns_section(s, figure, table, ofat_threshold(out_dir.parent)),
    )
    return [sec for sec in found if sec is not None]
