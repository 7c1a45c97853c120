"""Planning: grid expansion, IsoFLOP budgets within the stated tolerance, pre-registration, forecasts."""

from __future__ import annotations

from pathlib import Path

import pytest

from scalelab.errors import SpecError
from scalelab.models.flops import ModelShape
from scalelab.spec import load_study
from scalelab.study.forecast import Forecaster, total_wall_seconds
from scalelab.study.plan import MIN_ISOFLOP_STEPS, expand_runs, isoflop_tolerance, planning_vocab
from scalelab.study.preregister import freeze

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_quickstart_grid_has_twelve_distinct_runs() -> None:
    runs = expand_runs(load_study(EXAMPLES / "quickstart.toml"))
    assert len(runs) == 12 and len({r.run_id for r in runs}) == 12
    assert {r.spec.model.width for r in runs} == {32, 64, 128}
    assert len({r.tokens for r in runs}) == 4
    for r in runs:
        shape = ModelShape.from_spec(r.spec.model, planning_vocab(r.spec))
        assert r.flops == shape.training_flops(r.tokens)


def test_isoflop_runs_match_their_budget_within_the_stated_tolerance() -> None:
    study = load_study(EXAMPLES / "isoflop.toml")
    runs = expand_runs(study)
    budgets = study.design.budgets_flops
    assert len(runs) == len(budgets) * study.design.models_per_budget
    for r in runs:
        budget = r.point["budget_flops"]
        tol = isoflop_tolerance(r)
        assert tol <= 0.5 / MIN_ISOFLOP_STEPS + 1e-12
        assert abs(r.flops / budget - 1) <= tol, (r.run_id, r.flops, budget, tol)
    # each budget spans sizes: larger budgets reach larger models
    for budget in budgets:
        widths = sorted(r.spec.model.width for r in runs if r.point["budget_flops"] == budget)
        assert len(set(widths)) == study.design.models_per_budget


def test_isoflop_with_too_few_usable_widths_is_an_error(tmp_path: Path) -> None:
    spec = tmp_path / "iso.toml"
    spec.write_text((EXAMPLES / "isoflop.toml").read_text())
    with pytest.raises(SpecError, match="usable widths for budget"):
        expand_runs(load_study(spec, ["design.widths=[16, 24, 32]", "design.budgets_flops=[1e9]"]))


def test_preregistration_is_frozen(tmp_path: Path) -> None:
    study = load_study(EXAMPLES / "quickstart.toml")
    first = freeze(study, tmp_path)
    assert freeze(study, tmp_path)["sha256"] == first["sha256"]
    changed = load_study(EXAMPLES / "quickstart.toml", ["fit.law='kaplan'"])
    with pytest.raises(SpecError, match="pre-registered analysis plan changed \\(fit"):
        freeze(changed, tmp_path)


def test_forecast_is_measured_cached_and_scheduled(tmp_path: Path) -> None:
    study = load_study(
        EXAMPLES / "quickstart.toml", ["design.axes={'model.width'=[16, 32]}", "model.context_tokens=32"]
    )
    runs = expand_runs(study)
    fc = Forecaster(tmp_path / "forecast.json")
    first = [fc.forecast(r) for r in runs]
    assert all(f is not None and f.seconds > 0 and f.tokens_per_second > 0 for f in first)
    cached = Forecaster(tmp_path / "forecast.json", measure=False)
    assert [cached.forecast(r) for r in runs] == first  # second plan: nothing measured again
    serial = total_wall_seconds(first, 1)
    assert serial == pytest.approx(sum(f.seconds for f in first))
    assert total_wall_seconds(first, 2) <= serial


def test_wall_forecast_waits_for_wsd_trunks() -> None:
    from scalelab.study.forecast import Forecast

    runs = [Forecast(10.0, 0, 1.0), Forecast(2.0, 0, 1.0), Forecast(2.0, 0, 1.0)]
    assert total_wall_seconds(runs, 2) == 10.0  # independent: the branches fit beside the trunk
    assert total_wall_seconds(runs, 2, [None, 0, 0]) == 12.0  # branches start when the trunk ends
    assert total_wall_seconds(runs, 1, [None, 0, 0]) == 14.0


def test_a_measurement_taken_under_another_load_is_retaken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    from scalelab import hw
    from scalelab.study import forecast as fc

    study = load_study(
        EXAMPLES / "quickstart.toml", ["design.axes={'model.width'=[16]}", "model.context_tokens=32"]
    )
    run = expand_runs(study)[0]
    path = tmp_path / "forecast.json"
    first = fc.Forecaster(path).forecast(run)
    cache = json.loads(path.read_text())
    (entry,) = [e for per_machine in cache.values() for e in per_machine.values()]
    assert entry["load_per_cpu"] is not None
    calls = []
    monkeypatch.setattr(
        fc, "measure_throughput", lambda spec: calls.append(spec) or fc.Throughput(1e3, 1, 0.1)
    )
    monkeypatch.setattr(hw, "load_per_cpu", lambda: entry["load_per_cpu"])  # what load_changed reads
    assert fc.Forecaster(path).forecast(run) == first and not calls  # same load: the cache answers
    monkeypatch.setattr(hw, "load_per_cpu", lambda: entry["load_per_cpu"] + 1.0)
    assert fc.Forecaster(path, measure=False).forecast(run) == first  # not allowed to measure: keep it
    again = fc.Forecaster(path).forecast(run)
    assert len(calls) == 1 and again.tokens_per_second == 1e3  # busier machine: measured again


def test_forecasts_of_different_families_are_measured_apart():
    """The throughput cache keys on the model family and its attention shape, not only width × depth."""
    from scalelab.spec import RunSpec
    from scalelab.study.forecast import shape_key

    base = {"model": {"width": 32, "depth": 2, "n_heads": 4, "context_tokens": 16}, "data": {"store": "/x"}}
    keys = {
        shape_key(RunSpec.model_validate({**base, "model": {**base["model"], **extra}}))
        for extra in (
            {},
            {"family": "llama"},
            {"family": "llama", "n_kv_heads": 2},
            {"family": "llama", "qk_norm": True},
        )
    }
    assert len(keys) == 4
