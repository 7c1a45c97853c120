"""Energy and cost: forecast by `study plan` (price from the spec or --price), totalled from records."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scalelab.energy import busy_watts
from scalelab.errors import SpecError
from scalelab.registry import Registry
from scalelab.spec import load_study
from scalelab.study.forecast import Forecaster, Pricing, plan_rows
from scalelab.study.plan import expand_runs
from scalelab.study.spend import spend_sentence, study_spend

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SMALL = ["design.axes={'model.width'=[16, 32]}", "model.context_tokens=32", "train.tokens=4096"]


def test_forecast_section_is_validated_and_optional() -> None:
    study = load_study(EXAMPLES / "quickstart.toml", SMALL)
    assert study.forecast.price_per_device_hour is None and study.forecast.currency == "USD"
    priced = load_study(EXAMPLES / "quickstart.toml", [*SMALL, "forecast.price_per_device_hour=2.5"])
    assert priced.forecast.price_per_device_hour == 2.5
    with pytest.raises(SpecError, match="price_per_device_hour"):
        load_study(EXAMPLES / "quickstart.toml", [*SMALL, "forecast.price_per_device_hour=-1"])


def test_plan_forecasts_energy_and_cost_from_the_measured_time(tmp_path: Path) -> None:
    study = load_study(EXAMPLES / "quickstart.toml", [*SMALL, "forecast.price_per_device_hour=3.0"])
    runs = expand_runs(study)
    pricing = Pricing.from_spec(study.forecast, devices_per_run=2)
    plan = plan_rows(runs, Forecaster(tmp_path / "forecast.json"), 1, pricing)
    watts, origin = busy_watts(torch.device("cpu"), study.train.threads)
    assert watts is not None and watts > 0 and "CPUs" in origin
    for row in plan["runs"]:
        seconds = row["forecast_seconds"]
        assert seconds > 0
        assert row["forecast_cost"] == pytest.approx(3.0 * 2 * seconds / 3600)
        assert row["forecast_energy_joules"] == pytest.approx(watts * seconds * 2)
    total = plan["total"]
    assert total["forecast_cost"] == pytest.approx(sum(r["forecast_cost"] for r in plan["runs"]))
    assert total["forecast_energy_joules"] == pytest.approx(
        sum(r["forecast_energy_joules"] for r in plan["runs"])
    )
    overridden = Pricing.from_spec(study.forecast, price=1.0)
    assert overridden.price_per_device_hour == 1.0 and overridden.currency == "USD"
    unpriced = plan_rows(runs, None, 1, Pricing())
    assert unpriced["total"]["forecast_cost"] is None and unpriced["total"]["forecast_energy_joules"] is None


def test_cli_plan_price_flag_totals_cost(tmp_path: Path) -> None:
    env = {**os.environ, "SCALELAB_CACHE_DIR": str(tmp_path / "cache")}
    args = [str(EXAMPLES / "quickstart.toml"), *[a for s in SMALL for a in ("--set", s)]]
    cmd = [sys.executable, "-m", "scalelab", "study", "plan", *args]
    out = subprocess.run(
        [*cmd, "--price", "4", "--json"], capture_output=True, text=True, env=env, timeout=300
    )
    assert out.returncode == 0, out.stderr
    total = json.loads(out.stdout)["total"]
    assert total["price_per_device_hour"] == 4.0
    assert total["forecast_cost"] == pytest.approx(4.0 * total["forecast_run_seconds"] / 3600)
    assert total["forecast_energy_joules"] > 0
    shown = subprocess.run([*cmd, "--price", "4"], capture_output=True, text=True, env=env, timeout=300)
    assert shown.returncode == 0 and "USD" in shown.stdout, shown.stderr
    assert re.search(r"energy [\d.,]+ (J|Wh|kWh|MWh)\b", shown.stdout), shown.stdout  # no e-notation
    assert max(len(line) for line in shown.stdout.splitlines()) <= 80  # subprocess output: 80 columns
    bad = subprocess.run([*cmd, "--price", "-1"], capture_output=True, text=True, env=env, timeout=60)
    assert bad.returncode == 2 and "--price" in bad.stderr and "Traceback" not in bad.stderr


def test_spend_totals_recorded_energy_by_source_and_prices_device_hours(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "registry.sqlite")
    records = {
        "a": {"status": "done", "wall_seconds": 1800.0, "energy_joules": 3.6e6, "energy_source": "measured"},
        "b": {"status": "done", "wall_seconds": 1800.0, "energy_joules": 1.8e6, "energy_source": "estimated"},
        "c": {"status": "failed", "wall_seconds": 3600.0, "energy_joules": None, "world_size": 2},
    }
    for run_id, rec in records.items():
        reg.add_planned(run_id, "{}", run_id)
        reg.record_result(run_id, {"run_id": run_id, **rec})
    reg.add_planned("never", "{}", "never")  # pending: spent nothing, counted nowhere
    runs = reg.runs()
    spend = study_spend(runs, {"price_per_device_hour": 2.0, "currency": "EUR"})
    assert spend.energy_joules == pytest.approx(5.4e6)
    assert spend.by_source == {"measured": 1, "estimated": 1, "unavailable": 1}
    assert spend.device_hours == pytest.approx(0.5 + 0.5 + 2.0) and spend.cost == pytest.approx(6.0)
    line = spend_sentence(runs, {"price_per_device_hour": 2.0, "currency": "EUR"})
    assert "1.5 kWh" in line and "1 unavailable" in line and "6.00 EUR" in line
    assert "cost" not in spend_sentence(runs, None)
    reg.close()


def test_energy_reads_without_e_notation() -> None:
    from scalelab.units import energy

    assert [energy(j) for j in (68, 5.4e4, 7.2e7, 9e9, None)] == ["68 J", "15 Wh", "20 kWh", "2.5 MWh", "—"]
    assert energy(3.6e12) == "1,000 MWh"
