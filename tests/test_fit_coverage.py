"""Interval coverage by simulation, and honest warnings for ill-posed fits."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from scalelab.fit import synthetic
from scalelab.fit.laws import ChinchillaLaw
from scalelab.fit.table import make_table

TRUTH = synthetic.HOFFMANN


@pytest.mark.slow
def test_bootstrap_interval_coverage(caplog):
    """100 simulated studies; nominal 90 % intervals must contain the truth 80–97 % of the time."""
    caplog.set_level(logging.ERROR, logger="scalelab")  # restored after the test
    N, D = synthetic.grid_design(np.geomspace(1e7, 1e9, 6), (5, 10, 20, 40, 80))
    n_new, d_new = 2e9, 4e10  # 2x beyond the largest size: a mild extrapolation
    mean_new = float(synthetic.chinchilla_loss(TRUTH, n_new, d_new))
    a_true = TRUTH["beta"] / (TRUTH["alpha"] + TRUTH["beta"])
    noise = 0.01
    rng = np.random.default_rng(7)
    hits = dict.fromkeys(("alpha", "beta", "E", "a", "mean_prediction", "single_run_prediction"), 0)
    S = 100
    for s in range(S):
        t = synthetic.simulate(TRUTH, N, D, noise=noise, seed=1000 + s)
        law = ChinchillaLaw(n_bootstrap=200, seed=s, n_jobs=1).fit(t)
        for k in ("alpha", "beta", "E"):
            lo, hi = law.intervals_[k]
            hits[k] += lo <= TRUTH[k] <= hi
        lo, hi = law.derived_intervals_["a"]
        hits["a"] += lo <= a_true <= hi
        lo, hi = law.predict_interval([n_new], [d_new], kind="confidence")
        hits["mean_prediction"] += lo[0] <= mean_new <= hi[0]
        new_run = mean_new * np.exp(noise * rng.standard_normal())
        lo, hi = law.predict_interval([n_new], [d_new], kind="prediction")
        hits["single_run_prediction"] += lo[0] <= new_run <= hi[0]
    coverage = {k: v / S for k, v in hits.items()}
    for k, c in coverage.items():
        assert 0.80 <= c <= 0.97, (k, coverage)


def test_warnings_are_honest():
    # E not visible: losses follow a pure power law (E = 0) -> E at its bound
    N, D = synthetic.grid_design(np.geomspace(1e7, 1e9, 5), (5, 20, 80))
    t = synthetic.simulate({**TRUTH, "E": 1e-9}, N, D, noise=0.002, seed=0)
    law = ChinchillaLaw(n_bootstrap=30, n_jobs=1).fit(t)
    text = " ".join(law.warnings_)
    assert (
        "E" in law.at_bound_ or "interval of E reaches its bound" in text or "E is poorly identified" in text
    )
    # too few runs for the parameters
    n8 = np.geomspace(1e7, 1e9, 8)
    t2 = synthetic.simulate(TRUTH, n8, n8 * np.array([10, 40] * 4), 0.005, 0)
    law2 = ChinchillaLaw().fit(t2)
    assert any("only 8 runs for 5 parameters" in w for w in law2.warnings_)
    # each warning says what to do next, not only what is wrong (a lead acts on it)
    actions = ("add ", "aim for", "fit with", "train ", "widen", "vary ", "do not use")
    for w in law.warnings_ + law2.warnings_:
        assert any(a in w for a in actions), w
    # far extrapolation is flagged by optimal()
    rec = law.optimal(1e26)
    assert rec["extrapolation"]["far"] and rec["extrapolation"]["factor"] > 100


def test_weights_change_the_fit():
    N, D = synthetic.grid_design()
    t = synthetic.simulate(TRUTH, N, D, noise=0.01, seed=3)
    w = np.where(N > 1e8, 1.0, 0.0)
    w[:3] = 1.0
    tw = make_table(t.N, t.D, t.loss, weight=w)
    a = ChinchillaLaw().fit(t)
    b = ChinchillaLaw().fit(tw)
    assert a.params_ != b.params_
    assert b.result_.converged
