"""End to end on a reduced sweep: the LR optimum stays put under μP and moves under SP; checks pass/fail.

The reduced sweep (default suite, ~50 s CPU on one core): synthetic Markov text (vocab 64), GPT depth
2, context 16, batch 16, 60 AdamW steps, widths 32/64/128 (μP base width 32), LRs 2^-10 … 2^-3, one seed,
no weight decay. Measured on the development machine: μP slope +0.07, SP slope −1.16 (ln LR* vs ln width).
The assertion tolerance is `DEFAULT_SLOPE_TOLERANCE` = 0.3 for μP; SP must be below −0.5 with its whole
90 % interval below −0.3.
"""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from scalelab.spec import RunSpec
from scalelab.transfer.analyze import (
    DEFAULT_SLOPE_TOLERANCE,
    analyze_rows,
    analyze_study,
    rows_from_results,
)
from scalelab.transfer.check import run_check
from scalelab.transfer.commands import app
from scalelab.transfer.sweep import lr_sweep_study, run_sweep_in_process
from train_synthetic import SyntheticStore, synthetic_factory

STEPS, CTX, BATCH = 60, 16, 16
WIDTHS = [32, 64, 128]
LRS = [2.0**k for k in range(-10, -2)]
BASE = {
    "model": {
        "width": 32,
        "depth": 2,
        "n_heads": 4,
        "context_tokens": CTX,
        "base_width": 32,
        "base_depth": 2,
    },
    "train": {
        "tokens": STEPS * BATCH * CTX,
        "global_batch_size": BATCH,
        "lr": 1e-2,
        "eval_tokens": 2048,
        "eval_interval_steps": 10_000,
        "checkpoint_interval_steps": 10_000,
        "weight_decay": 0.0,
        "device": "cpu",
    },
}


@pytest.fixture(scope="module")
def store():
    return SyntheticStore(vocab_size=64, tokens=200_000)


@pytest.fixture(scope="module")
def sweep(store):
    study = lr_sweep_study("transfer-test", BASE, lrs=LRS, widths=WIDTHS, seeds=[0])
    return study, run_sweep_in_process(study, store=store, loader_factory=synthetic_factory)


@pytest.fixture(scope="module")
def analysis(sweep):
    return analyze_rows(rows_from_results(sweep[1]), n_bootstrap=200)


def test_mup_optimum_is_flat_and_sp_optimum_falls(analysis):
    mup = analysis.slope("mup", "width")
    sp = analysis.slope("sp", "width")
    print(f"\nμP slope {mup.slope.slope:+.3f} {mup.slope.slope_interval}; SP slope {sp.slope.slope:+.3f} "
          f"{sp.slope.slope_interval}")  # fmt: skip
    assert abs(mup.slope.slope) <= DEFAULT_SLOPE_TOLERANCE
    assert mup.verdict == "transfers"
    assert sp.slope.slope < -0.5
    assert sp.slope.slope_interval[1] < -DEFAULT_SLOPE_TOLERANCE
    assert sp.verdict == "does not transfer"
    # at the base width μP is SP: the same optimum
    base = {s.parametrization: s.fit.lr_opt for s in analysis.shapes if s.width == 32}
    assert base["sp"] == pytest.approx(base["mup"])
    for s in analysis.shapes:
        assert s.fit is not None and s.fit.bracketed, s


def test_analyze_reads_a_study_registry_and_plots(sweep, analysis, tmp_path):
    from scalelab.registry import Registry
    from scalelab.spec import config_hash

    study, results = sweep
    with Registry(tmp_path / "registry.sqlite") as reg:
        for r in results:
            spec = r["spec"]
            reg.add_planned(spec.run_id, spec.canonical_json(), config_hash(spec), point=r["point"], seed=0)
            reg.record_result(
                spec.run_id, {"status": r["status"], "eval_loss": r["eval_loss"], "error": None}
            )
        extra = RunSpec.model_validate({**BASE, "train": {**BASE["train"], "seed": 7}})
        reg.add_planned(extra.run_id, extra.canonical_json(), config_hash(extra), seed=7)  # still pending
    from_reg = analyze_study(tmp_path)
    assert from_reg.slope("mup").slope.slope == pytest.approx(analysis.slope("mup").slope.slope)
    assert "not finished" in from_reg.warnings[0]

    png = tmp_path / "transfer.png"
    res = CliRunner().invoke(app, ["analyze", str(tmp_path), "--json", "--plot", str(png)])
    assert res.exit_code == 0, res.output
    d = json.loads(res.output)
    assert {s["verdict"] for s in d["slopes"]} == {"transfers", "does not transfer"}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res = CliRunner().invoke(app, ["analyze", str(tmp_path), "--target-width", "256"])
    assert res.exit_code == 0 and "LR predicted at width 256" in res.output


def test_transfer_check_passes_for_mup_and_fails_for_sp_and_a_wrong_lr(analysis, store):
    """Tune at width 32, transfer to width 128: μP holds; SP (same LR) and a deliberately wrong LR fail."""
    tuned = next(s.fit.lr_opt for s in analysis.shapes if s.parametrization == "mup" and s.width == 32)
    target = RunSpec.model_validate(
        {**BASE, "model": {**BASE["model"], "width": 128, "parametrization": "mup"}}
    )
    kw = {"store": store, "loader_factory": synthetic_factory, "tolerance": 0.02}
    ok = run_check(target, tuned, **kw)
    assert ok.passed, ok.reasons
    wrong = run_check(target, tuned * 8, **kw)
    assert not wrong.passed and wrong.best_multiplier == 0.5, wrong.reasons
    assert wrong.gap is not None and wrong.gap > 0.02
    sp_target = RunSpec.model_validate(
        {**BASE, "model": {**BASE["model"], "width": 128, "parametrization": "sp"}}
    )
    sp = run_check(sp_target, tuned, **kw)
    assert not sp.passed, sp.reasons
    print(
        f"\ncheck μP gap {ok.gap:.2%}, wrong-LR gap {wrong.gap:.2%}, SP gap {sp.gap if sp.gap is None else f'{sp.gap:.2%}'}"
    )


def test_check_cli_records_runs_and_exits_1_on_failure(tmp_path, monkeypatch):
    """The CLI on a tiny real-text config: a wildly high LR fails (exit 1), records runs under --out."""
    monkeypatch.setenv("SCALELAB_CACHE_DIR", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for doc in range(60):  # documents are files; the held-out split takes whole documents
        text = "".join(f"def f{i}(x):\n    return x * {i} + {doc}\n\n" for i in range(100))
        (corpus / f"d{doc:02d}.txt").write_text(text)
    cfg = tmp_path / "run.toml"
    cfg.write_text(
        f"""
[model]
width = 32
depth = 1
n_heads = 4
context_tokens = 16
parametrization = "mup"
base_width = 32
[data]
sources = [{{kind = "text", path = "{corpus}"}}]
[train]
tokens = {30 * 8 * 16}
global_batch_size = 8
lr = 0.5
eval_tokens = 512
weight_decay = 0.0
device = "cpu"
threads = 1
"""
    )
    res = CliRunner().invoke(
        app, ["check", str(cfg), "--multipliers", "0.01,1", "--out", str(tmp_path / "chk"), "--json"]
    )
    assert res.exit_code == 1, res.output
    d = json.loads(res.output[res.output.index("{") :])
    assert d["passed"] is False and d["best_multiplier"] == 0.01
    assert len(list((tmp_path / "chk" / "runs").iterdir())) == 2
    assert math.isfinite(d["points"][0]["mean"])


def test_depth_mup_optimum_is_flat_across_depth(store):
    """Depth 1/2/4 at the base width (μP = SP there): depth-μP keeps the optimum, SP's falls with depth.

    Measured (depths 1…8, development machine): depth-μP slope −0.06, SP −0.59 (ln LR* vs ln depth).
    """
    base = {**BASE, "model": {**BASE["model"], "base_depth": 1}}
    study = lr_sweep_study(
        "depth-test",
        base,
        lrs=[2.0**k for k in range(-9, -2)],
        depths=[1, 2, 4],
        parametrizations=["sp", "depth_mup"],
    )
    a = analyze_rows(
        rows_from_results(run_sweep_in_process(study, store=store, loader_factory=synthetic_factory))
    )
    dmup, sp = a.slope("depth_mup", "depth"), a.slope("sp", "depth")
    print(f"\ndepth-μP depth slope {dmup.slope.slope:+.3f}; SP {sp.slope.slope:+.3f}")
    assert abs(dmup.slope.slope) <= DEFAULT_SLOPE_TOLERANCE and dmup.verdict == "transfers"
    assert sp.slope.slope < -DEFAULT_SLOPE_TOLERANCE and sp.verdict == "does not transfer"


@pytest.mark.slow
def test_full_sweep_three_seeds_four_widths(store):
    """Widths 32…256, 3 seeds (seed bootstrap intervals): same direction, tighter evidence (~8 min).

    Measured: μP slope +0.002 [−0.085, +0.069], SP −1.015 [−1.11, −0.95].
    """
    study = lr_sweep_study("transfer-slow", BASE, lrs=LRS, widths=[32, 64, 128, 256], seeds=[0, 1, 2])
    res = run_sweep_in_process(study, store=store, loader_factory=synthetic_factory)
    a = analyze_rows(rows_from_results(res), n_bootstrap=300)
    mup, sp = a.slope("mup"), a.slope("sp")
    print(
        f"\nμP slope {mup.slope.slope:+.3f} {mup.slope.slope_interval}; SP {sp.slope.slope:+.3f} {sp.slope.slope_interval}"
    )
    assert abs(mup.slope.slope) <= DEFAULT_SLOPE_TOLERANCE
    assert sp.slope.slope_interval[1] < -0.5
