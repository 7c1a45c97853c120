"""Convergence lag (train/lag.py, report/lag.py): the loss gap at equal training time against the run named
by `train.reference_run`, in metrics.jsonl and in the report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from scalelab.report.lag import lag_sections, lag_summary
from scalelab.spec import RunSpec
from scalelab.train.lag import LossCurve
from scalelab.train.run import run_training
from train_synthetic import SyntheticStore, synthetic_factory, tiny_run_spec

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SCALELAB_CACHE_DIR", str(tmp_path / "cache"))


def spec(steps: int = 16, **extra) -> RunSpec:
    return tiny_run_spec(steps, **extra)


def rows(out: Path) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_loss_curve_interpolates_in_time_and_never_extrapolates() -> None:
    curve = LossCurve.from_rows(
        [
            {"step": 1, "loss": 4.0, "step_seconds": 1.0},
            {"eval_loss": 9.0},
            {"step": 2, "loss": 2.0, "step_seconds": 1.0},
        ]
    )
    assert curve.seconds == (1.0, 2.0)
    assert curve.at(1.0) == 4.0 and curve.at(1.5) == 3.0 and curve.at(2.0) == 2.0
    assert curve.at(0.5) is None and curve.at(2.5) is None


def test_a_slowed_run_lags_its_unloaded_reference(tmp_path) -> None:
    store = SyntheticStore()
    ref = tmp_path / "ref"
    assert run_training(spec(), ref, store=store, loader_factory=synthetic_factory)["status"] == "done"
    # the same config with every step slowed by 20 ms (a contended worker), compared with the reference
    slow_spec = spec(execution={"reference_run": str(ref)}, debug={"sleep_seconds_per_step": 0.02})
    plain_slow = spec(debug={"sleep_seconds_per_step": 0.02})
    assert slow_spec.run_id == plain_slow.run_id  # [execution]: the reference does not change the id
    out = tmp_path / "slow"
    record = run_training(slow_spec, out, store=store, loader_factory=synthetic_factory)
    assert record["status"] == "done", record["error"]

    mine, theirs = rows(out), rows(ref)
    assert [r["loss"] for r in mine] == [r["loss"] for r in theirs]  # same data and seed: same losses
    curve = LossCurve.from_rows(theirs)
    compared = [r for r in mine if "convergence_lag" in r]
    assert compared and all(r["train_seconds"] <= curve.seconds[-1] for r in compared)
    assert all("convergence_lag" not in r for r in mine if r["train_seconds"] > curve.seconds[-1])
    for r in compared:  # the definition, recomputed from the two files
        assert r["reference_loss"] == pytest.approx(curve.at(r["train_seconds"]), abs=1e-12)
        assert r["convergence_lag"] == pytest.approx(r["loss"] - r["reference_loss"], abs=1e-12)
    summary = lag_summary(mine)
    assert summary is not None and summary["mean"] > 0  # behind: the reference got further in the same time

    runs = [{"run_id": record["run_id"], "run_dir": str(out)}, {"run_id": "ref", "run_dir": str(ref)}]
    [(sid, title, body)] = lag_sections(runs)
    assert sid == "convergence-lag" and str(ref) in body and f"{summary['mean']:+.4f}" in body
    assert "<code>ref</code>" not in body  # the reference itself measured no lag


def test_a_missing_reference_fails_the_run_naming_the_field(tmp_path) -> None:
    s = spec(steps=2, execution={"reference_run": str(tmp_path / "nowhere")})
    record = run_training(s, tmp_path / "r", store=SyntheticStore(), loader_factory=synthetic_factory)
    assert record["status"] == "failed" and "train.reference_run" in record["error"]
