"""WSD design cost vs the equivalent grid, for the same (N, D) points; prints harness JSON lines.

Runs examples/wsd.toml (scaled down by default: widths 32/64, token budgets ÷ 8) twice through the local
executor: as a WSD study (trunks + cooldown branches from snapshots) and as the grid of the same runs each
trained from scratch — the fair baseline, since it is what the same (N, D) points cost without WSD's
reuse: the same runs, specs, executor and parallelism. Reports wall time (with the CPU time of the whole
process tree beside it) and FLOPs of both, and checks that every run's eval loss is the same bitwise
(the branches are exact, not an approximation). One round each (a pass takes minutes; rounds = 1).

Usage: python benchmarks/bench_study_wsd.py [--full] [--parallel 1]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from harness import CpuMeter, emit, measured, report

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
        t0, meter = time.perf_counter(), CpuMeter()
        result = run_study(study, wsd_dir, executor=LocalExecutor(parallel=args.parallel))
        wsd_seconds, wsd_cpu = time.perf_counter() - t0, meter.stop()
        if not result.ok:
            sys.exit(f"WSD study failed: {[o for o in result.outcomes if o.status != 'done']}")

        write_study_files(study, grid_dir, None)
        with Registry(grid_dir / "registry.sqlite") as reg:
            runs, todo = prepare_run_dirs(study, grid_dir, reg)
            grid_todo = [(replace(p, branch_of=None, branch_step=0, snapshot_steps=()), d) for p, d in todo]
            t0, meter = time.perf_counter(), CpuMeter()
            outcomes = LocalExecutor(parallel=args.parallel).execute(grid_todo, reg)
            grid_seconds, grid_cpu = time.perf_counter() - t0, meter.stop()
        if any(o.status != "done" for o in outcomes):
            sys.exit(f"grid failed: {[o for o in outcomes if o.status != 'done']}")

        a, b = eval_losses(wsd_dir), eval_losses(grid_dir)
        same = sum(1 for k in a if a[k] is not None and a[k] == b.get(k))
        spend = sum(p.flops_to_spend for p in runs)
        grid_flops = sum(p.flops for p in runs)
        points = len(runs)
        emit(
            report(
                "wsd_vs_grid_studies_per_second",
                [1 / wsd_seconds],
                [1 / grid_seconds],
                "studies/s",
                cpu_values=[1 / wsd_cpu],
                cpu_baselines=[1 / grid_cpu],
                runs=points,
                parallel=args.parallel,
                seconds=wsd_seconds,
                baseline_seconds=grid_seconds,
                cpu_seconds=wsd_cpu,
                baseline_cpu_seconds=grid_cpu,
            )
        )
        emit(measured("wsd_vs_grid_flops", spend, grid_flops, "FLOP", higher_is_better=False, runs=points))
        emit(measured("wsd_branch_equals_scratch", same, points, "runs with bitwise-equal eval loss"))


if __name__ == "__main__":
    main()
