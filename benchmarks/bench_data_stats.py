"""Out-of-core column statistics over many values: rank error and memory; prints JSON lines
``{name, value, baseline, ratio, unit}``.

`--n` float32 values (a skewed mixture: lognormal body, normal bump, a few large outliers) are
generated chunk by chunk from a seeded generator and fed to `ColumnStats` (moments + KLL sketch),
exactly as `column_stats` feeds it row group by row group. The sketching pass keeps only one chunk
alive; its peak RSS (``ru_maxrss``, taken before anything else is allocated) is reported against the
size of the data it summarised. Then the same values are regenerated into one array (4 bytes each:
400 MB at 1e8) and the *exact* normalised rank of every sketch answer is counted, so the reported
rank error is measured, not the sketch's bound.

    .venv/bin/python benchmarks/bench_data_stats.py              # 1e7 values, quick
    .venv/bin/python benchmarks/bench_data_stats.py --n 1e8      # the issue's case
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from collections.abc import Iterator

import numpy as np

from scalelab.data.stats import DEFAULT_K, TARGET_RANK_ERROR, ColumnStats, Quantiles, kll_rank_error

QS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.999)


def chunks(n: int, chunk: int, seed: int) -> Iterator[np.ndarray]:
    rng = np.random.default_rng(seed)
    done = 0
    while done < n:
        m = min(chunk, n - done)
        x = rng.lognormal(0.0, 1.0, m).astype(np.float32)
        bump = rng.random(m) < 0.2
        x[bump] = rng.normal(8.0, 0.5, int(bump.sum())).astype(np.float32)
        out = rng.random(m) < 1e-4
        x[out] = rng.pareto(1.5, int(out.sum())).astype(np.float32) * 1e3
        done += m
        yield x


def emit(name: str, value: float, baseline: float, unit: str, **extra: object) -> None:
    ratio = value / baseline if baseline else float("nan")
    print(
        json.dumps(
            {"name": name, "value": value, "baseline": baseline, "ratio": ratio, "unit": unit, **extra}
        )
    )


def max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=float, default=1e7, help="number of values")
    ap.add_argument("--chunk", type=int, default=1 << 20, help="values per chunk (a Parquet row group)")
    ap.add_argument("--k", type=int, default=DEFAULT_K, help="KLL k (default: scalelab's)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    n = int(args.n)

    rss_start = max_rss_bytes()
    t0 = time.perf_counter()
    stats = ColumnStats(quantiles=Quantiles(args.k))
    for x in chunks(n, args.chunk, args.seed):
        stats.update(x)
    sketch_s = time.perf_counter() - t0
    rss_sketch = max_rss_bytes()
    answers = stats.quantiles.quantiles(QS)
    sketch_bytes = len(stats.quantiles.to_bytes())

    t0 = time.perf_counter()
    full = np.empty(n, dtype=np.float32)
    pos = 0
    for x in chunks(n, args.chunk, args.seed):
        full[pos : pos + x.size] = x
        pos += x.size
    full.sort()
    sort_s = time.perf_counter() - t0
    rss_exact = max_rss_bytes()
    ranks = []
    for q, v in zip(QS, answers, strict=True):
        # The sketch answers float64 copies of float32 values: compare in float32 (exact).
        v32 = np.float32(v)
        lo = np.searchsorted(full, v32, side="left") / n  # rank interval of this value
        hi = np.searchsorted(full, v32, side="right") / n
        err = 0.0 if lo <= q <= hi else min(abs(q - lo), abs(q - hi))
        ranks.append(
            {"q": q, "sketch": float(v), "exact": float(full[min(n - 1, int(q * n))]), "rank_error": err}
        )
    worst = max(r["rank_error"] for r in ranks)
    mean64 = float(np.mean(full, dtype=np.float64))
    emit(
        "kll_max_rank_error",
        worst,
        TARGET_RANK_ERROR,
        "fraction of n",
        baseline_name="goal: 1% rank error",
        n=n,
        k=args.k,
        bound_99pct=stats.quantiles.rank_error,  # DataSketches' own bound for this sketch
        bound_99pct_k200=kll_rank_error(200),  # the former default, for comparison
        bound_meets_goal=stats.quantiles.rank_error <= TARGET_RANK_ERROR,
        quantiles=ranks,
    )
    emit(
        "sketch_pass_peak_rss",
        rss_sketch / 2**20,
        n * 4 / 2**20,
        "MiB",
        baseline_name="the float32 values themselves (what an in-memory exact pass must hold)",
        rss_before_mib=rss_start / 2**20,
        sketch_serialized_bytes=sketch_bytes,
        exact_pass_peak_rss_mib=rss_exact / 2**20,
        sketch_seconds=sketch_s,
        exact_generate_and_sort_seconds=sort_s,
        values_per_second=n / sketch_s,
    )
    emit(
        "moments_mean_relative_error",
        abs(stats.moments.mean - mean64) / abs(mean64),
        1e-9,
        "relative",
        baseline_name="tolerance",
        streamed_mean=stats.moments.mean,
        exact_mean=mean64,
        count=stats.moments.count,
    )


if __name__ == "__main__":
    main()
