"""Priors everywhere (issue 22, item 1): `--prior`, `[study.fit] prior`, what the data did to the prior."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from scalelab.errors import FitError
from scalelab.fit import synthetic
from scalelab.fit.api import fit_source, fit_table
from scalelab.fit.bayes import PUBLISHED, parse_prior

TRUTH = synthetic.HOFFMANN


def _csv(path: Path, table) -> Path:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["N", "D", "loss"])
        for row in zip(table.N, table.D, table.loss, strict=True):
            w.writerow([f"{v:.8g}" for v in row])
    return path


def test_parse_prior_names_the_flag():
    assert parse_prior("published:chinchilla").source == "published:hoffmann2022"
    assert parse_prior("published:epoch").source == "published:besiroglu2024"
    assert parse_prior("besiroglu2024").terms["alpha"][0] == PUBLISHED["besiroglu2024"][3]
    with pytest.raises(FitError, match="--prior 'published:nope'"):
        parse_prior("published:nope")
    with pytest.raises(FitError, match="no such fit.json"):
        parse_prior("missing.json")


def test_cli_prior_reaches_the_map_fit(tmp_path: Path):
    N, D = synthetic.grid_design(np.geomspace(1e7, 1e9, 4), (10, 40))
    src = _csv(tmp_path / "runs.csv", synthetic.simulate(TRUTH, N, D, 0.01, 0))
    out = subprocess.run(
        [sys.executable, "-m", "scalelab", "fit", str(src), "--prior", "published:chinchilla", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    assert d["settings"]["prior"] == "published:chinchilla"
    assert d["fit"]["prior"]["source"] == "published:hoffmann2022"
    assert set(d["fit"]["prior_vs_posterior"]) == {"alpha", "beta", "log_E"}
    bad = subprocess.run(
        [sys.executable, "-m", "scalelab", "fit", str(src), "--prior", "published:nope"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and "--prior" in bad.stderr and "Traceback" not in bad.stderr


def test_study_fit_prior_reaches_the_map_fit(tmp_path: Path):
    from report_fixtures import fake_study

    study = fake_study(tmp_path, with_fit=False)
    meta = json.loads((study / "study.json").read_text())
    meta["fit"]["prior"] = "published:chinchilla"
    (study / "study.json").write_text(json.dumps(meta))
    rep = fit_source(study, bootstrap=0)
    assert rep.settings["prior"] == "published:chinchilla"
    assert rep.law.to_dict()["prior"]["source"] == "published:hoffmann2022"


def test_few_runs_lean_on_the_prior_many_runs_on_the_data():
    truth = {**TRUTH, "alpha": 0.45}  # the data's alpha differs from the prior's 0.34
    few_n, few_d = synthetic.grid_design(np.geomspace(1e8, 3e8, 2), (10, 40, 160))
    few = synthetic.simulate(truth, few_n, few_d, 0.01, 1)
    flat = fit_table(few, bootstrap=200, compare=False, cv_folds=0)
    map_ = fit_table(few, bootstrap=0, compare=False, prior="published:chinchilla")
    iv = lambda r: np.diff(r.law.intervals_["alpha"])[0]  # noqa: E731
    assert iv(map_) < iv(flat)  # the prior narrows the interval
    assert abs(map_.law.params_["alpha"] - 0.34) < abs(flat.law.params_["alpha"] - 0.34)
    many_n, many_d = synthetic.grid_design(np.geomspace(1e7, 1e10, 8), (5, 10, 20, 40, 80))
    many = synthetic.simulate(truth, many_n, many_d, 0.003, 2)
    rep = fit_table(many, bootstrap=0, compare=False, prior="published:chinchilla")
    pvp = rep.law.prior_vs_posterior()["alpha"]
    assert pvp["width_ratio"] < 0.3  # the data narrowed it
    assert rep.law.params_["alpha"] == pytest.approx(0.45, abs=0.03)  # and moved it to the truth


def test_report_states_prior_and_posterior(tmp_path: Path):
    from report_fixtures import fake_study
    from scalelab.report.html import build_report

    study = fake_study(tmp_path, with_fit=False)
    rep = fit_source(study, bootstrap=0, prior="published:chinchilla")
    rep.save(study / "report" / "fit.json")
    page = build_report(study).read_text()
    assert "prior → posterior: alpha" in page and "published:hoffmann2022" in page
