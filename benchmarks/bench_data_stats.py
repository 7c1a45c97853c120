"""Out-of-core column statistics over many values: rank error, memory and speed; prints harness JSON lines.

`--n` float32 values (a skewed mixture: lognormal body, normal bump, a few large outliers) are
generated chunk by chunk from a seeded generator and fed to `ColumnStats` (moments + KLL sketch),
exactly as `column_stats` feeds it row group by row group. The sketching pass keeps only one chunk
alive; its peak RSS (``ru_maxrss``, taken before anything else is allocated) is reported against the
size of the data it summarised. Then the same values are regenerated into one array (4 bytes each:
400 MB at 1e8) and the *exact* normalised rank of every sketch answer is counted, so the reported
rank error is measured, not the sketch's bound.

Speed: only the statistics are timed, never the data generation: the first `--speed-n` of the same
values, already in memory as the same chunks, are fed to `ColumnStats` (candidate) and, as the
baseline, to the same libraries called directly — a DataSketches ``kll_doubles_sketch`` of the same k
updated with each chunk as float64, and one-pass numpy sums (count, Σx, Σx², Σx³, min, max) for the
moments. That is the fair baseline: the same sketch and the same statistics from the same libraries
without scalelab's layer (its NaN filtering and its two-pass, mergeable moments), so the ratio is the
price of that layer. Interleaved rounds, wall and CPU, min/median/max (`harness.compare`).

    .venv/bin/python benchmarks/bench_data_stats.py              # 1e7 values, quick
    .venv/bin/python benchmarks/bench_data_stats.py --n 1e8      # the issue's case
"""

from __future__ import annotations

import argparse
import resource
import time
from collections.abc import Iterator

import numpy as np
from harness import compare, emit, emit_value, timed

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


def plain_stats(parts: list[np.ndarray], k: int) -> tuple[object, list[float]]:
    """The baseline: the same KLL sketch fed directly, and one-pass numpy sums for the moments."""
    from datasketches import kll_doubles_sketch

    sketch = kll_doubles_sketch(k)
    sums = [0.0, 0.0, 0.0, 0.0, np.inf, -np.inf]
    for x in parts:
        x64 = x.astype(np.float64)
        sketch.update(x64)
        sums[0] += x64.size
        sums[1] += float(x64.sum())
        sums[2] += float(np.dot(x64, x64))
        sums[3] += float(np.sum(x64 * x64 * x64))
        sums[4] = min(sums[4], float(x64.min()))
        sums[5] = max(sums[5], float(x64.max()))
    return sketch, sums


def max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=float, default=1e7, help="number of values")
    ap.add_argument("--chunk", type=int, default=1 << 20, help="values per chunk (a Parquet row group)")
    ap.add_argument("--k", type=int, default=DEFAULT_K, help="KLL k (default: scalelab's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--speed-n", type=float, default=1e7, help="values fed in each timed speed round")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    n = int(args.n)

    rss_start = max_rss_bytes()
    sketch_s = 0.0  # the updates alone, not the generation of the chunks
    stats = ColumnStats(quantiles=Quantiles(args.k))
    for x in chunks(n, args.chunk, args.seed):
        t0 = time.perf_counter()
        stats.update(x)
        sketch_s += time.perf_counter() - t0
    rss_sketch = max_rss_bytes()
    answers = stats.quantiles.quantiles(QS)
    sketch_bytes = len(stats.quantiles.to_bytes())

    full = np.empty(n, dtype=np.float32)
    pos = 0
    for x in chunks(n, args.chunk, args.seed):
        full[pos : pos + x.size] = x
        pos += x.size
    speed_n = min(n, int(args.speed_n))
    parts = [full[i : min(i + args.chunk, speed_n)] for i in range(0, speed_n, args.chunk)]

    def ours() -> float:
        s = ColumnStats(quantiles=Quantiles(args.k))
        for x in parts:
            s.update(x)
        return speed_n

    def theirs() -> float:
        plain_stats(parts, args.k)
        return speed_n

    speed = compare(
        "column_stats_values_per_second",
        lambda: timed(ours),
        lambda: timed(theirs),
        "values/s",
        rounds=args.rounds,
        warmup=True,
        baseline_name=f"datasketches kll_doubles_sketch(k={args.k}) + one-pass numpy sums, called directly",
        n=speed_n,
        chunk=args.chunk,
    )
    t0 = time.perf_counter()
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
    emit_value(
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
    emit_value(
        "sketch_pass_peak_rss",
        rss_sketch / 2**20,
        n * 4 / 2**20,
        "MiB",
        baseline_name="the float32 values themselves (what an in-memory exact pass must hold)",
        rss_before_mib=rss_start / 2**20,
        sketch_serialized_bytes=sketch_bytes,
        exact_pass_peak_rss_mib=rss_exact / 2**20,
        sketch_update_seconds=sketch_s,
        exact_sort_seconds=sort_s,
        values_per_second=n / sketch_s,
    )
    emit(speed)
    emit_value(
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
