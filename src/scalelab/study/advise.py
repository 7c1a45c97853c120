"""Design advice: which next runs shrink the calibrated interval of the study's target the most per FLOP,
and how many runs (and where) reach a stated interval width.

A candidate run is scored by refitting the law with it added and measuring the target's interval: the
*calibrated* loss interval at the compute-optimal allocation for the target compute (or N_opt's bootstrap
interval). By default (``draws=1``) the run's loss is the current fit's prediction, and the score is the
shrink of the interval's log width per FLOP. With ``draws=K > 1`` its loss is taken at K Gauss–Hermite
nodes of the fit's calibrated predictive distribution at the candidate (sd: the largest of the one-sigma
calibrated interval, the residual scatter and the seed spread), and the score is the expected shrink
less `risk` times its spread over those outcomes. On simulated ladders the plain prediction won more
often (docs/studies.md gives both figures), hence the default.
Refitting through the real estimator is what makes this work: the calibrated width depends on the
extrapolation distance and on the rolling-origin folds a new run creates, which a local (Fisher)
approximation does not see. `docs/studies.md` gives the measured win rate.

The sample-size answer (`sample_size`) places one rung of runs by bisection in compute; its outcomes are
laws drawn from the runs' bootstrap plus run noise (`OutcomeModel`), each refitted, and the answer is the
median half-width over them with their 10–90 % range.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from scalelab.errors import FitError
from scalelab.fit.calibrate import residual_scatter, seed_noise
from scalelab.fit.estimate import power_sum_log_predict
from scalelab.fit.laws import ChinchillaLaw
from scalelab.fit.table import RunTable, make_table

log = logging.getLogger(__name__)

QUANTITIES = ("loss", "N_opt")
#: a normal's probability within one sd: the level whose interval half-width is one sd
ONE_SIGMA = 0.6826894921370859


@dataclass(frozen=True)
class Candidate:
    """A possible next run: its size N, tokens D, FLOPs, and (for a study) the overrides that make it."""

    N: float
    D: float
    flops: float
    label: str = ""
    overrides: dict[str, Any] = field(default_factory=dict)
    group: str | None = None  # the study group (data source or group_by value) the run belongs to


@dataclass(frozen=True)
class Scored:
    """A candidate with its expected target width after it runs, how much that width varies with the
    run's outcome, and the shrink per FLOP it is ranked by (a risk-adjusted one: the shrink an outcome
    `risk` standard deviations on the bad side would still give)."""

    candidate: Candidate
    width_before: float  # log(hi/lo) of the target's interval now
    width_after: float  # expected log width with the candidate added
    shrink: float  # width_before − width_after (log units)
    spread: float = 0.0  # sd of the width after over the run's possible outcomes
    risk: float = 1.0

    @property
    def shrink_per_flop(self) -> float:
        return self.shrink / self.candidate.flops

    @property
    def safe_shrink_per_flop(self) -> float:
        """(shrink − risk · spread) / FLOPs: the ranking key."""
        return (self.shrink - self.risk * self.spread) / self.candidate.flops

    def to_dict(self) -> dict[str, Any]:
        c = self.candidate
        return {
            "label": c.label,
            "N": c.N,
            "D": c.D,
            "flops": c.flops,
            "overrides": c.overrides,
            "group": c.group,
            "width_before": self.width_before,
            "width_after": self.width_after,
            "shrink": self.shrink,
            "spread": self.spread,
            "shrink_per_pflop": self.shrink_per_flop * 1e15,
            "safe_shrink_per_pflop": self.safe_shrink_per_flop * 1e15,
        }


@dataclass(frozen=True)
class FitSettings:
    """How the target's interval is computed (the study's own fit settings; a small bootstrap by default
    so that scoring a dozen candidates stays a matter of seconds)."""

    bootstrap: int = 0
    delta: float = 1e-3
    confidence: float = 0.9
    seed: int = 0

    def fit(self, table: RunTable) -> ChinchillaLaw:
        return ChinchillaLaw(
            delta=self.delta, n_bootstrap=self.bootstrap, confidence=self.confidence, seed=self.seed
        ).fit(table)


def target_width(law: ChinchillaLaw, compute: float, quantity: str = "loss") -> float:
    """Log width log(hi/lo) of the target's interval under `law`: the calibrated loss interval at the
    optimal allocation for `compute`, or N_opt's (parameter-only, needs a bootstrap)."""
    if quantity not in QUANTITIES:
        raise FitError(f"--quantity: one of {', '.join(QUANTITIES)}, got {quantity!r}")
    try:
        iv = law.optimal(compute)["intervals"].get(quantity)
    except FitError:  # a refit whose optimum is undefined (an exponent at its bound): no usable interval
        return math.inf
    if not iv:
        raise FitError(f"no interval for {quantity} at {compute:.3g} FLOPs (N_opt needs --bootstrap > 0)")
    lo, hi = float(iv[0]), float(iv[1])
    if not (lo > 0 and math.isfinite(hi)):
        return math.inf
    return math.log(hi / lo)


def with_runs(
    table: RunTable,
    N: Sequence[float],
    D: Sequence[float],
    loss: Sequence[float],
    C: Sequence[float] | None = None,
) -> RunTable:
    """`table` with runs appended (a fresh seed label each, so replicates of a config stay distinct)."""
    n_new = len(N)
    C_new = list(C) if C is not None else [6.0 * n * d for n, d in zip(N, D, strict=True)]
    old_seeds = table.seed.tolist() if table.seed is not None else [0] * len(table)
    seeds = [*old_seeds, *(f"advise-{len(table) + i}" for i in range(n_new))]
    groups = None
    if table.group is not None:
        groups = [*table.group.tolist(), *([table.groups[0]] * n_new)]
    c_all = [*table.C.tolist(), *C_new] if table.compute_source != "6ND" else None
    return make_table(
        [*table.N.tolist(), *N],
        [*table.D.tolist(), *D],
        [*table.loss.tolist(), *loss],
        c_all,
        seed=seeds,
        group=groups,
        compute_source=table.compute_source if c_all is not None else None,
        source=table.source,
    )


def outcome_noise(law: ChinchillaLaw, table: RunTable) -> float:
    """Log-space sd of a new run's loss about the fit: the larger of residual scatter and seed spread."""
    noise = seed_noise(table)
    return max(residual_scatter(law), noise["log_sd"] if noise else 0.0, 1e-3)


def _predicted(law: ChinchillaLaw, cand: Candidate) -> float:
    return float(np.asarray(law.predict(cand.N, cand.D)).ravel()[0])


def predictive_sd(law: ChinchillaLaw, cand: Candidate) -> float:
    """Log-space sd of the candidate's loss under the current fit's calibrated predictive interval (its
    one-sigma half-width: wide where the candidate extrapolates; 0 without a calibration)."""
    try:
        lo, hi = law.predict_interval(cand.N, cand.D, kind="calibrated", level=ONE_SIGMA)
    except FitError:
        return 0.0
    return float(np.log(np.asarray(hi) / np.asarray(lo)).ravel()[0] / 2)


def outcome_nodes(draws: int) -> tuple[np.ndarray, np.ndarray]:
    """Standard-normal nodes and weights for the expected width over a new run's noise: Gauss–Hermite
    quadrature with `draws` points (0 or 1: the point prediction alone)."""
    if draws <= 1:
        return np.zeros(1), np.ones(1)
    nodes, weights = np.polynomial.hermite_e.hermegauss(draws)
    return nodes, weights / weights.sum()


def score_candidates(
    table: RunTable,
    candidates: Sequence[Candidate],
    compute: float,
    *,
    quantity: str = "loss",
    draws: int = 1,
    settings: FitSettings | None = None,
    risk: float = 1.0,
) -> list[Scored]:
    """Each candidate's expected target width after it runs (and its sd over the run's outcomes), best
    risk-adjusted shrink per FLOP first."""
    if not candidates:
        raise FitError("no candidate runs to score")
    settings = settings or FitSettings()
    law = settings.fit(table)
    before = target_width(law, compute, quantity)
    if not math.isfinite(before):
        raise FitError(
            f"{table.source}: the current fit gives no finite {quantity} interval at {compute:.3g} FLOPs (a "
            "parameter at its bound or unidentified): nothing to shrink; add runs over a wider range first"
        )
    sd = outcome_noise(law, table)
    eps, weights = outcome_nodes(draws)
    out = []
    for cand in candidates:
        mu = _predicted(law, cand)
        sd_c = max(sd, predictive_sd(law, cand))
        widths = []
        for e in eps:
            t = with_runs(table, [cand.N], [cand.D], [mu * math.exp(sd_c * e)], [cand.flops])
            try:
                widths.append(target_width(settings.fit(t), compute, quantity))
            except FitError as err:
                log.info("candidate %s: refit failed (%s)", cand.label, err)
                widths.append(before)
        after = float(np.dot(weights, widths))
        spread = float(np.sqrt(np.dot(weights, (np.asarray(widths) - after) ** 2)))
        out.append(Scored(cand, before, after, before - after, spread, risk))
    out.sort(key=lambda s: -s.safe_shrink_per_flop)
    return out


def ladder_candidates(
    table: RunTable, larger: Sequence[float] = (2.0, 4.0), ratios: int = 4
) -> list[Candidate]:
    """Candidate next runs for a bare table: the distinct sizes and `larger` multiples of the largest,
    each at up to `ratios` tokens-per-parameter levels spanning the table's (the largest × 2 added), the
    configs already run left out, and a replicate of the largest-compute run. FLOPs as 6·N·D."""
    Ns = np.unique(np.concatenate([np.unique(table.N), table.N.max() * np.asarray(larger)]))
    tpp = table.D / table.N
    levels = np.geomspace(tpp.min(), tpp.max() * 2, ratios)
    seen = {(round(math.log(n), 2), round(math.log(d), 2)) for n, d in zip(table.N, table.D, strict=True)}
    out = []
    for n in Ns:
        for r in levels:
            d = float(n * r)
            if (round(math.log(n), 2), round(math.log(d), 2)) in seen:
                continue
            out.append(Candidate(float(n), d, 6.0 * n * d, f"N={n:.3g} D={d:.3g}"))
    i = int(np.argmax(table.C))
    out.append(Candidate(float(table.N[i]), float(table.D[i]), 6.0 * table.N[i] * table.D[i], "replicate"))
    return out


# ---------------------------------------------------------------------------------------- sample size
@dataclass(frozen=True)
class SampleSize:
    """Runs that reach a target interval: one IsoFLOP rung of `runs` sizes at `rung_flops` per run, the
    half-width expected after it (the median over simulated outcomes) and the range those outcomes span."""

    goal_half_width: float  # the stated ± fraction (e.g. 0.05)
    half_width_now: float
    half_width_expected: float
    rung_flops: float
    runs: list[Candidate]
    reachable: bool
    half_width_range: tuple[float, float] = (math.nan, math.nan)  # 10th–90th percentile over outcomes

    @property
    def total_flops(self) -> float:
        return float(sum(c.flops for c in self.runs))

    def to_dict(self) -> dict[str, Any]:
        return {
            "goal_half_width": self.goal_half_width,
            "half_width_now": self.half_width_now,
            "half_width_expected": self.half_width_expected,
            "half_width_range": list(self.half_width_range),
            "rung_flops": self.rung_flops,
            "total_flops": self.total_flops,
            "reachable": self.reachable,
            "runs": [{"N": c.N, "D": c.D, "flops": c.flops} for c in self.runs],
        }


def rung(law: ChinchillaLaw, flops: float, sizes: int = 3, spread: float = 2.0) -> list[Candidate]:
    """`sizes` runs at `flops` each, spread by `spread`× in N around the fit's optimal N (D = C/6N)."""
    n_opt = float(law.optimal(flops)["N_opt"])
    factors = np.geomspace(1 / spread, spread, sizes) if sizes > 1 else np.ones(1)
    return [Candidate(n_opt * f, flops / (6 * n_opt * f), flops, f"rung N={n_opt * f:.3g}") for f in factors]


def half_width(width: float) -> float:
    """± fraction of a log width: exp(w/2) − 1."""
    return math.expm1(width / 2)


@dataclass(frozen=True)
class OutcomeModel:
    """Where a rung's losses may land: `draws` laws drawn from the pilot's bootstrap (parameter noise,
    which makes a rung miss the fit with a tilt across sizes, not only a shift), stratified by their
    prediction at the target, plus independent run noise (fixed normal draws, shared by every rung
    location so that the bisection compares like with like)."""

    thetas: np.ndarray  # (draws, P) natural parameters of ChinchillaLaw draws
    eps: np.ndarray  # (draws, sizes) standard-normal run noise
    noise: float  # log-space sd of one run's loss

    @classmethod
    def from_table(
        cls,
        table: RunTable,
        law: ChinchillaLaw,
        compute: float,
        settings: FitSettings,
        draws: int,
        sizes: int,
    ) -> OutcomeModel:
        boot = ChinchillaLaw(
            delta=settings.delta,
            n_bootstrap=max(8 * draws, 64),
            seed=settings.seed,
            calibrate=False,
            n_jobs=1,
        ).fit(table)
        opt = law.optimal(compute)
        at = np.log(np.array([[opt["N_opt"], opt["D_opt"]]]))
        pred = np.array([power_sum_log_predict(t, at)[0] for t in boot.samples_])
        ok = np.flatnonzero(np.isfinite(pred))
        if ok.size < draws:
            raise FitError(f"{table.source}: too few usable bootstrap draws to simulate a rung's outcomes")
        order = ok[np.argsort(pred[ok])]
        pick = order[((np.arange(draws) + 0.5) / draws * order.size).astype(int)]
        eps = np.random.default_rng(settings.seed + 7).standard_normal((draws, sizes))
        return cls(boot.samples_[pick], eps, max(outcome_noise(law, table), _residual_sd(law)))

    def losses(self, runs: Sequence[Candidate]) -> np.ndarray:
        """(draws, len(runs)) simulated losses of `runs`."""
        logX = np.log(np.array([[r.N, r.D] for r in runs]))
        logp = np.stack([power_sum_log_predict(t, logX) for t in self.thetas])
        return np.exp(logp + self.noise * self.eps[:, : len(runs)])


def _residual_sd(law: ChinchillaLaw) -> float:
    """Root-mean-square residual corrected for the parameters fitted (a 5-parameter fit of a few runs
    interpolates them, and the raw scatter then understates a new run's noise)."""
    r = np.asarray(law.residuals_, dtype=np.float64)
    dof = r.size - len(law.param_names)
    return float(np.sqrt(np.sum(r * r) / dof)) if dof > 0 else 0.0


def sample_size(
    table: RunTable,
    compute: float,
    goal_half_width: float,
    *,
    quantity: str = "loss",
    sizes: int = 3,
    settings: FitSettings | None = None,
    max_factor: float | None = None,
    iterations: int = 8,
    draws: int = 8,
) -> SampleSize:
    """The smallest rung compute (bisection in log C, between the largest run and the target) whose
    rung of `sizes` runs is expected to bring the target's interval to ± `goal_half_width`: the median
    half-width over `draws` simulated outcomes of the rung (`OutcomeModel`), each refitted."""
    if not 0 < goal_half_width < 10:
        raise FitError(f"--width: a fraction such as 0.05 (±5 %), got {goal_half_width}")
    settings = settings or FitSettings()
    law = settings.fit(table)
    now = half_width(target_width(law, compute, quantity))
    if now <= goal_half_width:
        return SampleSize(goal_half_width, now, now, 0.0, [], True, (now, now))
    c_lo = float(table.C.max())
    c_hi = float(compute if max_factor is None else min(compute, c_lo * max_factor))
    model = OutcomeModel.from_table(table, law, compute, settings, max(draws, 1), sizes)

    def outcomes(c: float) -> tuple[float, tuple[float, float]]:
        """Median half-width with the rung at `c` over the simulated outcomes, and their 10–90 % range (the
        median, not the mean: a few outcomes that miss the fit widely make the width's distribution skewed,
        and the median is what a single study most likely reaches)."""
        runs = rung(law, c, sizes)
        hws = []
        for loss in model.losses(runs):
            t = with_runs(
                table, [r.N for r in runs], [r.D for r in runs], list(loss), [r.flops for r in runs]
            )
            try:
                hws.append(half_width(target_width(settings.fit(t), compute, quantity)))
            except FitError as err:
                log.info("sample size: a simulated rung at %.3g FLOPs did not refit (%s)", c, err)
                hws.append(math.inf)
        h = np.asarray(hws)
        if np.isfinite(h).sum() <= h.size / 2:
            return math.inf, (math.inf, math.inf)
        lo, mid, hi = np.percentile(h, [10, 50, 90])  # inf sorts last: the median stays finite
        return float(mid), (float(lo), float(hi))

    top, top_range = outcomes(c_hi)
    if top > goal_half_width:
        return SampleSize(goal_half_width, now, top, c_hi, rung(law, c_hi, sizes), False, top_range)
    lo, hi, best = math.log(c_lo), math.log(c_hi), (top, top_range)
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        w = outcomes(math.exp(mid))
        if w[0] <= goal_half_width:
            hi, best = mid, w
        else:
            lo = mid
    c = math.exp(hi)
    return SampleSize(goal_half_width, now, best[0], c, rung(law, c, sizes), True, best[1])
