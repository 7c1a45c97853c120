"""Report sections that follow the design: per-group curves, seed spread per config, diminishing returns
of a one-factor-at-a-time design; and the planner's `ofat` design they come from."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from scalelab.fit.api import FitReport, fit_table, table_from_study
from scalelab.fit.returns import factor_returns
from scalelab.fit.synthetic import chinchilla_loss
from scalelab.registry import Registry
from scalelab.report.design import seed_spread
from scalelab.report.html import build_report
from scalelab.spec import study_from_dict
from scalelab.study.plan import expand_runs

LAWS = {
    "python": {"E": 1.0, "A": 30.0, "B": 50.0, "alpha": 0.3, "beta": 0.3},
    "docs": {"E": 1.4, "A": 30.0, "B": 80.0, "alpha": 0.3, "beta": 0.3},
}


def _fake(root: Path, rows: list[dict], design: dict | None = None) -> Path:
    d = root / "study"
    (d / "report").mkdir(parents=True)
    (d / "study.json").write_text(json.dumps({"name": "d", "fit": {"bootstrap": 20}, "design": design or {}}))
    with Registry(d / "registry.sqlite") as reg:
        for i, r in enumerate(rows):
            rid = f"run{i:03d}"
            reg.add_planned(rid, "{}", "h", point=r.pop("point"), seed=r.pop("seed", 0))
            reg.record_result(rid, {"status": "done", "final_train_loss": r["eval_loss"], **r})
    return d


def _fit(d: Path) -> FitReport:
    """The study's fit.json, as `scalelab fit` writes it (fewer refits: no law comparison, no k-fold)."""
    rep = fit_table(table_from_study(d), "chinchilla", bootstrap=10, compare=False, cv_folds=0)
    rep.save(d / "report" / "fit.json")
    return rep


def _grouped_rows(seeds: int = 1) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for g, law in LAWS.items():
        for n in (2e4, 5e4, 1e5, 3e5):
            for tok in (2e5, 8e5, 3e6):
                for seed in range(seeds):
                    loss = float(chinchilla_loss(law, n, tok)) * float(np.exp(0.01 * rng.standard_normal()))
                    rows.append(
                        {
                            "point": {"group": g},
                            "seed": seed,
                            "n_params": int(n),
                            "tokens": int(tok),
                            "flops": 6 * n * tok,
                            "eval_loss": loss,
                        }
                    )
    return rows


def test_a_grouped_study_fits_per_group_laws_and_reports_each_groups_curve(tmp_path: Path) -> None:
    d = _fake(tmp_path, _grouped_rows())
    table = table_from_study(d)
    assert table.groups == ["python", "docs"]
    rep = _fit(d)
    groups = rep.to_dict()["groups"]
    assert set(groups["separate"]["params"]) == {"python", "docs"}
    assert set(groups["separate"]["intervals"]) == {"python", "docs"}
    html = build_report(d).read_text()
    assert 'id="groups"' in html and "group python (12 runs)" in html and "does the law transfer?" in html
    assert (d / "report" / "groups.png").stat().st_size > 1000


def test_seed_replicates_give_a_spread_per_config_and_its_effect_on_intervals(tmp_path: Path) -> None:
    rows = [r for r in _grouped_rows(seeds=2) if r["point"]["group"] == "python"]
    for r in rows:
        r["point"] = {}
    spread = seed_spread(rows, "eval_loss", "n_params")
    assert len(spread) == 12 and all(c["seeds"] == 2 for c in spread)
    pooled = np.sqrt(np.mean([c["log_sd"] ** 2 for c in spread]))
    assert 0.003 < pooled < 0.03  # the simulated noise is 1 %
    d = _fake(tmp_path, rows)
    _fit(d)
    html = build_report(d).read_text()
    assert 'id="seeds"' in html and "pooled run-to-run spread" in html and "calibrated error floor" in html


def test_no_design_sections_for_a_plain_single_seed_study(tmp_path: Path) -> None:
    rows = [r for r in _grouped_rows() if r["point"]["group"] == "python"]
    for r in rows:
        r["point"] = {}
    html = build_report(_fake(tmp_path, rows)).read_text()
    assert 'id="groups"' not in html and 'id="seeds"' not in html and 'id="returns"' not in html


def test_ofat_design_grows_one_factor_at_a_time() -> None:
    spec = study_from_dict(
        {
            "study": {
                "name": "o",
                "train": {"tokens": 65536},
                "design": {
                    "kind": "ofat",
                    "factors": {
                        "train.tokens": [65536, 131072, 262144],
                        "model.width": [64, 128],
                        "compute": [1, 16],
                    },
                },
            }
        }
    )
    runs = expand_runs(spec)
    base = [r for r in runs if len(r.point["factors"]) == 3]
    assert len(base) == 1 and base[0].spec.model.width == 64 and base[0].tokens == 65536
    for r in runs:
        (factor, value), *more = r.point["factors"].items()
        if more:
            continue
        if factor == "train.tokens":
            assert r.spec.model.width == 64 and r.tokens == value
        elif factor == "model.width":
            assert r.spec.model.width == value and r.tokens == 65536
        else:  # compute × 16: width × 2, tokens × 4
            assert r.spec.model.width == 128 and r.tokens == 4 * 65536
    assert len(runs) == 5


def test_diminishing_returns_finds_where_the_gain_per_doubling_falls_under_the_threshold() -> None:
    tokens = [2**k * 1e5 for k in range(6)]
    law = LAWS["python"]
    runs = [{"tokens": t, "eval_loss": float(chinchilla_loss(law, 1e5, t))} for t in tokens]
    f = factor_returns("train.tokens", runs, threshold=0.2)
    expected = [(runs[i]["eval_loss"] - runs[i + 1]["eval_loss"]) for i in range(5)]
    assert f.gain_per_doubling == pytest.approx(expected)
    first_small = next(i for i, g in enumerate(expected) if g < 0.2)
    assert first_small > 0
    assert f.exhausted_at == tokens[first_small] and "diminishing returns" in f.sentence()
    assert factor_returns("train.tokens", runs, threshold=1e-6).exhausted_at is None


def test_the_report_shows_diminishing_returns_of_an_ofat_study(tmp_path: Path) -> None:
    law = LAWS["python"]
    rows = []
    for t in (1e5, 2e5, 4e5, 8e5):
        rows.append(
            {
                "point": {"factors": {"train.tokens": t}},
                "n_params": 50000,
                "tokens": int(t),
                "flops": 3e5 * t,
                "eval_loss": float(chinchilla_loss(law, 5e4, t)),
            }
        )
    for n in (1e5, 2e5):
        rows.append(
            {
                "point": {"factors": {"model.width": n}},
                "n_params": int(n),
                "tokens": 100000,
                "flops": 6e5 * n,
                "eval_loss": float(chinchilla_loss(law, n, 1e5)),
            }
        )
    rows[0]["point"]["factors"]["model.width"] = 64  # the base run is on both ladders
    d = _fake(tmp_path, rows, design={"kind": "ofat", "threshold": 0.05})
    html = build_report(d).read_text()
    assert 'id="returns"' in html and "threshold 0.05" in html
    assert (d / "report" / "returns.png").stat().st_size > 1000
