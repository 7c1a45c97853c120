"""A real browser (headless Chromium) opens the report from disk: no console errors, a non-blank page."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from report_fixtures import fake_study
from scalelab.report.html import build_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        CHROMIUM is None, reason="headless Chromium is not installed (apt-get install chromium)"
    ),
]

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--enable-logging=stderr",
    "--v=0",
    "--hide-scrollbars",
]


def test_report_renders_in_chromium(tmp_path: Path) -> None:
    from matplotlib.image import imread

    page = build_report(fake_study(tmp_path))
    shot = tmp_path / "shot.png"
    proc = subprocess.run(
        [
            CHROMIUM,
            *FLAGS,
            f"--user-data-dir={tmp_path / 'profile'}",
            f"--screenshot={shot}",
            "--window-size=1200,2400",
            page.resolve().as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shot.exists(), proc.stderr[-2000:]
    console = [
        line for line in proc.stderr.splitlines() if "CONSOLE" in line or "Failed to load resource" in line
    ]
    assert not console, console
    img = imread(shot)[..., :3]
    assert img.shape[0] >= 1000 and img.shape[1] >= 1000
    not_white = np.mean(img.min(axis=-1) < 0.9)
    assert not_white > 0.02, f"screenshot looks blank ({not_white:.3%} non-white pixels)"
    assert img.std() > 0.05
