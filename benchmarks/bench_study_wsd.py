"""WSD design cost vs the equivalent grid, for the same (N, D) points; prints JSON lines
{name, value, baseline, ratio, unit}.

Runs examples/wsd.toml (scaled down by default: widths 32/64, token budgets ÷ 8) twice through the local
executor: as a WSD study (trunks + cooldown branches from snapshots) and as the grid of the same runs each
trained from scratch. Reports wall time and FLOPs of both and checks that every run's eval loss is the
same bitwise (the branches are exact, not an approximation).

Usage: python benchmarks/bench_study_wsd.py [--full] [--parallel 1]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from scalelab.registry import Registry
from scalelab.spec import StudySpec, load_study
from scalelab.study.executors import LocalExecutor, prepare_run_dirs, run_study, write_study_files

ROOT = Path(__file__).resolve().parents[1]


def small(study: StudySpec) -> StudySpec:
    """The example at 1/8 of its token budgets and two widths (about 2 minutes per pass on one core)."""
    data = study.model_dump(mode="json")
    data["design"]["axes"] = {"model.width": [32, 64]}
    data["design"]["tokens"] = [t // 8 for t in data["design"]["tokens"]]
    data["train"].update(warmup_tokens=8192, eval_tokens=8192, eval_interval_steps=1000)
    return StudySpec.model_validate(data)


def emit(name: str, value: float, baseline: float, unit: str, **extra: object) -> None:
    ratio = value / baseline if baseline else None
    print(
        json.dumps(
            {"name": name, "value": value, "baseline": baseline, "ratio": ratio, "unit": unit, **extra}
        )
    )


def eval_losses(study_dir: Path) -> dict[str, float | None]:
    with Registry(study_dir / "registry.sqlite") as reg:
        return {r["run_id"]: r["eval_loss"] for r in reg.runs()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="the example as written (about 10 minutes)")
    ap.add_argument("--parallel", type=int, default=1)
    args = ap.parse_args()
    study = load_study(ROOT / "examples" / "wsd.toml")
    if not args.full:
        study = small(study)
    with tempfile.TemporaryDirectory(prefix="bench-wsd-") as tmp:
        wsd_dir, grid_dir = Path(tmp) / "wsd", Path(tmp) / "grid"
        t0 = time.perf_counter()
        result = run_study(study, wsd_dir, executor=LocalExecutor(parallel=args.parallel))
        wsd_seconds = time.perf_counter() - t0
        if not result.ok:
            sys.exit(f"WSD study failed: {[o for o in result.outcomes if o.status != 'done']}")

        write_study_files(study, grid_dir, None)
        with Registry(grid_dir / "registry.sqlite") as reg:
            runs, todo = prepare_run_dirs(study, grid_dir, reg)
            grid_todo = [(replace(p, branch_of=None, branch_step=0, snapshot_steps=()), d) for p, d in todo]
            t0 = time.perf_counter()
            outcomes = LocalExecutor(parallel=args.parallel).execute(grid_todo, reg)
            grid_seconds = time.perf_counter() - t0
        if any(o.status != "done" for o in outcomes):
            sys.exit(f"grid failed: {[o for o in outcomes if o.status != 'done']}")

        a, b = eval_losses(wsd_dir), eval_losses(grid_dir)
        same = sum(1 for k in a if a[k] is not None and a[k] == b.get(k))
        spend = sum(p.flops_to_spend for p in runs)
        grid_flops = sum(p.flops for p in runs)
        points = len(runs)
        emit("wsd_vs_grid_wall", wsd_seconds, grid_seconds, "s", runs=points, parallel=args.parallel)
        emit("wsd_vs_grid_flops", spend, grid_flops, "FLOP", runs=points)
        emit("wsd_branch_equals_scratch", same, points, "runs with bitwise-equal eval loss")


if __name__ == "__main__":
    main()
