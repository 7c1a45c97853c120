"""Checkpoints: atomic layout, exact resume after SIGKILL, corrupted latest → previous, foreign config refused."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from scalelab.errors import CheckpointError
from scalelab.spec import RunSpec, config_hash
from scalelab.train.checkpoint import list_checkpoints, load_latest
from scalelab.train.run import run_training
from train_synthetic import SyntheticStore, synthetic_factory

torch.set_num_threads(1)
TESTS = Path(__file__).resolve().parent


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SCALELAB_CACHE_DIR", str(tmp_path / "cache"))


def tiny_spec(steps: int = 16, interval: int = 3, sleep: float = 0.0, **train) -> RunSpec:
    t = {
        "tokens": 32 * 4 * steps,
        "global_batch_size": 4,
        "micro_batch_size": 2,
        "threads": 1,
        "eval_interval_steps": 5,
        "eval_tokens": 256,
        "checkpoint_interval_steps": interval,
        "keep_checkpoints": 3,
        "lr": 1e-2,
        "schedule": "wsd",
    }
    t.update(train)
    return RunSpec.model_validate(
        {
            "model": {"width": 32, "depth": 2, "n_heads": 4, "context_tokens": 32},
            "train": t,
            "debug": {"sleep_seconds_per_step": sleep},
        }
    )


def run(spec, out, **kw):
    return run_training(spec, out, store=SyntheticStore(), loader_factory=synthetic_factory, **kw)


def metrics(out: Path) -> list[tuple]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [
        (r["step"], r["tokens"], r.get("loss"), r.get("lr"), r.get("grad_norm"), r.get("eval_loss"))
        for r in rows
    ]


def test_layout_retention_and_manifest(tmp_path):
    spec = tiny_spec(steps=10, interval=3)
    (tmp_path / "checkpoint").mkdir(parents=True)
    (tmp_path / "checkpoint" / ".tmp-step-000003-1-1").mkdir()  # left by a writer killed mid-save
    rec = run(spec, tmp_path)
    assert rec["status"] == "done"
    ckpts = list_checkpoints(tmp_path / "checkpoint")
    assert [s for s, _ in ckpts] == [6, 9, 10]  # keep_checkpoints=3, final step included
    assert sorted(p.name for p in (tmp_path / "checkpoint").iterdir()) == [
        "step-000006",
        "step-000009",
        "step-000010",
    ]
    manifest = json.loads((ckpts[-1][1] / "manifest.json").read_text())
    assert manifest["config_hash"] == config_hash(spec) and manifest["step"] == 10
    assert set(manifest["files"]) == {"model.safetensors", "state.safetensors", "state.json"}
    assert manifest["aliases"] == {"head.weight": "tok_emb.weight"}


def _child_script(tmp_path: Path, spec: RunSpec, out: Path) -> Path:
    script = tmp_path / "child.py"
    script.write_text(
        "import sys, torch\n"
        f"sys.path.insert(0, {str(TESTS)!r})\n"
        "torch.set_num_threads(1)\n"
        "from train_synthetic import SyntheticStore, synthetic_factory\n"
        "from scalelab.spec import RunSpec\n"
        "from scalelab.train.run import run_training\n"
        f"spec = RunSpec.model_validate_json({spec.canonical_json()!r})\n"
        f"rec = run_training(spec, {str(out)!r}, store=SyntheticStore(), loader_factory=synthetic_factory)\n"
        "sys.exit(0 if rec['status'] == 'done' else 1)\n"
    )
    return script


def _kill_at_step(script: Path, out: Path, kill_step: int, timeout: float = 120) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(script)], env=env)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            path = out / "metrics.jsonl"
            if path.exists():
                steps = [
                    json.loads(x).get("step", 0) for x in path.read_text().splitlines() if x.endswith("}")
                ]
                if steps and max(steps) >= kill_step:
                    break
            if proc.poll() is not None:
                pytest.fail(f"child ended (rc={proc.returncode}) before step {kill_step}")
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "record.json").exists()


def _kill_resume_equals_uninterrupted(tmp_path: Path, steps: int, interval: int, sleep: float, kills: int):
    spec = tiny_spec(steps=steps, interval=interval, sleep=sleep)
    ref = run(spec, tmp_path / "ref")
    out = tmp_path / "killed"
    script = _child_script(tmp_path, spec, out)
    rng = random.Random(steps)
    for k in sorted(rng.sample(range(2, steps - 1), kills)):
        _kill_at_step(script, out, k)
    rec = run(spec, out, resume=True)
    assert rec["status"] == "done" and rec["steps"] == steps
    assert metrics(out) == metrics(tmp_path / "ref")  # loss-for-loss, bitwise
    assert rec["final_train_loss"] == ref["final_train_loss"] and rec["eval_loss"] == ref["eval_loss"]


def test_sigkill_and_resume_equals_uninterrupted(tmp_path):
    _kill_resume_equals_uninterrupted(tmp_path, steps=14, interval=3, sleep=0.05, kills=1)


@pytest.mark.slow
def test_sigkill_and_resume_2k_steps(tmp_path):
    _kill_resume_equals_uninterrupted(tmp_path, steps=2000, interval=97, sleep=0.0, kills=3)


def test_corrupted_latest_falls_back_to_previous(tmp_path, caplog):
    spec = tiny_spec(steps=9, interval=3)
    ref = run(spec, tmp_path / "ref")
    out = tmp_path / "run"
    run(spec, out)
    ckpts = list_checkpoints(out / "checkpoint")
    assert [s for s, _ in ckpts] == [3, 6, 9]
    weights = ckpts[-1][1] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated
    loaded = load_latest(out / "checkpoint", config_hash(spec))
    assert loaded is not None and loaded.step == 6
    assert "wrong size (truncated checkpoint)" in caplog.text
    # corrupt the next one differently: flip a byte in the optimizer state
    state = ckpts[-2][1] / "state.safetensors"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF
    state.write_bytes(bytes(data))
    rec = run(spec, out, resume=True)  # resumes from step 3 and re-trains 4..9
    assert rec["status"] == "done"
    assert metrics(out) == metrics(tmp_path / "ref")
    assert rec["final_train_loss"] == ref["final_train_loss"]


def test_missing_manifest_is_skipped(tmp_path):
    spec = tiny_spec(steps=6, interval=3)
    run(spec, tmp_path)
    (tmp_path / "checkpoint" / "step-000006" / "manifest.json").unlink()
    assert load_latest(tmp_path / "checkpoint", config_hash(spec)).step == 3


def test_checkpoint_from_another_config_is_refused(tmp_path):
    a, b = tiny_spec(steps=6, lr=1e-2), tiny_spec(steps=6, lr=2e-2)
    run(a, tmp_path)
    with pytest.raises(CheckpointError) as err:
        load_latest(tmp_path / "checkpoint", config_hash(b))
    assert config_hash(a) in str(err.value) and config_hash(b) in str(err.value)
    rec = run(b, tmp_path, resume=True)
    assert rec["status"] == "failed" and "CheckpointError" in rec["error"]
    assert config_hash(a) in rec["error"] and config_hash(b) in rec["error"]
    # the other run's directory is left untouched
    assert json.loads((tmp_path / "record.json").read_text())["config_hash"] == config_hash(a)
    assert json.loads((tmp_path / "config.json").read_text()) == json.loads(a.canonical_json())
    # same directory, config.json gone (e.g. copied checkpoints): the checkpoint manifest refuses it
    (tmp_path / "config.json").unlink()
    rec = run(b, tmp_path, resume=True)
    assert rec["status"] == "failed" and "CheckpointConfigMismatch" in rec["error"]
    assert config_hash(a) in rec["error"] and config_hash(b) in rec["error"]
    rec = run(b, tmp_path, resume=False)  # a fresh start discards the old checkpoints
    assert rec["status"] == "done"
