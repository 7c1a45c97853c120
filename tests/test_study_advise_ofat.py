"""examples/ofat.toml end to end (`slow`): study run → fit → report, shrunk by `--set` overrides to a
few CPU-minutes; the report carries the diminishing-returns section, and `study advise` plans next runs
for the fitted study."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ofat.toml"
#: the example's design at 1/8 of its tokens and half its widths (same shape: 3 + 2 + 2 levels)
SMALL = [
    "--set",
    "train.tokens=32768",
    "--set",
    "train.eval_tokens=8192",
    "--set",
    "train.eval_interval_steps=50",
    "--set",
    "model.width=32",
    "--set",
    'design.factors={"train.tokens" = [32768, 65536, 131072, 262144], "model.width" = [32, 64, 128], '
    "compute = [1, 4, 16]}",
]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    proc = subprocess.run(
        [sys.executable, "-m", "scalelab", *args], capture_output=True, text=True, env=env, timeout=1800
    )
    assert proc.returncode == 0, (args, proc.stdout[-2000:], proc.stderr[-2000:])
    return proc


@pytest.mark.slow
def test_ofat_example_runs_fits_and_reports_diminishing_returns(tmp_path: Path) -> None:
    out = tmp_path / "ofat"
    _cli("study", "run", str(EXAMPLE), "--out", str(out), *SMALL)
    _cli("fit", str(out))
    fit = json.loads((out / "report" / "fit.json").read_text())
    assert fit["data"]["n_runs"] == 8
    _cli("report", str(out))
    html = (out / "report" / "index.html").read_text()
    assert "Diminishing returns" in html
    for factor in ("train.tokens", "model.width", "compute"):
        assert factor in html
    advice = json.loads(_cli("study", "advise", str(out), "--target-compute", "1e14", "--json").stdout)
    assert advice["ranked"] and all(r["flops"] > 0 for r in advice["ranked"])
