"""A Jupyter notebook that rebuilds every report figure from the registry and fit.json (`report --notebook`).

Written as plain nbformat-4 JSON (no Jupyter needed to write it); each figure is one cell calling the same
function the HTML report uses, so an engineer can audit or restyle any figure from the raw artifacts.
"""

from __future__ import annotations

import json
from pathlib import Path

from scalelab.io import atomic_write_text

#: (figure id, title, code) — the code returns PNG bytes, like the report's own calls.
FIGURE_CELLS = (
    ("loss-curves", "Loss curves", "figures.loss_curves(s.done_runs)"),
    ("fit", "Runs and the fitted law", "figures.fit_vs_data(s.done_runs, s.predict, s.loss_key, s.n_key)"),
    (
        "frontier",
        "Compute-optimal frontier",
        "figures.frontier(s.done_runs, s.optimal, s.n_key, s.target_flops)",
    ),
    (
        "isoflop",
        "IsoFLOP curves",
        "figures.isoflop_curves(s.done_runs, s.loss_key, s.n_key, s.isoflop_minima)",
    ),
    ("residuals", "Residual diagnostics", "figures.residuals(s.done_runs, s.predict, s.loss_key, s.n_key)"),
)

SETUP = """from pathlib import Path

from scalelab.report import figures
from scalelab.report.summary import summarize

try:
    from IPython.display import Image, display
except ImportError:  # run outside Jupyter: figures are still built, just not shown
    Image = display = lambda *args, **kwargs: None

STUDY_DIR = Path({study_dir!r})
s = summarize(STUDY_DIR)  # the registry, the run directories and report/fit.json, as the report reads them
print(s.headline)"""

SHOW = """png = {call}
if png is not None:
    display(Image(png))
else:
    print("no data for this figure")"""


def _cell(kind: str, source: str) -> dict:
    cell = {"cell_type": kind, "metadata": {}, "source": source.splitlines(keepends=True)}
    if kind == "code":
        cell.update({"execution_count": None, "outputs": []})
    return cell


def write_notebook(study_dir: str | Path, path: str | Path | None = None) -> Path:
    """Write `report/report.ipynb` for the study; returns its path."""
    study_dir = Path(study_dir).resolve()
    path = Path(path) if path else study_dir / "report" / "report.ipynb"
    cells = [
        _cell(
            "markdown",
            f"# Scaling study report: `{study_dir.name}`\n\nEvery figure below is rebuilt from "
            "`registry.sqlite`, the run directories and `report/fit.json`.",
        ),
        _cell("code", SETUP.format(study_dir=str(study_dir))),
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
