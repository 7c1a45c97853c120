"""Does `study advise`'s top suggestion shrink the target's interval more per FLOP than the median candidate?

For each backtested study (`scalelab.study.advise_check`): rank the candidates with advise (refits with
simulated outcomes at the point prediction), then refit with each candidate's *true* loss added and
compare the pick's actual shrink of the calibrated loss interval at the target, per FLOP, with the
median candidate's. Value: the share of studies where the pick beats the median (the issue's bar: 0.80).
Baseline: a random pick's chance of beating the median, measured on the same candidates and outcomes
(the share of candidates above the median, averaged) — the fair yardstick because it is what choosing
without advise gets from exactly the same runs.

Simulated ladders: 3 sizes × 3 tokens-per-parameter ratios from a perturbed Chinchilla law, 1–3 % noise,
8 ladder candidates, target 100–1000× the pilot. Public ladders (../shared/reference): a 14-run pilot
drawn from the lower half of compute, 8 candidates among the measured runs up to 30× above it (their
measured losses are the truth), target 10× the largest run.

`--quantity N_opt`: the same simulated backtest with the target N_opt's bootstrap interval (`--bootstrap`
draws per refit, 64 by default) instead of the calibrated loss interval.

Sample size (`--width`): in 20 simulated studies ask for 30–70 % of the current half-width, follow the
answer's rung with true losses under 4 independent noise draws each (the same design), refit, and report
the reached/asked ratio: median, the share of all draws and of the first draws within ±25 %, the share of
studies whose mean over the draws is within ±25 %, how much the draws of one design scatter (the part of
the spread no answer can remove), and how often a draw lands in the answer's 10–90 % range. Baseline: 1,
exactly the width asked for.

Usage: python benchmarks/bench_study_advise.py [--studies 50] [--reference-trials 10]
       [--only sim|reference|sample-size] [--quantity loss|N_opt] [--bootstrap 64]
       [--jobs J] [--draws 2] [--first-seed 0]
Prints one JSON line per set {name, value, baseline, ratio, unit, studies, wins, load, wall_seconds, cpu_seconds}.
"""

from __future__ import annotations

import os

for _k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS"):
    os.environ[_k] = "1"

import argparse  # noqa: E402
import logging  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from functools import partial  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from harness import cpu_seconds, emit, load, measured  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402

from scalelab.errors import FitError  # noqa: E402
from scalelab.fit import reference  # noqa: E402
from scalelab.fit.table import RunTable  # noqa: E402
from scalelab.study.advise import FitSettings  # noqa: E402
from scalelab.study.advise_check import (  # noqa: E402
    Trial,
    reference_trial,
    sample_size_trial,
    simulated_trial,
    win_rate,
)

REF = Path(__file__).resolve().parents[1].parent / "shared" / "reference"


def reference_tables() -> list[tuple[str, RunTable]]:
    out = []
    if (REF / "chinchilla_epoch.csv").is_file():
        out.append(("chinchilla (Epoch)", reference.chinchilla_epoch(REF / "chinchilla_epoch.csv")))
    if (REF / "li2025_openlm_last_ckpt.csv").is_file():
        out.append(("open_lm (Li 2025)", reference.openlm_li2025(REF / "li2025_openlm_last_ckpt.csv")))
    if (REF / "gadre2024").is_dir():
        out.append(("Gadre 2024 c4_original", reference.gadre2024(REF / "gadre2024", "c4_original")))
    return out


def _reference(table: RunTable, draws: int, seed: int) -> Trial:
    return reference_trial(table, seed, draws=draws)


def _simulated(draws: int, quantity: str, bootstrap: int, seed: int) -> Trial | None:
    """One simulated backtest; None where advise declines (the pilot's fit gives no finite interval of
    the quantity, e.g. N_opt's bootstrap draws running to a bound: nothing to shrink)."""
    settings = FitSettings(bootstrap=bootstrap if quantity == "N_opt" else 0)
    try:
        return simulated_trial(seed, draws=draws, settings=settings, quantity=quantity)
    except FitError:
        return None


def measure(name: str, trial: Callable[[int], Trial | None], seeds: range, jobs: int = 1) -> dict:
    """Run one backtest per seed (in `jobs` processes, same results) and emit the win rate (of the
    studies advise did not decline)."""
    t0, c0, load0 = time.perf_counter(), cpu_seconds(), load()
    if jobs > 1:
        with ProcessPoolExecutor(jobs) as pool:
            everything = list(pool.map(trial, seeds))
    else:
        everything = [trial(seed) for seed in seeds]
    trials = [t for t in everything if t is not None]
    rate = win_rate(trials)
    result = measured(
        f"study advise: top pick beats the median candidate per FLOP, {name}",
        rate["win_rate"],
        rate["random_pick_win_rate"],
        "fraction of studies",
    ) | {
        "studies": rate["studies"],
        "declined": len(everything) - len(trials),
        "seeds": f"{seeds.start}..{seeds.stop - 1}",
        "wins": rate["wins"],
        "mean_percentile": rate["mean_percentile"],
        "load": [load0, load()],
        "wall_seconds": time.perf_counter() - t0,
        "cpu_seconds": cpu_seconds() - c0,
    }
    emit(result)
    return result


def measure_sample_size(n: int, jobs: int = 1) -> dict:
    """Follow the sample-size answer in `n` simulated studies (4 noise draws of its rung each); emit the
    reached/asked half-width ratio and how it scatters."""
    t0, c0, load0 = time.perf_counter(), cpu_seconds(), load()
    with ProcessPoolExecutor(max(jobs, 1)) as pool:
        results = [r for r in pool.map(sample_size_trial, range(n)) if r["reachable"]]
    ratios = np.array([r["ratios"] for r in results])  # (studies, draws)
    means = ratios.mean(axis=1)
    within = np.abs(ratios - 1) <= 0.25
    result = measured(
        "study advise --width: reached / asked half-width after following the answer, simulated",
        float(np.median(ratios)),
        1.0,
        "median ratio over all draws (1 = exactly the width asked for)",
        values=[float(x) for x in ratios.ravel()],  # min/median/max over every draw
    ) | {
        "studies": n,
        "reachable": len(results),
        "draws_per_study": int(ratios.shape[1]),
        "within_25_percent_all_draws": float(within.mean()),
        "within_25_percent_first_draw": float(within[:, 0].mean()),
        "within_25_percent_study_mean": float(np.mean(np.abs(means - 1) <= 0.25)),
        "at_most_125_percent_all_draws": float(np.mean(ratios <= 1.25)),
        "median_ratio_study_mean": float(np.median(means)),
        "study_mean_ratio_p10_p90": [float(np.percentile(means, 10)), float(np.percentile(means, 90))],
        "within_design_sd_median": float(np.median(ratios.std(axis=1))),
        "in_predicted_10_90_range": float(np.mean([r["in_range"] for r in results])),
        "ratio_min": float(ratios.min()),
        "ratio_max": float(ratios.max()),
        "per_study_mean_ratio": [round(float(m), 3) for m in means],
        # does the study-to-study scatter follow how far the pilot's fit misses the rung?
        "spearman_ratio_vs_rung_miss": float(spearmanr(means, [r["rung_miss"] for r in results])[0]),
        "load": [load0, load()],
        "wall_seconds": time.perf_counter() - t0,
        "cpu_seconds": cpu_seconds() - c0,
    }
    emit(result)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--studies", type=int, default=50, help="simulated studies")
    ap.add_argument("--reference-trials", type=int, default=10, help="backtests per public ladder")
    ap.add_argument("--only", choices=("sim", "reference", "sample-size"), default=None)
    ap.add_argument("--sample-size-studies", type=int, default=20, help="simulated studies for --width")
    ap.add_argument("--jobs", type=int, default=1, help="backtests in parallel processes")
    ap.add_argument("--draws", type=int, default=1, help="advise's outcome nodes (1: point prediction only)")
    ap.add_argument("--first-seed", type=int, default=0, help="seeds run from here")
    ap.add_argument("--quantity", choices=("loss", "N_opt"), default="loss", help="the target advised on")
    ap.add_argument("--bootstrap", type=int, default=64, help="bootstrap draws per refit for N_opt")
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    if args.only in (None, "sim"):
        seeds = range(args.first_seed, args.first_seed + args.studies)
        trial = partial(_simulated, args.draws, args.quantity, args.bootstrap)
        name = f"simulated ladders, draws={args.draws}" + (", N_opt" if args.quantity == "N_opt" else "")
        measure(name, trial, seeds, args.jobs)
    if args.only in (None, "sample-size"):
        measure_sample_size(args.sample_size_studies, args.jobs)
    if args.only in (None, "reference"):
        tables = reference_tables()
        if not tables:
            print(f"note: {REF} absent; public-ladder backtests skipped")
        for name, table in tables:
            seeds = range(args.first_seed, args.first_seed + args.reference_trials)
            measure(f"{name}, draws={args.draws}", partial(_reference, table, args.draws), seeds, args.jobs)


if __name__ == "__main__":
    main()
