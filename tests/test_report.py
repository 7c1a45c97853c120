"""The HTML report: self-contained, complete, and its numbers are fit.json's numbers."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from report_fixtures import fake_study
from scalelab.report.fitview import fmt
from scalelab.report.html import build_report
from scalelab.units import count


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
        assert u.startswith(("#", "data:image/png;base64,", "data:application/toml;base64,")), u
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
        assert count(value) in summary  # human-readable: 1.48M, not 1.48e+06
    assert "non-embedding parameters" in summary  # which N the fit used, named
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


def test_backtest_error_is_a_caveat_in_the_summary(report: tuple[Path, str, dict]) -> None:
    _, page, fit = report
    bt = fit["backtest"]
    assert f"missed them by {100 * bt['mean_abs_relative_error']:.1f} % on average" in page


def test_failures_and_hypotheses_are_shown(report: tuple[Path, str, dict]) -> None:
    _, page, _ = report
    assert "injected crash at step 3" in page
    assert "alpha &gt; 0.2" in page and "supported (whole interval" in page and "α is large" in page


def test_report_without_fit_says_so(tmp_path: Path) -> None:
    study = fake_study(tmp_path, with_fit=False)
    page = build_report(study).read_text()
    assert "No scaling law fitted yet" in page


def _target_run(root: Path, name: str, width: int, tokens: int, loss: float) -> Path:
    """A finished 'big' run directory as `scalelab train` leaves it (config.json + record.json)."""
    from scalelab.models.flops import ModelShape
    from scalelab.spec import RunSpec, config_hash, set_path

    spec = set_path(set_path(RunSpec(), "model.width", width), "train.tokens", tokens)
    shape = ModelShape.from_spec(spec.model, 257)
    run_dir = root / name
    run_dir.mkdir()
    (run_dir / "config.json").write_text(spec.canonical_json())
    (run_dir / "record.json").write_text(
        json.dumps(
            {
                "status": "done",
                "run_id": spec.run_id,
                "config_hash": config_hash(spec),
                "n_params": shape.non_embedding_params,
                "n_params_total": shape.total_params,
                "tokens": tokens,
                "flops": shape.training_flops(tokens),
                "eval_loss": loss,
                "final_train_loss": loss,
            }
        )
    )
    return run_dir


def test_predicted_versus_actual_inside_and_outside(tmp_path: Path) -> None:
    from report_fixtures import TRUTH
    from scalelab.errors import RegistryError
    from scalelab.fit.synthetic import chinchilla_loss
    from scalelab.models.flops import ModelShape
    from scalelab.spec import ModelSpec
    from scalelab.study.add_run import add_run

    study = fake_study(tmp_path)
    n = ModelShape.from_spec(ModelSpec(width=256), 257).non_embedding_params
    truth = float(chinchilla_loss(TRUTH, n, 8_000_000))
    good = _target_run(tmp_path, "good", 256, 8_000_000, truth)
    bad = _target_run(tmp_path, "bad", 256, 4_000_000, truth + 0.8)
    add_run(study, good)
    add_run(study, bad)
    with pytest.raises(RegistryError, match="already in the study"):
        add_run(study, good, role="study")

    page = build_report(study).read_text()
    summary = json.loads((study / "report" / "summary.json").read_text())
    pva = {r["run_id"]: r for r in summary["predicted_vs_actual"]}
    good_id = json.loads((good / "record.json").read_text())["run_id"]
    bad_id = json.loads((bad / "record.json").read_text())["run_id"]
    assert pva[good_id]["inside"] is True
    assert pva[bad_id]["inside"] is False
    assert 'id="predicted-vs-actual"' in page
    assert "1 of 2 big run(s) fell inside the predicted interval" in page
    assert f"the big run {bad_id} reached loss" in page and "OUTSIDE the predicted interval" in page
    # target runs are checked, never fitted
    from scalelab.fit.api import table_from_study

    assert len(table_from_study(study)) == 15


def test_transfer_section_from_an_lr_sweep(tmp_path: Path) -> None:
    from report_fixtures import fake_lr_sweep

    study = fake_study(tmp_path / "a")
    sweep = fake_lr_sweep(tmp_path / "b")
    page = build_report(study, transfer_dir=sweep).read_text()
    summary = json.loads((study / "report" / "summary.json").read_text())
    transfer = summary["transfer"]
    assert transfer["recommended_lr"] == pytest.approx(1e-2, rel=0.3)
    assert "under mup the optimum stays put" in transfer["sentence"]
    assert 'id="transfer"' in page and "does not transfer" in page
    assert "learning rate (from the transfer sweep)" in page
    assert (study / "report" / "transfer.png").exists()


def test_batch_size_from_a_measured_noise_scale(tmp_path: Path) -> None:
    from scalelab.errors import ScalelabError

    study = fake_study(tmp_path)
    noise = tmp_path / "noise.json"
    noise.write_text(json.dumps({"b_noise_tokens": 65536.0}))
    page = build_report(study, noise_scale=noise).read_text()
    assert "critical batch ≈ B_noise = 6.554e+04 tokens" in page and "learning rate at that batch" in page
    noise.write_text("{}")
    with pytest.raises(ScalelabError, match="not the JSON of `scalelab transfer noise-scale --json`"):
        build_report(study, noise_scale=noise)
    assert "no gradient-noise measurement given" in build_report(study).read_text()


def test_report_shows_calibrated_interval_its_source_and_verdict(report: tuple[Path, str, dict]) -> None:
    _, page, fit = report
    rec = fit["recommendation"]
    assert "calibrated" in rec["interval_kinds"]["loss"]
    assert "calibrated interval: model-form error from backtests" in page
    assert "predicted loss, parameter-only" in page
    assert "interval calibration" in page and "run-to-run spread (seeds)" in page
    verdict = rec["calibration"]["verdict"]
    assert verdict.replace("'", "&#x27;") in page
    summary = re.search(r"<div class=summary>(.*?)</div>", page, flags=re.S).group(1)
    assert verdict.split(":")[0].replace("'", "&#x27;") in summary


def test_seed_spread_is_measured_and_shown() -> None:
    from scalelab.fit.api import fit_table
    from scalelab.fit.synthetic import grid_design, simulate
    from scalelab.report.fitview import FitView

    N, D = grid_design((1e7, 3e7, 1e8, 3e8, 1e9), (5, 20, 80))
    table = simulate(noise=0.02, seed=0, seeds_per_config=2, N=N, D=D)
    raw = json.loads(fit_table(table, bootstrap=0, compare=False).to_json())
    rows = dict(FitView(raw).noise_rows())
    assert "between seeds, 15 points with 2+ seeds" in rows["run-to-run spread (seeds)"]


def test_add_run_checks_the_big_run_against_the_calibrated_interval(tmp_path: Path) -> None:
    from report_fixtures import TRUTH
    from scalelab.fit.api import check_against_fit
    from scalelab.fit.synthetic import chinchilla_loss
    from scalelab.models.flops import ModelShape
    from scalelab.spec import ModelSpec
    from scalelab.study.add_run import add_run

    study = fake_study(tmp_path)
    n = ModelShape.from_spec(ModelSpec(width=256), 257).non_embedding_params
    good = _target_run(tmp_path, "good", 256, 8_000_000, float(chinchilla_loss(TRUTH, n, 8_000_000)))
    bad = _target_run(tmp_path, "bad", 256, 4_000_000, float(chinchilla_loss(TRUTH, n, 4_000_000)) + 0.8)
    got = {name: check_against_fit(study, add_run(study, d)) for name, d in (("good", good), ("bad", bad))}
    assert got["good"]["inside"] is True and got["good"]["interval_kind"] == "calibrated"
    assert got["bad"]["inside"] is False
    assert "beyond the largest run" in got["good"]["verdict"] or "inside" in got["good"]["verdict"]
