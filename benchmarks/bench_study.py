"""Study-engine benchmarks; prints harness JSON lines (interleaved rounds, wall and CPU, min/median/max, load).

1. skip path: `scalelab study run` on a finished 50-run study, against `scalelab --help`: the CLI's own
   floor (the same interpreter, imports and argument parsing, nothing else), so the ratio is what
   checking and skipping 50 recorded runs costs beyond starting the command at all. Goal: < 2 s.
2. driver overhead: a 4-run study through the local executor, against the same 4 `scalelab train`
   commands run back to back by hand — the fair baseline, since it is exactly the work the driver
   schedules, without the driver (both after one warm-up study, so neither pays for ingest).
3. forecast error: forecast vs actual wall time of a finished study (default runs/quickstart), if
   present; the baseline is the actual wall time.
Each side of 1 and 2 is the real command in fresh processes (`harness.fresh_process`: start-up
included, the whole process tree's CPU); rates are commands (or studies) per second.

Usage: python benchmarks/bench_study.py [--study runs/quickstart] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from harness import Sample, compare, emit, emit_value, fresh_process, skip

from scalelab.registry import Registry
from scalelab.spec import load_study
from scalelab.study.executors import prepare_run_dirs, write_study_files

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "scalelab"]

TINY = """
[study]
name = "bench"
[study.model]
n_heads = 2
width = 16
depth = 1
context_tokens = 16
[study.data]
sources = [{{kind = "text", path = "{corpus}"}}]
heldout_fraction = 0.2
shard_tokens = 4096
[study.train]
tokens = {tokens}
global_batch_size = 4
eval_interval_steps = 1000
eval_tokens = 256
checkpoint_interval_steps = 1000
threads = 1
[study.design]
kind = "grid"
seeds = {seeds}
[study.design.axes]
"model.width" = {widths}
"""


def corpus(tmp: Path) -> Path:
    src = Path(json.__file__).parent.parent / "email"
    out = tmp / "corpus"
    out.mkdir()
    for i, f in enumerate(sorted(src.glob("*.py"))):
        (out / f"doc{i}.txt").write_text(f.read_text())
    return out


def bench_skip_path(tmp: Path, env: dict[str, str], rounds: int) -> None:
    """A 50-run study whose runs are all recorded as done: re-running must only check and skip."""
    spec = tmp / "fifty.toml"
    spec.write_text(
        TINY.format(corpus=corpus(tmp), tokens=256, seeds=list(range(10)), widths=[8, 12, 16, 20, 24])
    )
    study = load_study(spec)
    out = tmp / "fifty"
    write_study_files(study, out, spec.read_text())
    with Registry(out / "registry.sqlite") as reg:
        runs, todo = prepare_run_dirs(study, out, reg)
        for planned, run_dir in todo:
            record = {"status": "done", "run_id": planned.run_id, "eval_loss": 1.0, "tokens": planned.tokens}
            (run_dir / "record.json").write_text(json.dumps(record))
            reg.record_result(planned.run_id, record)
    assert len(runs) == 50
    emit(
        compare(
            "study_rerun_finished_50_runs",
            fresh_process([*CLI, "study", "run", str(spec), "--out", str(out)], 1, env),
            fresh_process([*CLI, "--help"], 1, env),
            "commands/s",
            rounds=rounds,
            goal="< 2 s a re-run (value >= 0.5 commands/s)",
            baseline_name="scalelab --help",
        )
    )


def bench_driver_overhead(tmp: Path, env: dict[str, str], rounds: int) -> None:
    spec = tmp / "four.toml"
    spec.write_text(TINY.format(corpus=tmp / "corpus", tokens=1024, seeds=[0, 1], widths=[8, 16]))
    load_study(spec)  # validate before timing anything
    # warm the token store once, so neither side pays for ingest
    subprocess.run(
        [*CLI, "study", "run", str(spec), "--out", str(tmp / "warm"), "--no-forecast"],
        check=True,
        stdout=subprocess.DEVNULL,
        env=env,
    )
    configs = sorted((tmp / "warm" / "runs").glob("*/config.json"))
    rounds_done = {"study": 0, "direct": 0}

    def through_study() -> Sample:
        rounds_done["study"] += 1
        out = tmp / f"four-{rounds_done['study']}"
        return fresh_process([*CLI, "study", "run", str(spec), "--out", str(out), "--no-forecast"], 1, env)()

    def by_hand() -> Sample:
        rounds_done["direct"] += 1
        samples = [
            fresh_process(
                [*CLI, "train", str(cfg), "--out", str(tmp / f"direct-{rounds_done['direct']}" / str(i))],
                1,
                env,
            )()
            for i, cfg in enumerate(configs)
        ]
        return Sample(1, sum(x.wall for x in samples), sum(x.cpu for x in samples))

    result = compare(
        f"study_driver_{len(configs)}_runs",
        through_study,
        by_hand,
        "studies/s",
        rounds=rounds,
        baseline_name=f"the same {len(configs)} scalelab train commands by hand, back to back",
        runs=len(configs),
    )
    result["overhead_per_run_seconds"] = (1 / result["value"] - 1 / result["baseline"]) / len(configs)
    emit(result)


def bench_forecast_error(study_dir: Path) -> None:
    db = study_dir / "registry.sqlite"
    if not db.exists():
        emit(skip("forecast_error", f"{db} not found (run `make demo` first)"))
        return
    with Registry(db, create=False) as reg:
        rows = [r for r in reg.runs(status="done") if r["forecast_seconds"] and r["wall_seconds"]]
    if not rows:
        emit(skip("forecast_error", "no run has both a forecast and a wall time"))
        return
    errs = [abs(r["forecast_seconds"] - r["wall_seconds"]) / r["wall_seconds"] for r in rows]
    total_f = sum(r["forecast_seconds"] for r in rows)
    total_a = sum(r["wall_seconds"] for r in rows)
    emit_value(
        "forecast_total_run_seconds",
        total_f,
        total_a,
        "s",
        baseline_is="actual run seconds",
        runs=len(rows),
        mean_abs_relative_error=sum(errs) / len(errs),
        max_abs_relative_error=max(errs),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--study", type=Path, default=ROOT / "runs" / "quickstart")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        env = {**os.environ, "SCALELAB_CACHE_DIR": str(tmp / "cache")}
        bench_skip_path(tmp, env, args.rounds)
        bench_driver_overhead(tmp, env, args.rounds)
    bench_forecast_error(args.study)


if __name__ == "__main__":
    main()
