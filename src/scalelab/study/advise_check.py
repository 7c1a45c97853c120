"""Backtests of `study.advise`: does its top suggestion shrink the target's interval more per FLOP than
the median candidate, when the candidates' outcomes are the truth (a known law, or public measurements)?

A "win" for one study: the top-ranked candidate's *actual* shrink per FLOP (refit with its true loss
added) is above the median of all candidates' actual shrinks per FLOP. Random picks win about half the
time (less when many candidates tie at zero shrink); the issue's bar is 80 %.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from scalelab.errors import FitError
from scalelab.fit.synthetic import HOFFMANN, chinchilla_loss, grid_design
from scalelab.fit.table import RunTable, make_table
from scalelab.study.advise import (
    Candidate,
    FitSettings,
    half_width,
    ladder_candidates,
    sample_size,
    score_candidates,
    target_width,
    with_runs,
)


@dataclass(frozen=True)
class Trial:
    """One backtested study: the pick, its actual shrink per FLOP and the candidates' median."""

    top: str
    top_actual: float  # log-width shrink per PFLOP, with the true outcome
    median_actual: float
    win: bool
    percentile: float  # share of candidates whose actual shrink per FLOP is below the pick's
    random_win: float  # share of candidates above the median: a random pick's chance to win

    def to_dict(self) -> dict[str, Any]:
        return {
            "top": self.top,
            "top_actual": self.top_actual,
            "median_actual": self.median_actual,
            "win": self.win,
            "percentile": self.percentile,
            "random_win": self.random_win,
        }


def judge(
    table: RunTable,
    candidates: Sequence[Candidate],
    truth: Callable[[Candidate], float],
    compute: float,
    settings: FitSettings,
    draws: int,
    quantity: str = "loss",
) -> Trial:
    """Rank `candidates` with advise, then refit with each one's true loss and compare."""
    ranked = score_candidates(table, candidates, compute, quantity=quantity, draws=draws, settings=settings)
    before = ranked[0].width_before
    actual = {}
    for c in candidates:
        t = with_runs(table, [c.N], [c.D], [truth(c)], [c.flops])
        try:
            w = target_width(settings.fit(t), compute, quantity)
        except FitError:
            w = before
        actual[c.label] = (before - w) / c.flops * 1e15
    top = ranked[0].candidate.label
    values = np.array(list(actual.values()))
    med = float(np.median(values))
    pick = float(actual[top])
    return Trial(
        top, pick, med, bool(pick > med), float(np.mean(values < pick)), float(np.mean(values > med))
    )


def simulated_trial(
    seed: int,
    draws: int = 1,
    settings: FitSettings | None = None,
    n_candidates: int = 8,
    quantity: str = "loss",
) -> Trial:
    """A pilot of 3 sizes × 3 tokens-per-parameter ratios from a perturbed Chinchilla law with 1–3 %
    log-normal noise; target 100–1000× the pilot's largest compute; `n_candidates` drawn from the
    ladder candidates. `quantity` N_opt needs `settings` with a bootstrap (its interval is the draws')."""
    rng = np.random.default_rng(seed)
    truth, noise, table, compute = _simulated_pilot(rng)
    ladder = ladder_candidates(table)
    cands = [
        ladder[i] for i in sorted(rng.choice(len(ladder), min(n_candidates, len(ladder)), replace=False))
    ]

    def outcome(c: Candidate) -> float:
        return float(
            chinchilla_loss(truth, np.array([c.N]), np.array([c.D]))[0]
            * math.exp(noise * rng.standard_normal())
        )

    return judge(table, cands, outcome, compute, settings or FitSettings(), draws, quantity)


def _simulated_pilot(rng: np.random.Generator) -> tuple[dict[str, float], float, RunTable, float]:
    """A perturbed Chinchilla truth, its noise, a 3 × 3 pilot drawn from it and a target compute."""
    truth = dict(HOFFMANN)
    truth["alpha"] += rng.uniform(-0.06, 0.06)
    truth["beta"] += rng.uniform(-0.06, 0.06)
    truth["E"] *= rng.uniform(0.8, 1.2)
    noise = rng.uniform(0.01, 0.03)
    n0 = 10 ** rng.uniform(6.5, 8)
    N, D = grid_design(n0 * np.array([1.0, 2.5, 6.0]), (5, 20, 80))
    loss = chinchilla_loss(truth, N, D) * np.exp(noise * rng.standard_normal(N.size))
    table = make_table(N, D, loss, source="<simulated pilot>")
    return truth, noise, table, float(table.C.max() * 10 ** rng.uniform(2, 3))


def sample_size_trial(seed: int, settings: FitSettings | None = None, repeats: int = 4) -> dict[str, Any]:
    """Ask for 30–70 % of the pilot's current half-width, run the answer's rung with true losses under
    `repeats` independent noise draws (the same design each time), refit, and compare the half-widths
    reached with the one asked for and the one expected."""
    rng = np.random.default_rng(10_000 + seed)
    truth, noise, table, compute = _simulated_pilot(rng)
    settings = settings or FitSettings()
    law = settings.fit(table)
    now = half_width(target_width(law, compute))
    goal = now * rng.uniform(0.3, 0.7)
    answer = sample_size(table, compute, goal, settings=settings, iterations=6)
    if not answer.reachable:
        return {"goal": goal, "reached": None, "ratio": None, "reachable": False}
    runs = answer.runs
    N, D = np.array([r.N for r in runs]), np.array([r.D for r in runs])
    true_loss = chinchilla_loss(truth, N, D)
    reached = []
    for _ in range(repeats):
        loss = true_loss * np.exp(noise * rng.standard_normal(len(runs)))
        t = with_runs(table, list(N), list(D), list(loss), [r.flops for r in runs])
        try:
            reached.append(half_width(target_width(settings.fit(t), compute)))
        except FitError:
            reached.append(math.inf)
    ratios = np.asarray(reached) / goal
    lo, hi = answer.half_width_range
    return {
        "goal": goal,
        "expected": answer.half_width_expected,
        "expected_range": [lo, hi],
        "reached": reached,
        "ratios": ratios.tolist(),
        "ratio": float(ratios[0]),
        "mean_ratio": float(np.mean(ratios)),
        "in_range": float(np.mean((np.asarray(reached) >= lo) & (np.asarray(reached) <= hi))),
        # how far the pilot's fit misses the rung (rms log error): what the rung reveals, unknown before
        "rung_miss": float(np.sqrt(np.mean(np.log(true_loss / np.asarray(law.predict(N, D))) ** 2))),
        "reachable": True,
        "runs": len(runs),
        "rung_flops": answer.rung_flops,
    }


def reference_trial(
    table: RunTable,
    seed: int,
    pilot_runs: int = 14,
    n_candidates: int = 8,
    draws: int = 1,
    settings: FitSettings | None = None,
) -> Trial:
    """From public runs: a pilot of `pilot_runs` drawn from the lower half of compute, candidates drawn
    from the runs above the pilot's largest compute (their measured losses are the truth), target the
    table's largest compute × 10."""
    rng = np.random.default_rng(seed)
    order = np.argsort(table.C)
    lower = order[: len(order) // 2]
    pilot = np.sort(rng.choice(lower, size=min(pilot_runs, lower.size), replace=False))
    c_max = table.C[pilot].max()
    above = np.flatnonzero((table.C > c_max) & (table.C <= c_max * 30))
    if above.size < 3:
        above = np.flatnonzero(table.C > c_max)
    picks = rng.choice(above, size=min(n_candidates, above.size), replace=False)
    sub = table.subset(pilot)
    cands = [Candidate(float(table.N[i]), float(table.D[i]), float(table.C[i]), f"run{i}") for i in picks]
    loss = {f"run{i}": float(table.loss[i]) for i in picks}
    compute = float(table.C.max() * 10)
    return judge(sub, cands, lambda c: loss[c.label], compute, settings or FitSettings(), draws)


def win_rate(trials: Sequence[Trial]) -> dict[str, Any]:
    wins = sum(t.win for t in trials)
    return {
        "studies": len(trials),
        "wins": int(wins),
        "win_rate": wins / len(trials) if trials else float("nan"),
        "mean_percentile": float(np.mean([t.percentile for t in trials])) if trials else float("nan"),
        "random_pick_win_rate": float(np.mean([t.random_win for t in trials])) if trials else float("nan"),
    }
