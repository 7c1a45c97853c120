"""Unit tests of the transfer fits, rules and checks on synthetic numbers (fast, no training)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from scalelab.errors import FitError, SpecError
from scalelab.transfer.analyze import SweepRow, analyze_rows, verdict_for
from scalelab.transfer.batch import recommend_batch, scale_lr
from scalelab.transfer.check import evaluate_check
from scalelab.transfer.coord import summarize_coord_check
from scalelab.transfer.optimum import SlopeFit, fit_optimum, fit_slope
from scalelab.transfer.sweep import lr_grid, lr_sweep_study


def _curve(lrs, lr_opt, a=0.3, c=2.0, noise=0.0, seeds=1, rng=None):
    rng = rng or np.random.default_rng(0)
    x = np.log(lrs)
    base = c + a * (x - math.log(lr_opt)) ** 2
    return [[float(v + noise * rng.normal()) for _ in range(seeds)] for v in base]


def test_fit_optimum_recovers_known_optimum_between_grid_points():
    lrs = [2.0**k for k in range(-10, -2)]
    true = 2.0**-6.4
    fit = fit_optimum(lrs, _curve(lrs, true), n_bootstrap=0)
    assert math.log2(fit.lr_opt) == pytest.approx(-6.4, abs=1e-6)
    assert fit.bracketed and fit.n_points == 5
    assert fit.sensitivity_x2 == pytest.approx(0.3 * math.log(2) ** 2)
    assert fit.loss_at_opt == pytest.approx(2.0)


def test_seed_bootstrap_interval_covers_truth():
    lrs = [2.0**k for k in range(-10, -2)]
    rng = np.random.default_rng(1)
    fit = fit_optimum(lrs, _curve(lrs, 2.0**-6, noise=0.01, seeds=5, rng=rng), n_bootstrap=300)
    lo, hi = fit.lr_opt_interval
    assert lo <= 2.0**-6 <= hi
    assert 0 < fit.log_lr_se < 0.5
    assert fit.seed_std == pytest.approx(0.01, rel=0.6)
    assert fit.n_seeds == 5


def test_single_seed_uses_residual_bootstrap():
    lrs = [2.0**k for k in range(-10, -1)]
    rng = np.random.default_rng(2)
    fit = fit_optimum(lrs, _curve(lrs, 2.0**-6, noise=0.01, rng=rng), window=3, n_bootstrap=200)
    assert (
        math.isfinite(fit.log_lr_se) and fit.lr_opt_interval[0] < fit.lr_opt < fit.lr_opt_interval[1] * 1.0001
    )


def test_edge_optimum_is_flagged_and_not_extrapolated():
    lrs = [2.0**k for k in range(-10, -5)]
    fit = fit_optimum(lrs, _curve(lrs, 2.0**-3), n_bootstrap=0)
    assert not fit.bracketed
    assert fit.lr_opt <= max(lrs) * (1 + 1e-9)


def test_diverged_points_are_left_out():
    lrs = [2.0**k for k in range(-10, -2)]
    losses = _curve(lrs, 2.0**-6)
    losses[-1] = [None]
    losses[-2] = [float("nan")]
    fit = fit_optimum(lrs, losses, n_bootstrap=0)
    assert math.log2(fit.lr_opt) == pytest.approx(-6, abs=1e-6)
    # a diverged neighbour of the best point: not bracketed
    losses2 = _curve(lrs, 2.0**-4.2)
    losses2[-1] = [None]
    assert not fit_optimum(lrs, losses2, n_bootstrap=0).bracketed


def test_fit_optimum_errors():
    with pytest.raises(FitError):
        fit_optimum([1e-3, 2e-3], [[1.0], [1.1]])
    with pytest.raises(FitError):
        fit_optimum([1e-3, 2e-3, 4e-3], [[None], [None], [None]])
    with pytest.raises(FitError):
        fit_optimum([1e-3, 1e-3, 4e-3], [[1.0], [1.0], [1.0]])


def test_fit_slope_recovers_known_slope_and_verdicts():
    lrs = [2.0**k for k in range(-14, -1)]
    widths = [32, 64, 128, 256]
    fits_sp = [fit_optimum(lrs, _curve(lrs, 0.02 * (32 / w)), n_bootstrap=0) for w in widths]
    fits_mup = [fit_optimum(lrs, _curve(lrs, 0.02), n_bootstrap=0) for w in widths]
    sp = fit_slope(widths, fits_sp)
    mup = fit_slope(widths, fits_mup)
    assert sp.slope == pytest.approx(-1.0, abs=1e-6)
    assert mup.slope == pytest.approx(0.0, abs=1e-6)
    assert verdict_for(sp, 0.3) == "does not transfer"
    assert verdict_for(mup, 0.3) == "transfers"
    assert sp.predict(512) == pytest.approx(0.02 / 16, rel=1e-6)
    noisy = SlopeFit("width", -0.5, (-1.2, 0.2), 0.4, 0.0, [1, 2], [1, 1])
    assert verdict_for(noisy, 0.3) == "inconclusive"
    with pytest.raises(FitError):
        fit_slope([32], fits_sp[:1])


def test_analyze_rows_groups_shapes_and_reports_both_axes():
    lrs = [2.0**k for k in range(-12, -2)]
    rows = []
    for p, drift in (("sp", -1.0), ("mup", 0.0)):
        for w in (32, 64, 128):
            for d in (2, 4):
                opt = 0.01 * (w / 32) ** drift * (d / 2) ** (-0.5 if p == "sp" else 0.0)
                for lr, (v,) in zip(lrs, _curve(lrs, opt), strict=True):
                    rows.append(SweepRow(p, w, d, lr, 0, v))
    rows.append(SweepRow("sp", 32, 2, 2.0**-2, 0, None, status="diverged"))
    a = analyze_rows(rows, n_bootstrap=0)
    assert len(a.shapes) == 12
    assert a.slope("sp", "width").slope.slope == pytest.approx(-1.0, abs=1e-3)
    assert a.slope("mup", "width").verdict == "transfers"
    assert a.slope("sp", "depth").slope.slope == pytest.approx(-0.5, abs=1e-3)
    assert a.recommend_lr("mup", 1024) == pytest.approx(0.01, rel=1e-3)
    d = a.to_dict()
    assert {s["axis"] for s in d["slopes"]} == {"width", "depth"}
    with pytest.raises(FitError):
        analyze_rows([])


def test_lr_sweep_study_is_a_grid_over_parametrization_width_and_lr():
    base = {"model": {"width": 32, "n_heads": 4, "context_tokens": 16}, "train": {"tokens": 16 * 16 * 10}}
    study = lr_sweep_study("s", base, lrs=lr_grid(1e-2, 2, 1), widths=[32, 64], seeds=[0, 1])
    axes = study.design.axes
    assert axes["model.parametrization"] == ["sp", "mup"] and axes["model.width"] == [32, 64]
    assert axes["train.lr"] == [0.0025, 0.005, 0.01, 0.02]
    from scalelab.study.plan import expand_runs

    assert len(expand_runs(study)) == 2 * 2 * 4 * 2
    with pytest.raises(SpecError):
        lr_sweep_study("s", base, lrs=[1e-3, 2e-3], widths=[32])
    with pytest.raises(SpecError):
        lr_sweep_study("s", base, lrs=[1e-3, 2e-3, 4e-3], widths=[30])  # not a multiple of heads


def test_lr_rules_and_trusted_range():
    adam = scale_lr(1e-3, 64, 256, optimizer="adam")
    assert adam.lr == pytest.approx(2e-3) and adam.trusted
    sgd = scale_lr(0.1, 64, 256, optimizer="sgd")
    assert sgd.lr == pytest.approx(0.4)
    far = scale_lr(1e-3, 16, 1024, optimizer="adam")
    assert not far.trusted
    # with B_noise, both rules saturate above it
    sat = scale_lr(0.1, 10_000, 1_000_000, optimizer="sgd", b_noise=1000)
    assert sat.lr == pytest.approx(0.1 * (1e6 / 1001) / (1e4 / 11), rel=1e-6) and not sat.trusted
    small = scale_lr(0.1, 10, 20, optimizer="sgd", b_noise=1e6)
    assert small.lr == pytest.approx(0.2, rel=1e-3) and small.trusted
    with pytest.raises(SpecError):
        scale_lr(1e-3, 0, 2)


def test_recommend_batch_follows_noise_scale_and_caps_steps():
    rec = recommend_batch(
        65_536, target_tokens=10**9, context_tokens=1024, tuned_lr=1e-3, tuned_batch_sequences=16
    )
    assert rec.batch_sequences == 64 and rec.batch_tokens == 65_536
    assert rec.steps_overhead == pytest.approx(1.0)
    assert rec.lr > 1e-3
    capped = recommend_batch(
        10**7,
        target_tokens=10**8,
        context_tokens=1024,
        tuned_lr=1e-3,
        tuned_batch_sequences=16,
        min_steps=1000,
    )
    assert capped.steps >= 1000 and any("capped" in r for r in capped.reasons)
    with pytest.raises(SpecError):
        recommend_batch(float("nan"), target_tokens=1, context_tokens=1, tuned_lr=1, tuned_batch_sequences=1)


def test_evaluate_check_pass_fail_and_edge():
    ok = evaluate_check(1e-3, [0.5, 1, 2], [[2.02, 2.03], [2.00, 2.01], [2.05, 2.04]])
    assert ok.passed and ok.best_multiplier == 1 and ok.gap == 0 and not ok.best_at_edge
    bad = evaluate_check(1e-2, [0.5, 1, 2], [[2.0], [2.3], [None]], tolerance=0.01)
    assert not bad.passed and bad.best_multiplier == 0.5 and bad.best_at_edge
    assert bad.gap == pytest.approx(0.15)
    diverged = evaluate_check(1e-1, [0.5, 1, 2], [[2.0], [None], [None]])
    assert not diverged.passed and diverged.transferred_loss is None
    with pytest.raises(SpecError):
        evaluate_check(1e-3, [0.5, 2], [[1.0], [1.0]])
    assert bad.to_dict()["points"][0]["mean"] == 2.0


def test_coord_summary_slopes():
    rows = [{"width": w, "step": 1, "layer": "logits", "rms": 0.1 * w} for w in (32, 64, 128)] + [
        {"width": w, "step": 1, "layer": "block.0", "rms": 0.3} for w in (32, 64, 128)
    ]
    layers = {c.layer: c for c in summarize_coord_check(rows)}
    assert layers["logits"].slope == pytest.approx(1.0) and not layers["logits"].stable
    assert layers["block.0"].stable


def test_seed_variances_are_reported_per_lr():
    lrs = [2.0**k for k in range(-8, -3)]
    rows = [
        SweepRow("mup", 32, 2, lr, seed, 2.0 + 0.1 * (math.log2(lr) + 6) ** 2 + 0.01 * seed)
        for lr in lrs
        for seed in (0, 1, 2)
    ]
    shape = analyze_rows(rows, n_bootstrap=50).shapes[0]
    assert shape.loss_variances == pytest.approx([0.0001] * len(lrs))
    assert shape.fit.seed_std == pytest.approx(0.01)
    assert shape.to_dict()["loss_variances"][0] == pytest.approx(0.0001)


def test_plot_picks_depth_axis_when_only_depth_was_swept(tmp_path):
    from scalelab.transfer.plot import plot_analysis

    lrs = [2.0**k for k in range(-10, -2)]
    rows = [
        SweepRow(p, 32, d, lr, 0, 2 + 0.1 * (math.log2(lr) + 6 + (math.log2(d) if p == "sp" else 0)) ** 2)
        for p in ("sp", "depth_mup")
        for d in (1, 2, 4)
        for lr in lrs
    ]
    a = analyze_rows(rows, n_bootstrap=20)
    assert {s.axis for s in a.slopes} == {"depth"}
    out = plot_analysis(a, tmp_path / "d.png")
    assert out.read_bytes()[:4] == b"\x89PNG"
