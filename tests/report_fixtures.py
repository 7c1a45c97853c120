"""A study directory with 'finished' runs whose losses come from a known law (no training needed)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from scalelab.fit.api import fit_table
from scalelab.fit.synthetic import simulate
from scalelab.study.registry import Registry

TRUTH = {"E": 1.8, "A": 60.0, "B": 90.0, "alpha": 0.3, "beta": 0.3}


def fake_study(root: Path, with_fit: bool = True) -> Path:
    """A study directory whose runs 'finished' with losses from a known law (no training needed)."""
    N = np.repeat([2e4, 5e4, 1e5, 2e5, 4e5], 3)
    D = np.tile([5e5, 1e6, 2e6], 5)
    table = simulate(TRUTH, N, D, noise=0.005, seed=1)
    study = root / "study"
    (study / "report").mkdir(parents=True)
    (study / "study.json").write_text(
        json.dumps(
            {"name": "fake", "description": "synthetic", "fit": {"loss": "eval"}, "hypotheses": ["alpha > 0.2", "α is large"]}
        )
    )
    with Registry(study / "registry.sqlite") as reg:
        for i in range(len(table)):
            rid = f"run{i:02d}"
            run_dir = study / "runs" / rid
            run_dir.mkdir(parents=True)
            with open(run_dir / "metrics.jsonl", "w") as f:
                for step, tok in enumerate(np.linspace(1e4, table.D[i], 5)):
                    f.write(json.dumps({"step": step, "tokens": int(tok), "loss": 3.0 - 0.1 * step}) + "\n")
                f.write(
                    json.dumps({"step": 4, "tokens": int(table.D[i]), "eval_loss": float(table.loss[i])})
                    + "\n"
                )
            reg.add_planned(rid, "{}", "h", run_dir=str(run_dir))
            reg.record_result(
                rid,
                {
                    "status": "done",
                    "n_params": int(table.N[i]),
                    "tokens": int(table.D[i]),
                    "flops": 6 * table.N[i] * table.D[i],
                    "eval_loss": float(table.loss[i]),
                    "final_train_loss": float(table.loss[i]),
                    "wall_seconds": 1.0,
                },
            )
        reg.add_planned("broken", "{}", "h")
        reg.record_result("broken", {"status": "failed", "error": "RuntimeError: injected crash at step 3"})
    if with_fit:
        rep = fit_table(table, "chinchilla", bootstrap=40, holdout="largest:2", seed=0, target_compute=1e14)
        rep.save(study / "report" / "fit.json")
    return study
