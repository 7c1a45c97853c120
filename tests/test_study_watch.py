"""The live view reads progress from the registry and the tail of each running run's metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scalelab.registry import Registry
from scalelab.study.watch import study_progress


def test_progress_of_running_and_finished_runs(tmp_path: Path) -> None:
    run_dir = tmp_path / "runs" / "r1"
    run_dir.mkdir(parents=True)
    with open(run_dir / "metrics.jsonl", "w") as f:
        for step in range(1, 501):  # long enough that only the file's tail is read
            f.write(
                json.dumps(
                    {
                        "step": step,
                        "tokens": step * 1000,
                        "loss": 5.0 - step / 200,
                        "tokens_per_second": 2000.0,
                        "grad_norm": 1.0,
                        "grad_norm_min": 0.5,
                        "grad_norm_max": 2.0,
                    }
                )
                + "\n"
            )
            if step % 100 == 0:
                f.write(json.dumps({"step": step, "tokens": step * 1000, "eval_loss": 4.0}) + "\n")
        f.write('{"step": 501, "tok')  # a line being written right now
    with Registry(tmp_path / "registry.sqlite") as reg:
        reg.add_planned("r1", json.dumps({"train": {"tokens": 1_000_000}}), "h", run_dir=str(run_dir))
        reg.set_status("r1", "running")
        reg.add_planned("r2", json.dumps({"train": {"tokens": 2000}}), "h")
        reg.record_result(
            "r2", {"status": "done", "steps": 2, "tokens": 2000, "final_train_loss": 3.0, "eval_loss": 3.1}
        )
    rows = {r.run_id: r for r in study_progress(tmp_path)}
    running = rows["r1"]
    assert running.status == "running" and running.step == 500 and running.tokens == 500_000
    assert running.eval_loss == 4.0 and running.grad_norm_spread == 4.0
    assert running.eta_seconds == (1_000_000 - 500_000) / 2000.0
    done = rows["r2"]
    assert done.status == "done" and done.loss == 3.0 and done.eval_loss == 3.1 and done.eta_seconds is None


def _register(reg: Registry, run_id: str, width: int, tokens: int, forecast: float | None = None) -> None:
    config = {"model": {"width": width, "depth": 2, "n_heads": 4}, "train": {"tokens": tokens}}
    reg.add_planned(run_id, json.dumps(config), "h", forecast_seconds=forecast)


def test_rows_carry_width_n_and_d_and_the_study_eta(tmp_path: Path) -> None:
    from scalelab.models.flops import ModelShape
    from scalelab.spec import ModelSpec
    from scalelab.study.watch import study_eta

    with Registry(tmp_path / "registry.sqlite") as reg:
        _register(reg, "a" * 12, 64, 1_000_000, forecast=100.0)
        _register(reg, "b" * 12, 128, 2_000_000, forecast=200.0)
        reg.record_result(
            "a" * 12, {"status": "done", "tokens": 1_000_000, "n_params": 98_304, "wall_seconds": 50.0}
        )
    rows = {r.run_id: r for r in study_progress(tmp_path)}
    a, b = rows["a" * 12], rows["b" * 12]
    assert (a.width, a.n_params, a.tokens_planned) == (64, 98_304, 1_000_000)
    shape = ModelShape.from_spec(ModelSpec(width=128, depth=2, n_heads=4), vocab_size=256)
    assert (b.width, b.tokens_planned, b.n_params) == (128, 2_000_000, shape.non_embedding_params)
    assert study_eta(list(rows.values())) == pytest.approx(
        100.0, abs=0.5
    )  # b's forecast × (50 s actual / 100 s forecast of a)


def _worst_case_rows() -> list:
    from scalelab.study.watch import RunProgress

    common = {"tokens_planned": 123_456_789_000, "loss": 10.12345, "eval_loss": 10.5, "grad_norm": 1.0}
    return [
        RunProgress(
            run_id=f"{i:012x}",
            status=status,
            width=4096,
            n_params=123_456_789_012,
            step=99_999,
            tokens=61_728_394_500,
            tokens_per_second=123_456.0,
            eta_seconds=35_999.0,
            grad_norm_spread=12.34,
            error="Traceback … RuntimeError: CUDA out of memory. Tried to allocate 20.00 GiB " * 3
            if i
            else None,
            forecast_seconds=3600.0 * 99,
            wall_seconds=3600.0 * 99,
            **common,
        )
        for i, status in enumerate(["running", "diverged", "timeout", "pending"])
    ]


def test_watch_and_status_fit_80_columns() -> None:
    from rich.console import Console

    from scalelab.cli_study import status_view, study_title, watch_view

    rows = _worst_case_rows()
    console = Console(width=80, record=True, force_terminal=False)
    console.print(
        watch_view(study_title("runs/a-study-with-a-long-name", {"running": 1, "diverged": 1}, 35_999), rows)
    )
    records = [
        {
            "run_id": r.run_id,
            "status": r.status,
            "config_json": json.dumps(
                {"model": {"width": 4096, "depth": 48, "n_heads": 32}, "train": {"tokens": 10**12}}
            ),
            "n_params": r.n_params,
            "tokens": 10**12,
            "flops": 6.0e24,
            "eval_loss": 10.5,
            "final_train_loss": 10.25,
            "forecast_seconds": r.forecast_seconds,
            "wall_seconds": r.wall_seconds,
            "error": r.error,
        }
        for r in rows
    ]
    console.print(status_view("runs/a-study-with-a-long-name: 4 runs", records))
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "…" not in text.replace("Traceback …", "")  # no cell was cut short
    for cell in (
        "000000000001",
        "diverged",
        "4096",
        "123G",
        "123G",
        "50%",
        "10.12",
        "123k",
        "9h59m",
        "12.34",
        "6.0e24",
    ):
        assert cell in text, cell
    assert "failures:" in text and "CUDA out of memory" in text


def test_watch_waits_for_the_registry_and_exits_when_the_study_ends(tmp_path: Path) -> None:
    import subprocess
    import sys
    import time

    study = tmp_path / "study"
    cmd = [sys.executable, "-m", "scalelab", "study", "watch", str(study), "--interval", "0.2"]
    once = subprocess.run([*cmd, "--once"], capture_output=True, text=True, timeout=60)
    assert once.returncode == 2 and "no registry.sqlite yet" in " ".join(once.stderr.split())
    assert "Traceback" not in once.stderr
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(2.0)
        assert proc.poll() is None  # still waiting for the registry
        study.mkdir()
        with Registry(study / "registry.sqlite") as reg:
            _register(reg, "c" * 12, 32, 4096, forecast=10.0)
            reg.set_status("c" * 12, "running")
        time.sleep(1.5)
        assert proc.poll() is None  # the study is running
        with Registry(study / "registry.sqlite") as reg:
            reg.record_result("c" * 12, {"status": "done", "tokens": 4096, "wall_seconds": 3.0})
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert out.startswith(f"waiting for {study / 'registry.sqlite'}")
    assert "1 running" in out  # a snapshot while it ran
    flat = " ".join(out.split())  # the long tmp path wraps the title
    last = flat[flat.rindex("1 done · study ETA 0s") :]
    assert "cccccccccccc done 32 " in last and "running" not in last
