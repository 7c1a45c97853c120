"""Runs every benchmarks/bench_*.py and writes one table of their results (`make bench`).

Each benchmark runs in its own process with a time limit; every JSON line it prints with a "name" is a
result (see `harness.py`); a result lacking one of the harness fields (`harness.FIELDS`) is named so in
the table and on stderr. Writes <out>/results.json (all lines, plus failures) and <out>/results.md.

    .venv/bin/python benchmarks/run_all.py --out bench [--only data_loader,data_ingest] [--timeout 900]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from harness import here, load, missing_fields, skip


def parse_results(stdout: str) -> list[dict[str, Any]]:
    """The JSON result lines (objects with a "name") of a benchmark's stdout."""
    rows = []
    for line in stdout.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict) and "name" in obj:
            rows.append(obj)
    return rows


def _fmt(x: Any) -> str:
    if x is None:
        return ""
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def _range(row: dict[str, Any], key: str) -> str:
    if f"{key}_min" not in row:
        return ""
    return f"{_fmt(row[f'{key}_min'])} / {_fmt(row[f'{key}_median'])} / {_fmt(row[f'{key}_max'])}"


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """The results as one Markdown table (value and baseline as min / median / max over rounds)."""
    out = [
        "# Benchmark results",
        "",
        f"{meta['started']} · {meta['cpus']} CPUs · load (1 min) {meta['load_before']:.2f} before, "
        f"{meta['load_after']:.2f} after · {meta['python']}",
        "",
        "| benchmark | result | value (min / median / max) | baseline (min / median / max) | unit "
        "| ratio | CPU ratio | rounds | load |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        loads = r.get("load") or []
        load_s = f"{min(loads):.2f}–{max(loads):.2f}" if isinstance(loads, list) and loads else _fmt(loads)
        if "skipped" in r or "failed" in r:
            why = r.get("skipped") or r.get("failed")
            out.append(
                f"| {r['bench']} | {r['name']} | {'skipped' if 'skipped' in r else 'FAILED'}: {why} "
                "| | | | | | |"
            )
            continue
        ratio = _fmt(r.get("ratio"))
        if r.get("higher_is_better") is False:
            ratio += " (lower is better)"
        missing = missing_fields(r)
        name = f"{r['name']} (lacks {', '.join(missing)})" if missing else r["name"]
        out.append(
            f"| {r['bench']} | {name} | {_range(r, 'value') or _fmt(r.get('value'))} "
            f"| {_range(r, 'baseline') or _fmt(r.get('baseline'))} | {r.get('unit', '')} | {ratio} "
            f"| {_fmt(r.get('cpu_ratio'))} | {_fmt(r.get('rounds'))} | {load_s} |"
        )
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench"))
    ap.add_argument("--only", default="", help="comma-separated benchmark names (bench_<name>.py)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per benchmark")
    args = ap.parse_args()
    only = {f"bench_{n.strip()}.py" for n in args.only.split(",") if n.strip()}
    scripts = [p for p in sorted(here().glob("bench_*.py")) if not only or p.name in only]
    meta = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cpus": __import__("os").cpu_count(),
        "load_before": load(),
        "python": sys.version.split()[0],
    }
    rows: list[dict[str, Any]] = []
    for script in scripts:
        bench = script.stem.removeprefix("bench_")
        print(f"== {script.name}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(
                [sys.executable, str(script)], capture_output=True, text=True, timeout=args.timeout
            )
            found = parse_results(proc.stdout)
            if not found and not proc.returncode:  # e.g. a CUDA-only benchmark on a CPU machine
                why = proc.stderr.strip().splitlines()[-1:] or ["printed no result"]
                found.append(skip(script.stem, why[0]))
            if proc.returncode:
                tail = proc.stderr.strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
                found.append({"name": script.stem, "failed": tail[0]})
        except subprocess.TimeoutExpired as err:
            found = parse_results(err.stdout.decode() if isinstance(err.stdout, bytes) else err.stdout or "")
            found.append({"name": script.stem, "failed": f"timed out after {args.timeout:g} s"})
        seconds = time.perf_counter() - t0
        for row in found:
            row["bench"] = bench
            row["bench_seconds"] = seconds
            if missing := missing_fields(row):
                print(f"{script.name}: {row['name']} lacks {', '.join(missing)}", file=sys.stderr)
            print(json.dumps(row, default=str), flush=True)
        rows.extend(found)
    meta["load_after"] = load()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"meta": meta, "results": rows}, indent=1, default=str))
    (args.out / "results.md").write_text(markdown(rows, meta))
    print(f"wrote {args.out / 'results.md'} and {args.out / 'results.json'}", file=sys.stderr)
    if any("failed" in r for r in rows):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
