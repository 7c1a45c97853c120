"""Kaplan, power and IsoFLOP laws; IsoFLOP vs parametric agreement; validation helpers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from scalelab.errors import FitError
from scalelab.fit import synthetic
from scalelab.fit.api import fit_table, recommend
from scalelab.fit.isoflop import IsoFLOPLaw, group_budgets
from scalelab.fit.laws import ChinchillaLaw, KaplanLaw, PowerLaw, law_from_dict, make_law
from scalelab.fit.table import make_table
from scalelab.fit.validate import backtest, information_criteria, kfold, residual_diagnostics

TRUTH = synthetic.HOFFMANN


@pytest.fixture(scope="module")
def iso_table():
    N, D = synthetic.isoflop_design(np.geomspace(1e17, 1e20, 6), 9, span=4.0)
    return synthetic.simulate(TRUTH, N, D, noise=0.002, seed=0)


def test_isoflop_and_parametric_agree(iso_table):
    iso = IsoFLOPLaw(n_bootstrap=100).fit(iso_table)
    ch = ChinchillaLaw().fit(iso_table)
    a_true = TRUTH["beta"] / (TRUTH["alpha"] + TRUTH["beta"])
    assert iso.params_["a"] == pytest.approx(a_true, abs=0.02)
    assert ch.derived_["a"] == pytest.approx(iso.params_["a"], abs=0.02)
    assert iso.params_["a"] + iso.params_["b"] == pytest.approx(1.0, abs=1e-9)  # C = 6ND exactly
    n_iso = iso.optimal(1e21)["N_opt"]
    n_par = ch.optimal(1e21)["N_opt"]
    assert n_iso == pytest.approx(n_par, rel=0.15)
    lo, hi = iso.intervals_["a"]
    assert lo <= iso.params_["a"] <= hi
    assert iso.predict(1e21) == pytest.approx(ch.optimal(1e21)["loss"], rel=0.01)


def test_isoflop_json_and_recommend(iso_table, tmp_path):
    rep = fit_table(iso_table, "isoflop", bootstrap=50, compare=False)
    path = rep.save(tmp_path / "fit.json")
    d = json.loads(path.read_text())
    assert d["fit"]["law"] == "isoflop" and len(d["fit"]["minima"]) == 6
    rec = recommend(path, compute=1e21)
    assert rec["N_opt"] == pytest.approx(rep.law.optimal(1e21)["N_opt"], rel=1e-9)
    inv = recommend(path, target_loss=rec["loss"])
    assert inv["compute_flops"] == pytest.approx(1e21, rel=1e-6)
    again = law_from_dict(d["fit"])
    assert again.optimal(1e21)["intervals"]["N_opt"] == pytest.approx(rec["intervals"]["N_opt"])
    with pytest.raises(FitError, match="isoflop"):
        fit_table(iso_table, "isoflop", bootstrap=0, holdout="largest:3")


def test_isoflop_needs_budgets():
    N, D = synthetic.grid_design()
    t = synthetic.simulate(TRUTH, N, D)
    with pytest.raises(FitError, match="usable compute budgets"):
        IsoFLOPLaw().fit(t)
    assert list(group_budgets(np.array([1.0, 1.01, 2.0, 2.05, 4.0]), 0.05)) == [0, 0, 1, 1, 2]


def test_kaplan_recovers():
    N, D = synthetic.grid_design()
    Nc, Dc, aN, aD = 8.8e13, 5.4e13, 0.076, 0.095
    L = ((Nc / N) ** (aN / aD) + Dc / D) ** aD
    t = make_table(N, D, L * np.exp(0.001 * np.random.default_rng(0).standard_normal(N.size)))
    k = KaplanLaw().fit(t)
    assert k.params_["alpha_N"] == pytest.approx(aN, rel=0.05)
    assert k.params_["alpha_D"] == pytest.approx(aD, rel=0.05)
    np.testing.assert_allclose(k.predict(N, D), L, rtol=0.005)
    again = law_from_dict(json.loads(json.dumps(k.to_dict())))
    np.testing.assert_allclose(again.predict(N, D), k.predict(N, D), rtol=1e-12)


def test_power_laws_and_make_law(iso_table):
    for var in ("C", "N", "D"):
        law = make_law(f"power:{var}").fit(iso_table)
        assert isinstance(law, PowerLaw) and law.variable == var
    # a clean power law in C with an offset
    C = np.geomspace(1e17, 1e21, 20)
    y = 1.5 + 30.0 * (C / 1e17) ** -0.2
    t = make_table(C / 1e10, np.full(20, 1e10) / 6, y, C)
    p = PowerLaw("C").fit(t)
    assert p.params_["alpha"] == pytest.approx(0.2, rel=1e-3)
    assert p.params_["E"] == pytest.approx(1.5, rel=1e-3)
    with pytest.raises(FitError):
        make_law("cubic")


def test_validation_helpers():
    N, D = synthetic.grid_design(np.geomspace(1e7, 3e9, 8), (5, 10, 20, 40, 80))
    t = synthetic.simulate(TRUTH, N, D, noise=0.005, seed=4)
    law = ChinchillaLaw().fit(t)
    bt = backtest(law, t, largest=5, n_bootstrap=40)
    assert bt["test_runs"] == 5 and bt["mean_abs_relative_error"] < 0.03
    assert bt["coverage"] is not None
    bt2 = backtest(law, t, threshold_flops=float(np.median(t.C)), n_bootstrap=0)
    assert bt2["test_runs"] == int(np.sum(t.C > np.median(t.C)))
    kf = kfold(law, t, k=4)
    assert kf["rmse_log"] < 0.02
    diag = residual_diagnostics(t, law.residuals_)
    assert abs(diag["vs_N"]["corr"]) < 0.5 and not diag["flags"]
    # the wrong form (power in C only) is worse by AIC/BIC
    ic_ch = information_criteria(law.residuals_, 5)
    pw = PowerLaw("C").fit(t)
    ic_pw = information_criteria(pw.residuals_, 3)
    assert ic_ch["aic"] < ic_pw["aic"] and ic_ch["bic"] < ic_pw["bic"]
    with pytest.raises(FitError):
        backtest(law, t)


def test_power_law_in_c_inverts(tmp_path):
    C = np.geomspace(1e17, 1e21, 20)
    y = 1.5 + 30.0 * (C / 1e17) ** -0.2
    t = make_table(
        C / 1e10, np.full(20, 1e10) / 6, y * np.exp(0.002 * np.random.default_rng(0).standard_normal(20)), C
    )
    rep = fit_table(t, "power:C", bootstrap=40, compare=False, n_jobs=1)
    path = rep.save(tmp_path / "fit.json")
    target = 1.5 + 30.0 * (1e22 / 1e17) ** -0.2
    rec = recommend(path, target_loss=target)
    assert rec["compute_flops"] == pytest.approx(1e22, rel=0.3)
    lo, hi = rec["intervals"]["compute_flops"]
    assert lo <= rec["compute_flops"] <= hi
    with pytest.raises(FitError, match="cannot recommend N and D"):
        recommend(path, compute=1e21)
    rep_n = fit_table(t, "power:N", bootstrap=0, compare=False)
    with pytest.raises(FitError):
        recommend(rep_n.save(tmp_path / "n.json"), target_loss=2.0)
