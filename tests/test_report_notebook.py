"""The report's notebook runs under Jupyter (nbclient + ipykernel, the `notebook` extra) from a copy of the
study anywhere: relative paths, pandas DataFrames, and every figure a matplotlib Figure."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from report_fixtures import fake_study
from scalelab.report.notebook import FIGURE_CELLS, write_notebook

nbclient = pytest.importorskip(
    "nbclient", reason="the notebook extra is not installed (pip install '.[notebook]')"
)
nbformat = pytest.importorskip("nbformat", reason="the notebook extra is not installed")
pytest.importorskip("pandas", reason="the notebook extra is not installed")
pytest.importorskip("ipykernel", reason="the notebook extra is not installed")


def test_notebook_executes_from_a_moved_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import scalelab

    # the kernel (a subprocess, started in the notebook's folder) imports the scalelab under test
    src = str(Path(scalelab.__file__).resolve().parents[1])
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([src, *filter(None, [os.environ.get("PYTHONPATH")])]))
    study = fake_study(tmp_path / "orig")
    path = write_notebook(study)
    assert str(tmp_path) not in path.read_text()  # no absolute path in it
    moved = shutil.move(str(study), str(tmp_path / "elsewhere"))  # a copy on another machine, say
    nb_path = Path(moved) / "report" / "report.ipynb"
    nb = nbformat.read(nb_path, as_version=4)
    nbclient.NotebookClient(
        nb, timeout=240, kernel_name="python3", resources={"metadata": {"path": str(nb_path.parent)}}
    ).execute()
    outputs = {c["id"]: c.get("outputs", []) for c in nb.cells if c["cell_type"] == "code"}
    text = json.dumps(outputs)
    assert "Traceback" not in text and '"output_type": "error"' not in text
    # the runs DataFrame is shown as a table, with both N columns and the failed run
    tables = [o for outs in outputs.values() for o in outs if "text/html" in o.get("data", {})]
    assert any(
        "N_non_embedding" in "".join(o["data"]["text/html"]) and "broken" in "".join(o["data"]["text/html"])
        for o in tables
    )
    images = [o for outs in outputs.values() for o in outs if "image/png" in o.get("data", {})]
    # every figure but the IsoFLOP one (no IsoFLOP design here) is a rendered matplotlib Figure
    assert len(images) == len(FIGURE_CELLS) - 1
    assert all("Figure size" in "".join(o["data"].get("text/plain", "")) for o in images)
