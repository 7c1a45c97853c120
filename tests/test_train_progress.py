"""Progress of `scalelab train` / `launch` as a person sees it in a log (not a terminal): step, loss,
tokens/s, MFU and ETA lines on stderr; Ctrl-C says how to continue."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from scalelab.cli_progress import StepProgressView, step_line
from scalelab.train.progress import StepProgress

LINE = re.compile(
    r"^[0-9a-f]{12} step (\d+)/(\d+) \(\d+%\) · loss \d+\.\d{4} · (eval \d+\.\d{4} · )?"
    r"[\d.]+k? tok/s · MFU [\d.]+% · ETA (\d+s|\d+m\d\ds)$"
)


def config(tmp_path: Path, corpus: Path, steps: int) -> Path:
    path = tmp_path / "run.toml"
    path.write_text(
        f"""[model]
n_heads = 2
width = 16
depth = 1
context_tokens = 16
[data]
sources = [{{kind = "text", path = "{corpus}"}}]
heldout_fraction = 0.2
shard_tokens = 4096
[train]
tokens = {steps * 4 * 16}
global_batch_size = 4
eval_interval_steps = 5
eval_tokens = 64
checkpoint_interval_steps = 1000
threads = 1
"""
    )
    return path


def scalelab(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "scalelab", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=os.environ | env,
    )


def progress_lines(stderr: str) -> list[re.Match[str]]:
    return [m for m in map(LINE.match, stderr.splitlines()) if m]


def test_train_prints_progress_lines_when_not_a_terminal(tmp_path: Path, tiny_corpus: Path) -> None:
    out = scalelab(
        "train",
        str(config(tmp_path, tiny_corpus, 12)),
        "--out",
        str(tmp_path / "run"),
        "--progress-every",
        "0",
    )
    assert out.returncode == 0, out.stderr
    lines = progress_lines(out.stderr)
    assert [int(m.group(1)) for m in lines] == list(range(1, 13)), out.stderr
    assert lines[-1].group(0).endswith("ETA 0s") and "eval" in lines[-1].group(0)
    assert out.stderr.splitlines()[0].endswith(
        "preparing the token store (built from the corpus once, then cached), the model and the data loader …"
    )
    assert "done — train loss" in out.stdout and "step" not in out.stdout


def test_launch_shows_rank_zero_progress_once(tmp_path: Path, tiny_corpus: Path) -> None:
    out = scalelab(
        "launch",
        str(config(tmp_path, tiny_corpus, 6)),
        "--out",
        str(tmp_path / "run"),
        "--nproc",
        "2",
        SCALELAB_PROGRESS_SECONDS="0",
    )
    assert out.returncode == 0, out.stderr
    steps = [int(m.group(1)) for m in progress_lines(out.stderr)]
    assert steps == list(range(1, 7)), out.stderr  # rank 0 only: each step once


def test_ctrl_c_says_how_to_continue(tmp_path: Path, tiny_corpus: Path) -> None:
    cmd = [sys.executable, "-m", "scalelab", "train", str(config(tmp_path, tiny_corpus, 100_000))]
    proc = subprocess.Popen(
        [*cmd, "--out", str(tmp_path / "run"), "--progress-every", "0"],
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        for line in proc.stderr:  # wait until it trains
            if LINE.match(line.rstrip("\n")):
                break
        proc.send_signal(signal.SIGINT)
        _, rest = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert "interrupted; re-run the same command to continue where it stopped" in rest
    assert "Traceback" not in rest


def test_plain_view_prints_first_then_every_interval_then_last() -> None:
    console = Console(width=200, force_terminal=False, record=True)
    now = [0.0]
    view = StepProgressView(console, live=False, interval_seconds=10, clock=lambda: now[0])

    def event(step: int, done: bool = False) -> StepProgress:
        return StepProgress("abc", step, 50, step * 64, 3.0, None, 1234.0, 0.01, 5.0 * (50 - step), done)

    with view:
        for step in range(1, 51):
            now[0] = step * 3.0  # 3 s a step: a line every 4th step (12 s apart)
            view(event(step, done=step == 50))
    printed = console.export_text().splitlines()
    assert [int(p.split()[2].split("/")[0]) for p in printed] == [
        1,
        5,
        9,
        13,
        17,
        21,
        25,
        29,
        33,
        37,
        41,
        45,
        49,
        50,
    ]
    assert (
        printed[0]
        == step_line(event(1))
        == "abc step 1/50 (2%) · loss 3.0000 · 1.23k tok/s · MFU 1.0% · ETA 4m05s"
    )


@pytest.mark.parametrize(
    ("seconds", "text"), [(None, "—"), (0.4, "0s"), (59.6, "1m00s"), (185, "3m05s"), (7384, "2h03m")]
)
def test_duration(seconds, text) -> None:
    from scalelab.units import duration

    assert duration(seconds) == text


def test_terminal_view_is_a_bar_with_the_fields() -> None:
    import io

    console = Console(file=io.StringIO(), width=100, force_terminal=True, record=True)
    with StepProgressView(console, live=True) as view:
        for step in range(1, 11):
            view(StepProgress("abc", step, 10, step * 64, 3.0, 3.1, 2000.0, 0.02, 10.0 - step, step == 10))
    text = console.export_text()
    assert (
        "abc" in text
        and "10/10" in text
        and "loss 3.0000 · eval 3.1000 · 2k tok/s · MFU 2.0% · ETA 0s" in text
    )
