"""The report's decision: the recommended big run as a ready-to-run spec (shape for the fitted N_opt, tokens
D_opt, batch and LR from the transfer / noise-scale results, cadence, forecast cost), and next actions.

The shape follows how the study itself scaled its models (width only, depth only, or both at the largest
run's aspect ratio; heads fixed or head size fixed), so the big run is the same family the law was fitted on.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from scalelab.errors import ScalelabError
from scalelab.models.flops import FORMULAS, ModelShape
from scalelab.report.toml_out import dumps
from scalelab.spec import MAX_DEPTH, MAX_WIDTH, ModelSpec, RunSpec, run_from_dict
from scalelab.study.plan import planning_vocab
from scalelab.units import count, duration, flops

if TYPE_CHECKING:
    from scalelab.report.summary import StudySummary

log = logging.getLogger(__name__)

#: checkpoints and held-out evaluations the recommended run makes over its length
CHECKPOINTS_PER_RUN = 20
EVALS_PER_RUN = 50


@dataclass
class ScalingRule:
    """How the study grew its models: which of width/depth varied, and whether heads or head size stayed."""

    width: bool
    depth: bool
    fixed_heads: bool

    def describe(self) -> str:
        axes = (
            "width and depth (at the largest run's aspect ratio)"
            if self.width and self.depth
            else ("depth" if self.depth else "width")
        )
        heads = "the number of heads fixed" if self.fixed_heads else "the head size fixed"
        return f"scaled in {axes} with {heads}, as the study's runs were"


@dataclass
class RecommendedRun:
    spec: RunSpec
    toml: str
    n_non_embedding: int
    n_total: int
    tokens: int
    steps: int
    compute_flops: float
    seconds: float | None
    usd: float | None
    rows: list[tuple[str, str]] = field(default_factory=list)


def scaling_rule(configs: list[dict[str, Any]]) -> ScalingRule:
    widths = {c["model"]["width"] for c in configs}
    depths = {c["model"]["depth"] for c in configs}
    heads = {c["model"]["n_heads"] for c in configs}
    return ScalingRule(
        width=len(widths) > 1 or len(depths) == 1, depth=len(depths) > 1, fixed_heads=len(heads) == 1
    )


def _candidates(base: ModelSpec, rule: ScalingRule) -> tuple[int, Callable[[int], ModelSpec]]:
    """(count, i ↦ i-th candidate), candidates growing in size with i."""
    d_head = base.width // base.n_heads
    step = math.lcm(base.n_heads, 8) if rule.fixed_heads else d_head

    def at(width: int, depth: int) -> ModelSpec:
        width = max(step, min(MAX_WIDTH // step * step, round(width / step) * step))
        heads = base.n_heads if rule.fixed_heads else width // d_head
        kv = base.n_kv_heads if base.n_kv_heads and heads % base.n_kv_heads == 0 else None
        return base.model_copy(update={"width": width, "depth": depth, "n_heads": heads, "n_kv_heads": kv})

    if rule.width and rule.depth:
        ratio = base.width / base.depth
        return min(MAX_DEPTH, int(MAX_WIDTH / ratio)), lambda i: at(round(ratio * (i + 1)), i + 1)
    if rule.depth:
        return MAX_DEPTH, lambda i: at(base.width, i + 1)
    return MAX_WIDTH // step, lambda i: at(step * (i + 1), base.depth)


def shape_for_params(
    base: ModelSpec, vocab: int, target_params: float, total: bool, rule: ScalingRule
) -> ModelSpec:
    """The model of `base`'s family, grown by `rule`, whose N (total or non-embedding) is nearest to
    `target_params` on a log scale (N grows with the candidate index, so a bisection finds it)."""

    def n_of(m: ModelSpec) -> int:
        s = ModelShape.from_spec(m, vocab)
        return s.total_params if total else s.non_embedding_params

    size, at = _candidates(base, rule)
    lo, hi = 0, max(0, size - 1)
    while lo < hi:  # first candidate with N >= target
        mid = (lo + hi) // 2
        if n_of(at(mid)) < target_params:
            lo = mid + 1
        else:
            hi = mid
    near = [at(i) for i in {max(0, lo - 1), lo}]
    return min(near, key=lambda m: abs(math.log(n_of(m) / target_params)))


def usd_text(usd: float) -> str:
    """$0.22, $41.50, $12,345."""
    return f"${usd:,.2f}" if usd < 100 else f"${usd:,.0f}"


def _measured_flops_per_second(runs: list[dict[str, Any]]) -> float | None:
    """The training rate the study's largest runs achieved on its hardware (FLOPs per wall second)."""
    timed = sorted((r for r in runs if r.get("flops") and r.get("wall_seconds")), key=lambda r: r["flops"])
    rates = [r["flops"] / r["wall_seconds"] for r in timed[-3:]]
    return max(rates) if rates else None


def recommend_run(
    runs: list[dict[str, Any]],
    recommendation: dict[str, Any],
    n_key: str,
    *,
    lr: float | None = None,
    lr_source: str = "the study's learning rate",
    batch_sequences: int | None = None,
    usd_per_hour: float | None = None,
) -> RecommendedRun | None:
    """The big run for the fit's `recommendation` (N_opt, D_opt), built from the largest finished run's
    config; `lr` and `batch_sequences` override the study's (from the transfer and noise-scale analyses)."""
    if not recommendation.get("N_opt") or not recommendation.get("D_opt"):
        return None
    configs = []
    for r in runs:
        try:
            c = json.loads(r.get("config_json") or "{}")
        except ValueError:
            continue
        if isinstance(c, dict) and "model" in c:
            configs.append((r, c))
    if not configs:
        log.info("no finished run recorded its config: no recommended run")
        return None
    largest_run, largest = max(configs, key=lambda rc: rc[0].get("flops") or 0)
    try:
        base = run_from_dict(largest, f"config of run {largest_run['run_id']}")
    except ScalelabError as err:
        log.warning("cannot read the largest run's config: %s", err)
        return None
    if base.model.family not in FORMULAS:
        log.info("family %s is counted by building it: no shape search", base.model.family)
        return None
    vocab = planning_vocab(base)
    rule = scaling_rule([c for _, c in configs])
    model = shape_for_params(
        base.model, vocab, float(recommendation["N_opt"]), n_key == "n_params_total", rule
    )
    t = base.train
    batch = batch_sequences or t.global_batch_size
    step_tokens = batch * model.context_tokens
    steps = max(1, round(float(recommendation["D_opt"]) / step_tokens))
    micro = t.micro_batch_size
    if isinstance(micro, int) and batch % micro:
        micro = "auto"
    train = t.model_copy(
        update={
            "tokens": steps * step_tokens,
            "global_batch_size": batch,
            "micro_batch_size": micro,
            "lr": lr or t.lr,
            "checkpoint_interval_steps": max(1, steps // CHECKPOINTS_PER_RUN),
            "eval_interval_steps": max(1, steps // EVALS_PER_RUN),
            "threads": None,
            "device": "auto",
        }
    )
    spec = RunSpec(model=model, data=base.data, train=train)
    shape = ModelShape.from_spec(model, vocab)
    compute = shape.training_flops(train.tokens)
    rate = _measured_flops_per_second(runs)
    seconds = compute / rate if rate else None
    usd = seconds / 3600 * usd_per_hour if seconds is not None and usd_per_hour else None
    rows = [
        (
            "shape",
            f"width {model.width}, depth {model.depth}, {model.n_heads} heads, context {model.context_tokens} "
            f"({rule.describe()})",
        ),
        (
            "parameters",
            f"{count(shape.total_params)} total, {count(shape.non_embedding_params)} non-embedding "
            f"(the fit's N_opt is {count(recommendation['N_opt'])} "
            f"{'total' if n_key == 'n_params_total' else 'non-embedding'})",
        ),
        ("tokens", f"{count(train.tokens)} ({steps:,} steps of {batch} × {model.context_tokens} tokens)"),
        ("learning rate", f"{train.lr:.3g} ({lr_source})"),
        (
            "cadence",
            f"checkpoint every {train.checkpoint_interval_steps:,} steps, held-out eval every "
            f"{train.eval_interval_steps:,}",
        ),
        ("compute", flops(compute)),
        (
            "forecast time",
            "unknown (no timed run)"
            if seconds is None
            else f"{duration(seconds)} on the study's hardware at its largest runs' rate of "
            f"{flops(rate).replace(' FLOPs', '')} FLOP/s (bigger models usually run faster per FLOP: "
            "read it as an upper bound)",
        ),
    ]
    if usd is not None:
        rows.append(("forecast cost", f"{usd_text(usd)} at ${usd_per_hour:g} per hour"))
    header = (
        "The recommended run of this scaling study, written by `scalelab report`.\n"
        f"N = {count(shape.total_params)} parameters in total ({count(shape.non_embedding_params)} non-embedding), "
        f"D = {count(train.tokens)} tokens, C = {flops(compute)}"
        + (f", forecast {duration(seconds)}" if seconds is not None else "")
        + (f" ({usd_text(usd)})" if usd is not None else "")
        + ".\n"
        "Run it:   scalelab train recommended_run.toml --out runs/big\n"
        "Check it: scalelab study add-run STUDY_DIR runs/big   (then `scalelab report STUDY_DIR`)\n"
        "Set device, precision, threads or a distributed strategy for your machine under [execution]."
    )
    data = json.loads(spec.canonical_json())
    data.pop("debug", None)
    text = dumps(data, header=header, comments={"train.lr": lr_source})
    if run_from_dict(_parse(text), "recommended_run.toml").run_id != spec.run_id:
        raise ScalelabError("recommended_run.toml does not read back as the spec it was written from (a bug)")
    return RecommendedRun(
        spec,
        text,
        shape.non_embedding_params,
        shape.total_params,
        train.tokens,
        steps,
        compute,
        seconds,
        usd,
        rows,
    )


def _parse(text: str) -> dict[str, Any]:
    import tomllib

    return tomllib.loads(text)


def _n_name(n_key: str) -> str:
    return "total" if n_key == "n_params_total" else "non-embedding"


def next_actions(s: StudySummary) -> list[str]:
    """What to do next, most blocking first: each a concrete step (a run to add, a command to run)."""
    out: list[str] = []
    if s.fit is None:
        return ["Fit the law: `scalelab fit STUDY_DIR`, then `scalelab report STUDY_DIR` again."]
    for a in s.anomalies:
        out.append(f"{a.detail}: {a.action}.")
    runs = [r for r in s.done_runs if r.get(s.n_key) and r.get("flops")]
    rec = s.fit.get("recommendation") or {}
    if s.optimal is not None and runs:
        largest = max(runs, key=lambda r: r["flops"])
        c_max = float(largest["flops"])
        try:
            sides = [math.log(r[s.n_key] / s.optimal(float(r["flops"]))["N_opt"]) for r in runs]
            at_max = s.optimal(c_max)
        except Exception as err:  # noqa: BLE001 - an action list without this item beats no report
            log.info("no frontier check: %s", err)
            sides, at_max = [], {}
        if sides and (all(x > 0 for x in sides) or all(x < 0 for x in sides)):
            where = "above" if sides[0] > 0 else "below"
            out.append(
                f"Every run lies {where} the fitted compute-optimal N at its own compute, so the optimum is "
                f"extrapolated, not observed: add a run at N≈{count(at_max['N_opt'])}, "
                f"D≈{count(at_max['D_opt'])} ({flops(c_max)}, the largest run's compute) to bracket the optimum."
            )
        factor = (rec.get("extrapolation") or {}).get("factor")
        c_target = rec.get("compute_flops")
        if factor and factor > 10 and c_target:
            c_mid = math.sqrt(c_max * float(c_target))
            mid = s.optimal(c_mid)
            out.append(
                f"The target is {factor:.3g}× the largest run's compute: add a run at N≈{count(mid['N_opt'])}, "
                f"D≈{count(mid['D_opt'])} ({flops(c_mid)}, the optimum half-way in log compute) to cut the "
                f"extrapolation to {math.sqrt(factor):.2g}× and test the law on the way."
            )
    e_iv = (s.fit.get("fit", {}).get("intervals") or {}).get("E")
    if e_iv and e_iv[0] is not None and (e_iv[0] <= 0 or e_iv[1] / e_iv[0] > 2) and runs:
        n_max = max(r[s.n_key] for r in runs)
        d_max = max(r["tokens"] for r in runs if r.get("tokens"))
        out.append(
            f"The irreducible loss E is poorly pinned (interval [{_loss_bound(e_iv[0])}, {_loss_bound(e_iv[1])}]): add two runs at "
            f"4× the largest N (N≈{count(4 * n_max)} {_n_name(s.n_key)}), one at D≈{count(d_max)} and one at "
            f"D≈{count(4 * d_max)} tokens, to pin it."
        )
    cal = s.fit.get("fit", {}).get("calibration") or {}
    if not cal.get("noise"):
        out.append(
            "Measure the run-to-run spread (the floor of every interval): add `seeds = [0, 1]` under "
            "[study.design] and run the study again (finished runs are skipped)."
        )
    if s.batch is None and s.recommended is not None and runs:
        largest = max(runs, key=lambda r: r["flops"])
        out.append(
            "Size the big run's batch from a measurement: `scalelab transfer noise-scale "
            f"{largest.get('run_dir') or 'RUN_DIR'}/config.json --json > noise.json` (the largest run's "
            "config), then `scalelab report STUDY_DIR --noise-scale noise.json`."
        )
    if not out:
        out.append(
            "Nothing blocks the decision: train report/recommended_run.toml, then check it with "
            "`scalelab study add-run STUDY_DIR RUN_DIR` and `scalelab report STUDY_DIR`."
        )
    return out


def _loss_bound(value: float) -> str:
    """A loss interval's end without e-notation: '0.00' below 0.005 (a fit's E can reach 1e-12), whole
    numbers with separators from 1000 up, else 3 significant digits."""
    if abs(value) < 0.005:
        return "0.00"
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"
