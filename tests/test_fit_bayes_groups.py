"""MAP fits with priors (Laplace posterior) and grouped fits with shared/separate exponents."""

from __future__ import annotations

import json

import numpy as np
import pytest

from scalelab.errors import FitError
from scalelab.fit import synthetic
from scalelab.fit.api import fit_table
from scalelab.fit.bayes import MAPChinchillaLaw, Prior
from scalelab.fit.groups import GroupedChinchillaLaw, compare_groups
from scalelab.fit.laws import ChinchillaLaw, law_from_dict
from scalelab.fit.table import make_table

TRUTH = synthetic.HOFFMANN


def _study(n_sizes: int, seed: int, budgets=(10, 20, 40), noise=0.01):
    N, D = synthetic.grid_design(np.geomspace(1e7, 1e9, n_sizes), budgets)
    return synthetic.simulate(TRUTH, N, D, noise=noise, seed=seed)


def test_few_runs_borrow_strength_from_prior():
    t = synthetic.simulate(
        TRUTH, np.array([1e7, 1e8, 1e9, 1e8, 1e9]), np.array([2e8, 2e9, 2e10, 8e9, 5e9]), 0.01, 0
    )
    with pytest.raises(FitError, match="5 runs for 5 parameters"):
        ChinchillaLaw().fit(t)
    m = MAPChinchillaLaw(Prior.published("hoffmann2022", exponent_sd=0.03)).fit(t)
    assert m.params_["alpha"] == pytest.approx(0.34, abs=0.05)
    assert m.params_["beta"] == pytest.approx(0.28, abs=0.05)
    lo, hi = m.intervals_["alpha"]
    assert lo < m.params_["alpha"] < hi
    d = json.loads(json.dumps(m.to_dict()))
    assert d["prior"]["source"] == "published:hoffmann2022"
    assert "Laplace" in d["settings"]["interval_method"]
    assert law_from_dict(d).predict(1e9, 2e10) == pytest.approx(m.predict(1e9, 2e10))


def test_posterior_tightens_as_runs_arrive():
    prior = Prior.published("hoffmann2022", exponent_sd=0.1)
    sds = []
    for n_sizes in (3, 6, 12):
        m = MAPChinchillaLaw(prior).fit(_study(n_sizes, seed=n_sizes))
        sds.append(m.posterior_cov_[3, 3] ** 0.5)
    assert sds[0] > sds[1] > sds[2]


def test_prior_from_earlier_fit(tmp_path):
    early = fit_table(_study(8, seed=1, noise=0.005), bootstrap=60, compare=False, n_jobs=1)
    path = early.save(tmp_path / "fit.json")
    prior = Prior.from_fit(path, inflate=2.0, names=("alpha", "beta", "log_E"))
    assert set(prior.terms) == {"alpha", "beta", "log_E"}
    few = synthetic.simulate(TRUTH, np.array([3e7, 3e8, 3e8, 1e9]), np.array([6e8, 6e9, 3e9, 2e10]), 0.01, 5)
    m = MAPChinchillaLaw(prior).fit(few)
    assert m.params_["alpha"] == pytest.approx(early.law.params_["alpha"], abs=0.05)
    with pytest.raises(FitError):
        Prior({"gamma": (1.0, 1.0)})
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"fit": {"law": "kaplan"}}))
    with pytest.raises(FitError, match="chinchilla"):
        Prior.from_fit(bad)


def _grouped(p2: dict, seed: int = 0):
    N, D = synthetic.grid_design(np.geomspace(1e7, 1e9, 6), (5, 10, 20, 40))
    a = synthetic.simulate(TRUTH, N, D, noise=0.005, seed=seed)
    b = synthetic.simulate(p2, N, D, noise=0.005, seed=seed + 1)
    return make_table(
        np.r_[a.N, b.N], np.r_[a.D, b.D], np.r_[a.loss, b.loss], group=["web"] * len(a) + ["code"] * len(b)
    )


def test_groups_shared_vs_separate():
    same = _grouped({**TRUTH, "E": 1.2, "A": 300.0, "B": 600.0})
    c = compare_groups(same)
    assert c["preferred_by_bic"] == "shared"
    sh = c["shared"]["params"]
    assert sh["web"]["alpha"] == sh["code"]["alpha"]
    assert sh["web"]["alpha"] == pytest.approx(0.34, abs=0.04)
    assert sh["code"]["E"] == pytest.approx(1.2, rel=0.1)
    diff = _grouped({**TRUTH, "E": 1.2, "alpha": 0.5, "beta": 0.4, "A": 1500.0, "B": 3000.0})
    c2 = compare_groups(diff)
    assert c2["preferred_by_aic"] == "separate" and c2["preferred_by_bic"] == "separate"
    law = GroupedChinchillaLaw(False).fit(diff)
    assert law.params_["code"]["alpha"] == pytest.approx(0.5, abs=0.05)
    assert law.predict(1e8, 2e9, "web") > 0
    with pytest.raises(FitError, match="group"):
        GroupedChinchillaLaw().fit(_study(4, 0))


def test_fit_table_reports_groups_and_prior(tmp_path):
    t = _grouped({**TRUTH, "E": 1.2, "A": 300.0, "B": 600.0})
    rep = fit_table(t, bootstrap=0, compare=False)
    d = json.loads(rep.to_json())
    assert d["groups"]["preferred_by_bic"] == "shared"
    rep2 = fit_table(_study(4, 1), bootstrap=0, compare=False, prior="hoffmann2022")
    d2 = json.loads(rep2.to_json())
    assert d2["settings"]["prior"] == "hoffmann2022" and d2["fit"]["prior"]["terms"]["alpha"]["mean"] == 0.34
    with pytest.raises(FitError, match="--prior"):
        fit_table(_study(4, 1), "kaplan", bootstrap=0, prior="hoffmann2022")


def test_groups_get_bootstrap_intervals_and_a_transfer_verdict():
    same = _grouped({**TRUTH, "E": 1.2, "A": 300.0, "B": 600.0})
    c = compare_groups(same, n_bootstrap=60)
    assert c["transfers"] is True and "transfers across the groups" in c["verdict"]
    iv = c["separate"]["intervals"]["code"]["alpha"]
    assert iv[0] < c["separate"]["params"]["code"]["alpha"] < iv[1]
    assert all(not d["excludes_zero"] for d in c["exponent_differences"].values())
    diff = _grouped({**TRUTH, "E": 1.2, "alpha": 0.5, "beta": 0.4, "A": 1500.0, "B": 3000.0})
    c2 = compare_groups(diff, n_bootstrap=60)
    assert c2["transfers"] is False and "does NOT transfer" in c2["verdict"]
    assert c2["exponent_differences"]["alpha[code] - alpha[web]"]["excludes_zero"]
    rep = fit_table(diff, bootstrap=60, compare=False)
    assert any("does NOT transfer" in w for w in rep.warnings)
    from scalelab.report.fitview import FitView

    rows = dict(FitView(json.loads(rep.to_json())).group_rows())
    assert "group code" in rows and "does NOT transfer" in rows["across groups"]
