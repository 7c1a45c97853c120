"""A whole study through the local executor, with real training subprocesses on a tiny corpus."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from scalelab.registry import Registry
from scalelab.spec import load_study
from scalelab.study.executors import LocalExecutor, run_study
from tiny_study import tiny_study

STUDY = tiny_study(
    "tiny",
    """[study.train]
tokens = 2048
global_batch_size = 4
lr = 1e-2
eval_interval_steps = 16
eval_tokens = 256
checkpoint_interval_steps = 8
threads = 1
[study.design]
kind = "grid"
[study.design.axes]
"model.width" = [8, 16]
"debug.crash_at_step" = [1_000_000, 3]
""",
)


def _study(tmp_path: Path, corpus: Path):
    spec = tmp_path / "study.toml"
    spec.write_text(STUDY.format(corpus=corpus))
    return load_study(spec)


def test_failed_run_is_recorded_and_others_finish_then_rerun_skips(tmp_path: Path, tiny_corpus: Path) -> None:
    study = _study(tmp_path, tiny_corpus)
    out = tmp_path / "study"
    result = run_study(study, out, executor=LocalExecutor(parallel=2))
    assert sorted(o.status for o in result.outcomes) == ["done", "done", "failed", "failed"]
    with Registry(out / "registry.sqlite") as reg:
        rows = {r["run_id"]: r for r in reg.runs()}
    failed = [r for r in rows.values() if r["status"] == "failed"]
    assert all("crash_at_step" in (r["error"] or "") or "step 3" in (r["error"] or "") for r in failed), (
        failed
    )
    done = [r for r in rows.values() if r["status"] == "done"]
    for r in done:
        record = json.loads((Path(r["run_dir"]) / "record.json").read_text())
        assert record["status"] == "done" and r["eval_loss"] == pytest.approx(record["eval_loss"])
        for name in ("config.json", "provenance.json", "metrics.jsonl"):
            assert (Path(r["run_dir"]) / name).exists(), name
        prov = json.loads((Path(r["run_dir"]) / "provenance.json").read_text())
        assert prov["run_id"] == r["run_id"] and prov["data"]["fingerprint"]

    # a re-run skips the finished runs (and only retries the failed ones)
    t0 = time.perf_counter()
    again = run_study(study, out, executor=LocalExecutor(parallel=2))
    assert again.count("skipped") == 2
    assert sorted(o.status for o in again.outcomes if o.status != "skipped") == ["failed", "failed"]
    with Registry(out / "registry.sqlite") as reg:
        for r in reg.runs(status="done"):
            assert r["attempts"] == 1
    assert time.perf_counter() - t0 < 120


def test_same_spec_same_seed_same_losses(tmp_path: Path, tiny_corpus: Path) -> None:
    from scalelab.spec import set_path
    from scalelab.train.run import run_training

    spec = _study(tmp_path, tiny_corpus).base_run()
    spec = set_path(spec, "debug.crash_at_step", None)
    a = run_training(spec, tmp_path / "a", resume=False)
    b = run_training(spec, tmp_path / "b", resume=False)
    assert a["status"] == b["status"] == "done"

    def losses(d: Path) -> list[float]:
        rows = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in rows if "loss" in r]

    assert losses(tmp_path / "a") == losses(tmp_path / "b") and losses(tmp_path / "a")
    assert a["eval_loss"] == b["eval_loss"]


@pytest.mark.skipif(os.name != "posix", reason="process groups")
def test_timeout_is_recorded(tmp_path: Path, tiny_corpus: Path) -> None:
    study = _study(tmp_path, tiny_corpus)
    study = study.model_copy(update={"debug": study.debug.model_copy(update={"sleep_seconds_per_step": 5.0})})
    out = tmp_path / "slow"
    result = run_study(study, out, executor=LocalExecutor(parallel=2, timeout_seconds=8))
    statuses = sorted(o.status for o in result.outcomes)
    assert "timeout" in statuses
    with Registry(out / "registry.sqlite") as reg:
        assert any("timed out" in (r["error"] or "") for r in reg.runs(status="timeout"))


def test_killing_the_driver_then_rerunning_finishes_without_redoing(
    tmp_path: Path, tiny_corpus: Path
) -> None:
    import signal
    import subprocess
    import sys

    spec = tmp_path / "study.toml"
    spec.write_text(
        STUDY.format(corpus=tiny_corpus).replace(
            '"debug.crash_at_step" = [1_000_000, 3]', '"train.tokens" = [2048, 4096]'
        )
    )
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "scalelab", "study", "run", str(spec), "--out", str(out), "--no-forecast"]
    driver = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    first_done: dict = {}
    while time.time() < deadline and not first_done:
        time.sleep(0.5)
        if (out / "registry.sqlite").exists():
            with Registry(out / "registry.sqlite") as reg:
                done = reg.runs(status="done")
                if done:
                    first_done = done[0]
    assert first_done, "no run finished before the deadline"
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    record = Path(first_done["run_dir"]) / "record.json"
    mtime = record.stat().st_mtime_ns

    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, timeout=300)
    with Registry(out / "registry.sqlite") as reg:
        rows = reg.runs()
    assert len(rows) == 4 and all(r["status"] == "done" for r in rows), [
        (r["run_id"], r["status"]) for r in rows
    ]
    again = next(r for r in rows if r["run_id"] == first_done["run_id"])
    assert again["attempts"] == 1 and record.stat().st_mtime_ns == mtime  # not redone


def test_ray_executor_runs_a_small_study_on_local_ray(tmp_path: Path, tiny_corpus: Path) -> None:
    """One single-process run and one DDP run whose 2 ranks torchrun starts inside its Ray task."""
    pytest.importorskip("ray")
    import ray

    from scalelab.study.executors import RayExecutor

    spec = tmp_path / "study.toml"
    text = STUDY.format(corpus=tiny_corpus).replace('"debug.crash_at_step" = [1_000_000, 3]', "")
    spec.write_text(text.replace('"model.width" = [8, 16]', '"train.strategy" = ["none", "ddp"]'))
    study = load_study(spec)
    out = tmp_path / "ray"
    try:
        result = run_study(study, out, executor=RayExecutor(local_cpus=2, nproc_per_run=2))
    finally:
        ray.shutdown()
    assert sorted(o.status for o in result.outcomes) == ["done", "done"]
    with Registry(out / "registry.sqlite") as reg:
        rows = reg.runs(status="done")
    assert len(rows) == 2 and all(r["eval_loss"] is not None and r["provenance_json"] for r in rows)
    worlds = {}
    for r in rows:
        record = json.loads((Path(r["run_dir"]) / "record.json").read_text())
        worlds[json.loads(r["config_json"])["train"]["strategy"]] = record.get("world_size", 1)
    assert worlds == {"none": 1, "ddp": 2}


def test_crash_divergence_and_timeout_are_each_recorded_and_the_rest_finish(
    tmp_path: Path, tiny_corpus: Path
) -> None:
    text = STUDY.format(corpus=tiny_corpus)
    text = (
        text[: text.index("[study.design]")]
        + """[study.design]
kind = "list"
runs = [
  {"model.width" = 16},
  {"model.width" = 8},
  {"debug.crash_at_step" = 3},
  {"debug.nan_at_step" = 2},
  {"debug.sleep_seconds_per_step" = 3.0},
]
"""
    )
    spec = tmp_path / "study.toml"
    spec.write_text(text)
    study = load_study(spec)
    out = tmp_path / "mixed"
    result = run_study(study, out, executor=LocalExecutor(parallel=2, timeout_seconds=30))
    by_status = {}
    for o in result.outcomes:
        by_status.setdefault(o.status, []).append(o)
    assert {k: len(v) for k, v in by_status.items()} == {"done": 2, "failed": 1, "diverged": 1, "timeout": 1}
    with Registry(out / "registry.sqlite") as reg:
        rows = {r["status"]: r for r in reg.runs()}
    assert "crash_at_step" in rows["failed"]["error"] or "step 3" in rows["failed"]["error"]
    assert "nan" in rows["diverged"]["error"].lower() or "diverged" in rows["diverged"]["error"].lower()
    assert "timed out after 30 s" in rows["timeout"]["error"]
