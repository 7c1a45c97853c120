"""The live view reads progress from the registry and the tail of each running run's metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

from scalelab.study.registry import Registry
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
