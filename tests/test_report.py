"""The HTML report: self-contained, complete, and its numbers are fit.json's numbers."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from report_fixtures import fake_study
from scalelab.report.fitview import fmt
from scalelab.report.html import build_report


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, dict]:
    study = fake_study(tmp_path_factory.mktemp("rep"))
    path = build_report(study)
    return study, path.read_text(), json.loads((study / "report" / "fit.json").read_text())


def test_report_has_no_external_urls(report: tuple[Path, str, dict]) -> None:
    _, page, _ = report
    urls = re.findall(r"""(?:src|href)\s*=\s*["']?([^"' >]+)""", page)
    assert urls, "expected links (table of contents, embedded images)"
    for u in urls:
        assert u.startswith(("#", "data:image/png;base64,")), u
    assert "http://" not in page and "https://" not in page
    assert "<script" not in page.lower()


def test_every_contents_entry_is_present(report: tuple[Path, str, dict]) -> None:
    _, page, _ = report
    toc = re.search(r"<nav>.*?</nav>", page, flags=re.S).group(0)
    targets = re.findall(r'href="#([^"]+)"', toc)
    assert {"summary", "recommendation", "runs", "loss-curves", "fit", "backtest", "failures"} <= set(targets)
    for t in targets:
        assert f'id="{t}"' in page, t
    # the figures are real embedded PNGs, also written beside the page
    for fig in ("loss-curves", "fit"):
        block = re.search(rf'<figure id="{fig}">(.*?)</figure>', page, flags=re.S).group(1)
        assert "data:image/png;base64," in block
    study = report[0]
    assert (study / "report" / "loss-curves.png").stat().st_size > 1000
    assert (study / "report" / "summary.md").exists()


def test_summary_numbers_equal_fit_json(report: tuple[Path, str, dict]) -> None:
    _, page, fit = report
    rec = fit["recommendation"]
    summary = re.search(r"<div class=summary>(.*?)</div>", page, flags=re.S).group(1)
    for value in (rec["N_opt"], rec["D_opt"]):
        assert fmt(value, ".3g") in summary
    assert fmt(rec["loss"]) in summary
    lo, hi = rec["intervals"]["loss"]
    assert f"[{fmt(lo)}, {fmt(hi)}]" in page
    for name, value in fit["fit"]["params"].items():
        assert fmt(value) in page, name
    for w in fit["warnings"]:
        assert (
            w.replace("&", "&amp;")
            .replace("<", "&lt;")
            .replace(">", "&gt;")
            .replace("'", "&#x27;")
            .replace('"', "&quot;")
            in page
        )


def test_failures_and_hypotheses_are_shown(report: tuple[Path, str, dict]) -> None:
    _, page, _ = report
    assert "injected crash at step 3" in page
    assert "α &gt; 0.2" in page


def test_report_without_fit_says_so(tmp_path: Path) -> None:
    study = fake_study(tmp_path, with_fit=False)
    page = build_report(study).read_text()
    assert "No scaling law fitted yet" in page
