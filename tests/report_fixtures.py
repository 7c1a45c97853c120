"""A study directory with 'finished' runs whose losses come from a known law (no training needed)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from scalelab.fit.api import fit_table
from scalelab.fit.synthetic import simulate
from scalelab.registry import Registry

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
            {
                "name": "fake",
                "description": "synthetic",
                "fit": {"loss": "eval"},
                "hypotheses": ["alpha > 0.2", "α is large"],
            }
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


def fake_lr_sweep(root: Path) -> Path:
    """An LR sweep whose losses follow c + a·(ln lr − ln lr*)²: lr* fixed under μP, ∝ 1/width under SP."""
    from scalelab.spec import RunSpec, set_path

    sweep = root / "sweep"
    sweep.mkdir(parents=True)
    (sweep / "study.json").write_text(json.dumps({"name": "sweep", "design": {"axes": {"train.lr": []}}}))
    rng = np.random.default_rng(0)
    with Registry(sweep / "registry.sqlite") as reg:
        for p in ("sp", "mup"):
            for width in (64, 128, 256):
                lr_star = 1e-2 if p == "mup" else 1e-2 * 64 / width
                for lr in np.geomspace(1e-3, 1e-1, 7):
                    for seed in (0, 1):
                        spec = RunSpec()
                        for path, value in (
                            ("model.parametrization", p),
                            ("model.width", width),
                            ("train.lr", float(lr)),
                            ("train.seed", seed),
                        ):
                            spec = set_path(spec, path, value)
                        loss = 2.0 + 0.05 * np.log(lr / lr_star) ** 2 + 0.002 * rng.standard_normal()
                        reg.add_planned(spec.run_id, spec.canonical_json(), "h")
                        reg.record_result(spec.run_id, {"status": "done", "eval_loss": float(loss)})
    return sweep
