"""`study run` as a person sees it in a log: what it is doing before runs start (forecasts, the token
store) and an overall ETA from forecasts corrected by actual run times."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from scalelab.study.eta import StudyEta
from tiny_study import tiny_study


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_eta_from_forecasts_scaled_by_actuals_over_parallel_slots() -> None:
    clock = Clock()
    eta = StudyEta({"a": 10.0, "b": 20.0, "c": 30.0, "d": 40.0}, parallel=2, clock=clock)
    assert eta.seconds_left() == pytest.approx(100 / 2)
    clock.now = 15.0
    assert eta.seconds_left() == pytest.approx(50 - 15)  # counts down between completions
    eta.finished("a", 20.0)  # took twice its forecast: the rest are scaled by 2
    assert eta.ratio() == pytest.approx(2.0)
    assert eta.seconds_left() == pytest.approx(2 * 90 / 2)
    clock.now = 1000.0
    assert eta.seconds_left() == 0.0  # never negative
    for run_id in "bcd":
        eta.finished(run_id, 1.0)
    assert eta.seconds_left() == 0.0


def test_eta_without_forecasts_uses_the_mean_actual_time() -> None:
    eta = StudyEta({"a": None, "b": None, "c": None}, parallel=1, clock=Clock())
    assert eta.seconds_left() is None
    eta.finished("a", 12.0)
    assert eta.seconds_left() == pytest.approx(24.0)


STUDY = tiny_study(
    "progress",
    """[study.train]
tokens = 1024
global_batch_size = 4
eval_interval_steps = 16
eval_tokens = 128
checkpoint_interval_steps = 1000
threads = 1
[study.design]
kind = "grid"
[study.design.axes]
"model.width" = [8, 16]
""",
)


def test_study_plan_says_it_is_measuring_on_stderr(tmp_path: Path, tiny_corpus: Path) -> None:
    import json

    spec = tmp_path / "study.toml"
    spec.write_text(STUDY.format(corpus=tiny_corpus))
    out = subprocess.run(
        [sys.executable, "-m", "scalelab", "study", "plan", str(spec), "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert out.stderr.startswith("forecasting run times")
    assert all(r["forecast_seconds"] > 0 for r in json.loads(out.stdout)["runs"])


def test_study_run_log_says_what_it_does_and_the_study_eta(tmp_path: Path, tiny_corpus: Path) -> None:
    spec = tmp_path / "study.toml"
    spec.write_text(STUDY.format(corpus=tiny_corpus))
    out = subprocess.run(
        [sys.executable, "-m", "scalelab", "study", "run", str(spec), "--out", str(tmp_path / "s")],
        capture_output=True,
        text=True,
        timeout=300,
        env=os.environ | {"COLUMNS": "80"},
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("forecasting run times")
    assert re.fullmatch(
        r"study 'progress': 2 runs, 0 already done, 2 to run; forecast \S+ with --parallel 1", lines[1]
    )
    assert lines[2].startswith("token store: opening, or building it")
    assert re.fullmatch(r"token store ready: [\d.]+k tokens in [\d.]+ s \(.+\)", lines[3]), lines[3]
    assert re.fullmatch(r"[0-9a-f]{12}: done in [\d.]+ s · 1/2 · study ETA (\d+s|\d+m\d\ds)", lines[4]), (
        lines[4]
    )
    assert re.fullmatch(r"[0-9a-f]{12}: done in [\d.]+ s · 2/2 · study ETA 0s", lines[5]), lines[5]
    assert lines[6].startswith("done: 2 trained, 0 skipped, 0 not done")


def test_ctrl_c_on_study_run_says_how_to_continue(tmp_path: Path, tiny_corpus: Path) -> None:
    """A terminal's Ctrl-C reaches the whole foreground group (driver and training children): the driver
    stops its runs, says how to continue and exits 130, without a traceback."""
    import signal

    spec = tmp_path / "study.toml"
    spec.write_text(STUDY.format(corpus=tiny_corpus).replace("tokens = 1024", "tokens = 4000000"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "scalelab", "study", "run", str(spec), "--out", str(tmp_path / "s")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's foreground job has
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # wait until the first run is training
            if line.startswith("token store ready"):
                break
        time.sleep(3)
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err
    assert "interrupted; re-run the same command to continue where it stopped" in err
    assert "Traceback" not in err
