"""A Jupyter notebook beside the report (`report --notebook`): the study as pandas DataFrames and every report
figure as a matplotlib Figure to restyle, all read from the study directory by a path relative to the notebook.

Written as plain nbformat-4 JSON (nothing from Jupyter needed to write it); running it needs the `notebook`
extra (pandas, ipykernel). Each figure cell calls the same function the HTML report uses, so the notebook
and the report cannot disagree.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from scalelab.io import atomic_write_text

#: (figure id, title, call): each call returns a matplotlib Figure (None without data for it).
FIGURE_CELLS = (
    (
        "loss-vs-compute",
        "Loss against compute, out to the target",
        "figures.loss_vs_compute(s.done_runs, s.optimal, s.loss_key, s.n_key, s.target_flops, s.target_runs, "
        "as_figure=True)",
    ),
    ("loss-curves", "Loss curves", "figures.loss_curves(s.done_runs, spikes, as_figure=True)"),
    (
        "fit",
        "Runs and the fitted law",
        "figures.fit_vs_data(s.done_runs, s.predict, s.loss_key, s.n_key, as_figure=True)",
    ),
    (
        "frontier",
        "Compute-optimal frontier",
        "figures.frontier(s.done_runs, s.optimal, s.n_key, s.target_flops, as_figure=True)",
    ),
    (
        "isoflop",
        "IsoFLOP curves",
        "figures.isoflop_curves(s.done_runs, s.loss_key, s.n_key, s.isoflop_minima, as_figure=True)",
    ),
    (
        "residuals",
        "Residual diagnostics",
        "figures.residuals(s.done_runs, s.predict, s.loss_key, s.n_key, as_figure=True)",
    ),
)

SETUP = """from pathlib import Path

import pandas as pd

from scalelab.report import figures
from scalelab.report.summary import summarize

try:  # draw figures in the notebook (the report module renders headless)
    get_ipython().run_line_magic("matplotlib", "inline")
except NameError:  # run as a plain script
    pass

# the study directory, relative to this notebook: copy the study anywhere and the notebook still runs
STUDY_DIR = Path({study_dir!r})
s = summarize(STUDY_DIR)  # the registry, the run directories and report/fit.json, as the report reads them
print(s.headline)"""

TABLES = """RUN_COLUMNS = ["run_id", "status", "role", "n_params", "n_params_total", "tokens", "flops", "eval_loss",
               "final_train_loss", "wall_seconds", "forecast_seconds"]
runs = pd.DataFrame(s.runs).reindex(columns=RUN_COLUMNS).rename(
    columns={"n_params": "N_non_embedding", "n_params_total": "N_total", "tokens": "D_tokens", "flops": "C_flops"}
)
flags = s.flags()
runs["flags"] = runs["run_id"].map(lambda r: ", ".join(flags.get(r, [])))
anomalies = pd.DataFrame([a.__dict__ for a in s.anomalies], columns=["run_id", "kind", "detail", "action", "step",
                                                                   "tokens", "loss"])
fit_params = pd.DataFrame(s.fit_rows, columns=["quantity", "value"])
recommendation = pd.DataFrame(s.recommendation_rows, columns=["quantity", "value"])
spikes = {a.run_id: [(a.tokens, a.loss)] for a in s.anomalies if a.kind == "spike" and a.tokens is not None}
runs"""

CURVES = """curves = pd.concat(
    [pd.DataFrame(figures.read_metrics(r["run_dir"])).assign(run_id=r["run_id"]) for r in s.runs if r.get("run_dir")],
    ignore_index=True,
) if any(r.get("run_dir") for r in s.runs) else pd.DataFrame()
curves.head()"""

DECISION = """print("\\n".join(f"{i}. {a}" for i, a in enumerate(s.actions, 1)))
if s.recommended is not None:
    print(s.recommended.toml)"""

SHOW = """fig = {call}  # a matplotlib Figure: restyle it here; Jupyter draws it at the end of the cell
if fig is None:
    print("no data for this figure")"""


def _cell(kind: str, source: str) -> dict:
    cell = {"cell_type": kind, "metadata": {}, "source": source.splitlines(keepends=True)}
    if kind == "code":
        cell.update({"execution_count": None, "outputs": []})
    return cell


def write_notebook(study_dir: str | Path, path: str | Path | None = None) -> Path:
    """Write `report/report.ipynb` (or `path`) for the study; returns its path."""
    study_dir = Path(study_dir)
    path = Path(path) if path else study_dir / "report" / "report.ipynb"
    relative = os.path.relpath(study_dir.resolve(), path.parent.resolve())
    cells = [
        _cell(
            "markdown",
            f"# Scaling study report: `{study_dir.resolve().name}`\n\nEvery table and figure below is rebuilt "
            "from `registry.sqlite`, the run directories and `report/fit.json`. Figures are matplotlib "
            "Figures: restyle them (`fig.axes[0].set_ylim(...)`) and save with `fig.savefig(...)`.",
        ),
        _cell("code", SETUP.format(study_dir=relative)),
        _cell(
            "markdown",
            "## The study as DataFrames\n\n`runs` (one row a run; N both non-embedding and total), `anomalies`, "
            "`fit_params`, `recommendation`, and `curves` (every metrics.jsonl row, with its run id).",
        ),
        _cell("code", TABLES),
        _cell("code", CURVES),
        _cell("markdown", "## The decision: next actions and the recommended run"),
        _cell("code", DECISION),
    ]
    for fig_id, title, call in FIGURE_CELLS:
        cells.append(_cell("markdown", f"## {title} (`{fig_id}`)"))
        cells.append(_cell("code", SHOW.format(call=call)))
    nb = {
        "nbformat": 4,
        "nbformat_minor": 5,
        "cells": cells,
        "metadata": {
            "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
            "language_info": {"name": "python"},
        },
    }
    for i, cell in enumerate(nb["cells"]):
        cell["id"] = f"cell-{i}"
    atomic_write_text(path, json.dumps(nb, indent=1) + "\n")
    return path
