"""`scalelab fit` / `scalelab recommend` commands and fitting a study directory's registry."""

from __future__ import annotations

import json

import numpy as np
import pytest
import typer
from rich.console import Console
from typer.testing import CliRunner

from scalelab.errors import FitError
from scalelab.fit import synthetic
from scalelab.fit.api import fit_study, recommend
from scalelab.fit.commands import register, render_recommendation


@pytest.fixture()
def app() -> typer.Typer:
    a = typer.Typer()

    @a.callback()
    def _root() -> None:  # a group, so `fit` and `recommend` are sub-commands
        pass

    register(a)
    return a


@pytest.fixture()
def csv_path(tmp_path):
    t = synthetic.simulate(noise=0.005, seed=2)
    p = tmp_path / "runs.csv"
    p.write_text(
        "N,D,loss\n"
        + "".join(
            f"{float(a)!r},{float(b)!r},{float(c)!r}\n" for a, b, c in zip(t.N, t.D, t.loss, strict=True)
        )
    )
    return p


def test_fit_and_recommend_commands(app, csv_path, tmp_path):
    r = CliRunner()
    out = tmp_path / "fit.json"
    res = r.invoke(app, ["fit", str(csv_path), "--bootstrap", "30", "--jobs", "1", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "alpha" in res.output and out.is_file()
    res = r.invoke(
        app,
        [
            "fit",
            str(csv_path),
            "--bootstrap",
            "0",
            "--law",
            "kaplan",
            "--json",
            "--out",
            str(tmp_path / "k.json"),
        ],
    )
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["fit"]["law"] == "kaplan"
    res = r.invoke(app, ["recommend", str(out), "--compute", "1e21", "--json"])
    assert res.exit_code == 0, res.output
    rec = json.loads(res.output)
    assert rec["N_opt"] > 0 and rec["intervals"]["N_opt"][0] <= rec["N_opt"] <= rec["intervals"]["N_opt"][1]
    res = r.invoke(app, ["recommend", str(out), "--target-loss", "2.4"])
    assert res.exit_code == 0, res.output
    assert "compute needed" in res.output
    res = r.invoke(app, ["recommend", str(out), "--compute", "1e21"])
    assert res.exit_code == 0, res.output
    assert "N_opt (params, the table's N)" in res.output  # a CSV's N is whatever its column holds


def test_commands_raise_fit_errors(app, csv_path, tmp_path):
    r = CliRunner()
    res = r.invoke(app, ["fit", str(csv_path), "--law", "nonsense"])
    assert isinstance(res.exception, FitError)
    res = r.invoke(app, ["fit", str(tmp_path / "missing.csv")])
    assert isinstance(res.exception, FitError)
    res = r.invoke(app, ["fit", str(csv_path), "--holdout", "smallest:2"])
    assert isinstance(res.exception, FitError) and "largest:K" in str(res.exception)


def _make_study(tmp_path, n_seeds: int = 1):
    registry = pytest.importorskip("scalelab.registry")
    study = tmp_path / "study"
    study.mkdir()
    reg = registry.Registry(study / "registry.sqlite")
    N, D = synthetic.grid_design()
    rng = np.random.default_rng(0)
    i = 0
    for n, d in zip(N, D, strict=True):
        for s in range(n_seeds):
            rid = f"r{i:03d}"
            i += 1
            reg.add_planned(rid, "{}", rid, seed=s)
            loss = float(synthetic.chinchilla_loss(synthetic.HOFFMANN, n, d)) * float(
                np.exp(0.005 * rng.standard_normal())
            )
            record = {
                "run_id": rid,
                "status": "done",
                "n_params": int(n),
                "n_params_total": int(n * 1.1),
                "tokens": int(d),
                "flops": float(6.3 * n * d),
                "eval_loss": loss,
                "final_train_loss": loss * 0.99,
            }
            reg.record_result(rid, record)
    reg.add_planned("failed1", "{}", "failed1", seed=0)
    reg.record_result("failed1", {"run_id": "failed1", "status": "failed", "error": "boom"})
    close = getattr(reg, "close", None)
    if close:
        close()
    return study


def test_fit_study_directory(tmp_path):
    study = _make_study(tmp_path, n_seeds=2)
    rep = fit_study(study, bootstrap=20, seed=0, n_jobs=1, compare=False)
    d = rep.to_dict()
    assert d["data"]["n_runs"] == 60  # the failed run is not fitted
    assert d["data"]["compute_source"] == "table"
    assert d["fit"]["accounting"]["kind"] == "table"
    assert d["fit"]["accounting"]["k"] == pytest.approx(6.3, rel=1e-6)
    assert d["fit"]["bootstrap"]["unit"].startswith("config")
    assert (study / "report" / "fit.json").is_file()
    rec = recommend(study / "report" / "fit.json", compute=1e21)
    assert "6.3" in rec["accounting"] and rec["N_opt"] * rec["D_opt"] * 6.3 == pytest.approx(1e21, rel=1e-6)
    assert rec["n_params"] == "non_embedding"
    console = Console(record=True, width=200)
    render_recommendation(rec, console)
    assert "N_opt (non-embedding params)" in console.export_text()
    console = Console(record=True, width=200)
    render_recommendation({**rec, "n_params": "total"}, console)
    assert "N_opt (total params)" in console.export_text()
