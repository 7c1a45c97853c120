"""The trainer loop: determinism, accumulation, fault injection, divergence, precision."""

from __future__ import annotations

import json
import math

import pytest
import torch

from scalelab.models.gpt import build_model
from scalelab.models.parametrization import apply_parametrization
from scalelab.spec import RunSpec, TrainSpec
from scalelab.train.run import exit_code, run_training
from scalelab.train.trainer import DivergenceGuard, Trainer, TrainState
from train_synthetic import SyntheticStore, synthetic_factory

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SCALELAB_CACHE_DIR", str(tmp_path / "cache"))


def tiny_spec(steps: int = 12, **train) -> RunSpec:
    t = {
        "tokens": 32 * 4 * steps,
        "global_batch_size": 4,
        "threads": 1,
        "eval_interval_steps": 5,
        "eval_tokens": 256,
        "checkpoint_interval_steps": 4,
        "lr": 1e-2,
    }
    debug = train.pop("debug", {})
    t.update(train)
    return RunSpec.model_validate(
        {"model": {"width": 32, "depth": 2, "n_heads": 4, "context_tokens": 32}, "train": t, "debug": debug}
    )


def run(spec, out, **kw):
    return run_training(spec, out, store=SyntheticStore(), loader_factory=synthetic_factory, **kw)


def losses(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r.get("loss"), r.get("eval_loss")) for r in rows]


RECORD_KEYS = {
    "run_id",
    "config_hash",
    "status",
    "error",
    "n_params",
    "n_params_total",
    "tokens",
    "flops",
    "steps",
    "final_train_loss",
    "eval_loss",
    "wall_seconds",
    "tokens_per_second",
    "peak_memory_bytes",
    "energy_joules",
    "energy_source",
    "energy_note",
    "branch",
    "world_size",
    "strategy",
    "micro_batch_size",
    "batch_changes",
    "started_at",
    "finished_at",
}


def test_run_record_and_determinism(tmp_path):
    spec = tiny_spec()
    a = run(spec, tmp_path / "a")
    b = run(spec, tmp_path / "b")
    assert b["final_train_loss"] == a["final_train_loss"]
    assert set(a) == RECORD_KEYS
    assert json.loads((tmp_path / "a" / "record.json").read_text()) == a
    assert a["status"] == "done" and exit_code(a) == 0 and a["error"] is None
    assert a["steps"] == 12 and a["tokens"] == 12 * 4 * 32
    assert a["n_params"] == 24736 and a["flops"] == 184320 * a["tokens"]
    assert a["final_train_loss"] < math.log(64) and a["eval_loss"] is not None
    assert losses(tmp_path / "a") == losses(tmp_path / "b")  # bitwise: floats compare exactly
    assert json.loads((tmp_path / "a" / "config.json").read_text()) == json.loads(spec.canonical_json())
    assert (tmp_path / "a" / "provenance.json").exists()
    rows = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    step_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in step_rows] == list(range(1, 13))
    for key in ("tokens", "lr", "grad_norm", "tokens_per_second", "step_seconds", "mfu", "peak_memory_bytes"):
        assert step_rows[-1][key] is not None, key
    assert [r["step"] for r in rows if "eval_loss" in r] == [5, 10, 12]


def test_accumulation_equals_one_big_batch():
    spec = tiny_spec().model
    batch = torch.randint(0, 64, (8, 33), generator=torch.Generator().manual_seed(0))
    params = []
    for micro in (None, 2):
        torch.manual_seed(0)
        model = build_model(spec, 64)
        groups = apply_parametrization(model, spec)
        train = TrainSpec(global_batch_size=8, micro_batch_size=micro, lr=1e-2, tokens=8 * 32)
        trainer = Trainer(model, groups, train, train_loader=[batch], total_steps=1, context_tokens=32)
        state = trainer.fit()
        # Adam's first moment after one step is (1-β1)·gradient: compare the accumulated gradients
        grads = torch.cat([trainer.optimizer.state[p]["exp_avg"].flatten() for p in model.parameters()])
        weights = torch.cat([p.detach().flatten() for p in model.parameters()])
        params.append((grads, weights, state))
    (g1, w1, s1), (g2, w2, s2) = params
    assert s1.loss == pytest.approx(s2.loss, rel=1e-6)
    assert s1.grad_norm == pytest.approx(s2.grad_norm, rel=1e-5)
    torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-8)
    # Adam's sign-like first step amplifies rounding where a gradient is ~0: weights agree to ~lr·1e-3
    torch.testing.assert_close(w1, w2, rtol=0, atol=1e-5)


def test_nan_at_step_diverges(tmp_path):
    rec = run(tiny_spec(debug={"nan_at_step": 3}), tmp_path)
    assert rec["status"] == "diverged" and exit_code(rec) == 3
    assert "step 3" in rec["error"] and "nan" in rec["error"].lower()
    assert rec["steps"] == 3


def test_crash_at_step_fails_with_the_error(tmp_path):
    rec = run(tiny_spec(debug={"crash_at_step": 2}), tmp_path)
    assert rec["status"] == "failed" and exit_code(rec) == 1
    assert rec["error"].startswith("RuntimeError: debug.crash_at_step=2")
    assert rec["steps"] == 1
    assert json.loads((tmp_path / "record.json").read_text())["status"] == "failed"


def test_divergence_guard_factor():
    guard = DivergenceGuard(factor=3.0)
    state = TrainState()
    for loss in (5.0, 2.0, 5.9):
        state.loss = loss
        guard.on_step_end(state)
        assert not state.stop
    state.loss = 6.1
    guard.on_step_end(state)
    assert state.stop and state.status == "diverged" and "divergence_factor=3" in state.message
    restored = DivergenceGuard(3.0)
    restored.load_state_dict(guard.state_dict())
    assert restored.best == 2.0


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_runs_on_cpu(tmp_path, precision):
    rec = run(tiny_spec(steps=4, precision=precision), tmp_path)
    assert rec["status"] == "done", rec["error"]
    assert math.isfinite(rec["final_train_loss"])


def test_sleep_and_threads(tmp_path):
    rec = run(tiny_spec(steps=2, threads=1, debug={"sleep_seconds_per_step": 0.2}), tmp_path)
    assert rec["status"] == "done" and rec["wall_seconds"] >= 0.4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.gpu
def test_cuda_run(tmp_path):
    rec = run(tiny_spec(steps=4, device="cuda", precision="bf16"), tmp_path)
    assert rec["status"] == "done", rec["error"]
    assert rec["peak_memory_bytes"] > 0


@pytest.mark.slow
def test_compiled_run_matches_eager(tmp_path):
    eager = run(tiny_spec(steps=4), tmp_path / "eager")
    compiled = run(tiny_spec(steps=4, compile=True), tmp_path / "compiled")
    assert compiled["status"] == "done", compiled["error"]
    assert compiled["final_train_loss"] == pytest.approx(eager["final_train_loss"], rel=1e-3)
