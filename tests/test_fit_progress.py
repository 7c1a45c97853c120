"""A fit reports its progress (stages, bootstrap refits done) to a callback; the library never prints; the
CLI shows a bar on a terminal and plain lines otherwise (a stage's start, every few seconds, its end)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from scalelab.fit.api import fit_table
from scalelab.fit.commands import FitProgressView
from scalelab.fit.progress import FitProgress, reporting
from scalelab.fit.synthetic import simulate

SRC = str(Path(__file__).resolve().parents[1] / "src")
N = np.repeat([2e4, 5e4, 1e5, 2e5, 4e5], 3)
D = np.tile([5e5, 1e6, 2e6], 5)


@pytest.mark.parametrize("jobs", [1, 2])
def test_bootstrap_reports_refits_done(jobs: int, capsys: pytest.CaptureFixture[str]) -> None:
    seen: list[FitProgress] = []
    with reporting(seen.append):
        fit_table(simulate(N=N, D=D, seed=0), bootstrap=300, holdout="largest:2", seed=0, n_jobs=jobs)
    stages = [p.stage for p in seen]
    assert stages[0] == "fitting chinchilla" and "comparing laws" in stages and "backtest" in stages
    boot = [p for p in seen if p.stage == "bootstrap refits" and p.total == 300]
    done = [p.done for p in boot]
    assert done[0] == 0 and done[-1] == 300 and done == sorted(done) and len(set(done)) >= 3
    assert capsys.readouterr() == ("", "")  # the library printed nothing
    seen.clear()
    fit_table(simulate(N=N, D=D, seed=0), bootstrap=20, seed=0)  # outside `reporting`: nobody is told
    assert seen == []


def test_terminal_view_shows_the_stage_and_count() -> None:
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=80)
    with FitProgressView(console) as view:
        view(FitProgress("bootstrap refits", 250, 1000))
        view.progress.refresh()
    assert "bootstrap refits" in buf.getvalue() and "250/1000" in buf.getvalue()


def test_plain_view_prints_stage_starts_ends_and_at_most_one_line_per_interval() -> None:
    buf = io.StringIO()
    now = [0.0]
    view = FitProgressView(Console(file=buf, width=80), live=False, interval_seconds=5, clock=lambda: now[0])
    with view:
        view(FitProgress("fitting chinchilla", 0, 0))
        for done in range(0, 1001, 50):
            now[0] += 1.0  # 50 refits a second: a line every 5 s, i.e. every 250 refits
            view(FitProgress("bootstrap refits", done, 1000))
    lines = buf.getvalue().splitlines()
    assert lines[0] == "fit: fitting chinchilla" and lines[-1] == "fit: bootstrap refits 1000/1000"
    assert lines[1:] == [f"fit: bootstrap refits {d}/1000" for d in (0, 250, 500, 750, 1000)]


def test_cli_fit_prints_plain_progress_lines_when_not_a_terminal(tmp_path: Path) -> None:
    table = tmp_path / "runs.csv"
    t = simulate(N=N, D=D, seed=0)
    table.write_text(
        "N,D,loss\n" + "".join(f"{n},{d},{x}\n" for n, d, x in zip(t.N, t.D, t.loss, strict=True))
    )
    proc = subprocess.run(
        [sys.executable, "-m", "scalelab", "fit", str(table), "--bootstrap", "50"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": SRC},
    )
    assert proc.returncode == 0, proc.stderr
    assert "━" not in proc.stderr and "fit: bootstrap refits 50/50" in proc.stderr  # lines, not a bar
    assert "fit:" in proc.stdout and "fit: bootstrap refits" not in proc.stdout  # stdout keeps the result
