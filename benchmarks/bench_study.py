"""Study-engine benchmarks; prints harness JSON lines.

1. skip path: `scalelab study run` on a finished 50-run study, against `scalelab --help` (the CLI's floor),
   alternating, 3 rounds each, min/median/max.
2. driver overhead: a 4-run study through the local executor, against the same 4 `scalelab train`
   commands run back to back by hand.
3. forecast error: forecast vs actual wall time of a finished study (default runs/quickstart), if present.

Usage: python benchmarks/bench_study.py [--study runs/quickstart]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import emit, emit_value, report

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


def alternate(
    a: list[str], b: list[str], env: dict[str, str], rounds: int = 3
) -> tuple[list[float], list[float]]:
    """Wall seconds of commands `a` and `b`, run in alternating order (a b, b a, …) `rounds` times each."""
    times: dict[int, list[float]] = {0: [], 1: []}
    for r in range(rounds):
        for i in (0, 1) if r % 2 == 0 else (1, 0):
            t0 = time.perf_counter()
            subprocess.run(
                (a, b)[i], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env
            )
            times[i].append(time.perf_counter() - t0)
    return times[0], times[1]


def corpus(tmp: Path) -> Path:
    src = Path(json.__file__).parent.parent / "email"
    out = tmp / "corpus"
    out.mkdir()
    for i, f in enumerate(sorted(src.glob("*.py"))):
        (out / f"doc{i}.txt").write_text(f.read_text())
    return out


def bench_skip_path(tmp: Path, env: dict[str, str]) -> None:
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
    value, floor = alternate([*CLI, "study", "run", str(spec), "--out", str(out)], [*CLI, "--help"], env)
    emit(
        report(
            "study_rerun_finished_50_runs_seconds",
            value,
            floor,
            "s",
            higher_is_better=False,
            goal="< 2 s",
            baseline_is="scalelab --help",
        )
    )


def bench_driver_overhead(tmp: Path, env: dict[str, str]) -> None:
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
    t0 = time.perf_counter()
    subprocess.run(
        [*CLI, "study", "run", str(spec), "--out", str(tmp / "four"), "--no-forecast"],
        check=True,
        stdout=subprocess.DEVNULL,
        env=env,
    )
    through_study = time.perf_counter() - t0
    configs = sorted((tmp / "four" / "runs").glob("*/config.json"))
    t0 = time.perf_counter()
    for i, cfg in enumerate(configs):
        subprocess.run(
            [*CLI, "train", str(cfg), "--out", str(tmp / "direct" / str(i))],
            check=True,
            stdout=subprocess.DEVNULL,
            env=env,
        )
    direct = time.perf_counter() - t0
    n = len(configs)
    emit_value(
        "study_driver_seconds_for_4_runs",
        through_study,
        direct,
        "s",
        runs=n,
        overhead_per_run_seconds=(through_study - direct) / n,
        baseline_is="the same scalelab train commands by hand",
    )


def bench_forecast_error(study_dir: Path) -> None:
    db = study_dir / "registry.sqlite"
    if not db.exists():
        print(json.dumps({"name": "forecast_error", "skipped": f"{db} not found (run `make demo` first)"}))
        return
    with Registry(db, create=False) as reg:
        rows = [r for r in reg.runs(status="done") if r["forecast_seconds"] and r["wall_seconds"]]
    if not rows:
        print(json.dumps({"name": "forecast_error", "skipped": "no run has both a forecast and a wall time"}))
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
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        env = {**os.environ, "SCALELAB_CACHE_DIR": str(tmp / "cache")}
        bench_skip_path(tmp, env)
        bench_driver_overhead(tmp, env)
    bench_forecast_error(args.study)


if __name__ == "__main__":
    main()
