"""Everything the report says, computed once from the registry, the run directories and `fit.json`.

The HTML page, `summary.md` and `summary.json` are all renderings of one `StudySummary`, so the numbers in
the executive summary are the numbers in `fit.json` by construction.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from scalelab import __version__
from scalelab.errors import ScalelabError
from scalelab.provenance import utc_now
from scalelab.registry import Registry
from scalelab.study.spend import spend_sentence
from scalelab.units import count

log = logging.getLogger(__name__)


@dataclass
class StudySummary:
    name: str
    description: str
    generated_at: str
    version: str
    runs: list[dict[str, Any]]
    loss_key: str = "eval_loss"
    headline: str = ""
    study_line: str = ""
    fit_line: str = "No fit yet: run `scalelab fit DIR` to fit the scaling law."
    warnings: list[str] = field(default_factory=list)
    fit_rows: list[tuple[str, str]] = field(default_factory=list)
    recommendation_rows: list[tuple[str, str]] = field(default_factory=list)
    backtest_rows: list[tuple[str, str]] = field(default_factory=list)
    provenance_rows: list[tuple[str, str]] = field(default_factory=list)
    hypotheses: list[str] = field(default_factory=list)
    predicted_vs_actual: list[dict[str, Any]] = field(default_factory=list)
    hypothesis_outcomes: list[tuple[str, str]] = field(default_factory=list)
    fit: dict[str, Any] | None = None
    n_key: str = "n_params"
    target_flops: float | None = None
    predict: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None
    optimal: Callable[[float], dict[str, Any]] | None = None
    isoflop_minima: list[tuple[float, float, float]] = field(default_factory=list)
    transfer: Any = None  # report.transfer.TransferView
    batch: Any = None  # transfer.batch.BatchRecommendation, from a measured noise scale
    anomalies: list[Any] = field(default_factory=list)  # report.anomalies.Anomaly
    recommended: Any = None  # report.decision.RecommendedRun
    actions: list[str] = field(default_factory=list)  # next steps, most blocking first

    @property
    def done_runs(self) -> list[dict[str, Any]]:
        """Finished runs of the study's design (the ones the law is fitted to)."""
        return [r for r in self.runs if r["status"] == "done" and r.get("role", "study") == "study"]

    @property
    def target_runs(self) -> list[dict[str, Any]]:
        """Finished runs added to check the prediction (`scalelab study add-run`)."""
        return [r for r in self.runs if r["status"] == "done" and r.get("role") == "target"]

    @property
    def failures(self) -> list[dict[str, Any]]:
        return [r for r in self.runs if r["status"] in ("failed", "diverged", "timeout")]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "generated_at": self.generated_at,
            "version": self.version,
            "headline": self.headline,
            "warnings": self.warnings,
            "next_actions": self.actions,
            "anomalies": [a.__dict__ for a in self.anomalies],
            "recommended_run": None
            if self.recommended is None
            else {"toml": self.recommended.toml, **dict(self.recommended.rows)},
            "recommendation": dict(self.recommendation_rows),
            "fit": dict(self.fit_rows),
            "backtest": dict(self.backtest_rows),
            "predicted_vs_actual": self.predicted_vs_actual,
            "hypotheses": dict(self.hypothesis_outcomes),
            "transfer": None
            if self.transfer is None
            else {
                "source": self.transfer.source,
                "recommended_lr": self.transfer.recommended_lr,
                "sentence": self.transfer.sentence,
                "slopes": dict(self.transfer.slope_rows),
            },
            "runs": {
                s: sum(1 for r in self.runs if r["status"] == s) for s in {r["status"] for r in self.runs}
            },
        }

    def flags(self) -> dict[str, list[str]]:
        """Run id → the anomaly labels the runs tables show."""
        out: dict[str, list[str]] = {}
        for a in self.anomalies:
            out.setdefault(a.run_id, []).append(a.flag)
        return out

    def markdown(self) -> str:
        lines = [f"# Scaling study: {self.name}", "", self.headline, ""]
        if self.actions:
            lines += ["## Next actions", ""] + [f"{i}. {a}" for i, a in enumerate(self.actions, 1)] + [""]
        if self.recommended is not None:
            lines += ["## Recommended run", "", "```toml", self.recommended.toml.rstrip(), "```", ""]
        lines += [f"> **Caveat:** {w}" for w in self.warnings]
        for title, rows in (
            ("Recommendation", self.recommendation_rows),
            ("Fit", self.fit_rows),
            ("Backtest", self.backtest_rows),
        ):
            if rows:
                lines += ["", f"## {title}", "", "| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
        lines += [
            "",
            "## Runs",
            "",
            "| run | status | N non-embedding | N total | D | eval loss | flags |",
            "|---|---|---|---|---|---|---|",
        ]
        flags = self.flags()
        for r in self.runs:
            lines.append(
                f"| {r['run_id']} | {r['status']} | {count(r.get('n_params'))} | {count(r.get('n_params_total'))} "
                f"| {count(r.get('tokens'))} | {_fmt(r.get('eval_loss'))} | {', '.join(flags.get(r['run_id'], []))} |"
            )
        return "\n".join(lines) + "\n"


def _fmt(x: Any, spec: str = ".4g") -> str:
    return "—" if x is None else format(float(x), spec)


def _interval(iv: Any, spec: str = ".4g") -> str:
    if not iv or len(iv) != 2 or iv[0] is None:
        return ""
    return f" [{format(float(iv[0]), spec)}, {format(float(iv[1]), spec)}]"


def _study_meta(study_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((study_dir / "study.json").read_text())
    except (OSError, ValueError):
        return {"name": study_dir.name}


def _provenance_rows(runs: list[dict[str, Any]]) -> list[tuple[str, str]]:
    provs = [json.loads(r["provenance_json"]) for r in runs if r.get("provenance_json")]
    if not provs:
        return [("provenance", "no finished run recorded provenance yet")]
    p = provs[-1]
    data = p.get("data", {})
    git = p.get("git", {})
    hw = p.get("hardware", {})
    pk = p.get("packages", {})
    fingerprints = sorted({(q.get("data") or {}).get("fingerprint") or "?" for q in provs})
    return [
        ("data fingerprint", ", ".join(fingerprints)),
        ("tokenizer", f"{data.get('tokenizer')} ({(data.get('tokenizer_hash') or '')[:16]})"),
        (
            "code",
            f"{(git.get('commit') or 'not a git checkout')[:12]}" + (" (dirty)" if git.get("dirty") else ""),
        ),
        (
            "python / torch / numpy",
            f"{p.get('environment', {}).get('python')} / {pk.get('torch')} / {pk.get('numpy')}",
        ),
        (
            "hardware",
            f"{hw.get('cpu')} × {hw.get('cpu_count')}"
            + (f"; GPUs: {', '.join(hw['gpus'])}" if hw.get("gpus") else ""),
        ),
        ("runs with provenance", str(len(provs))),
    ]


def summarize(
    study_dir: str | Path,
    transfer_dir: str | Path | None = None,
    noise_scale: str | Path | None = None,
    usd_per_hour: float | None = None,
) -> StudySummary:
    """Collect the report's content for a study directory (and an LR-sweep study for the transfer section:
    `transfer_dir`, or the study itself when it sweeps the learning rate; `noise_scale`: the JSON of
    `scalelab transfer noise-scale --json`, for the batch-size recommendation)."""
    study_dir = Path(study_dir)
    meta = _study_meta(study_dir)
    with Registry(study_dir / "registry.sqlite", create=False) as reg:
        runs = reg.runs()
    for r in runs:  # a study copied elsewhere: its run directories are where the copy put them
        here = study_dir / "runs" / r["run_id"]
        if r.get("run_dir") and not Path(r["run_dir"]).exists() and here.exists():
            r["run_dir"] = str(here)
    fit_spec = meta.get("fit", {})
    s = StudySummary(
        name=meta.get("name", study_dir.name),
        description=meta.get("description", ""),
        generated_at=utc_now(),
        version=__version__,
        runs=runs,
        loss_key="eval_loss" if fit_spec.get("loss", "eval") == "eval" else "final_train_loss",
        hypotheses=list(meta.get("hypotheses", [])),
    )
    counts = {
        st: sum(1 for r in runs if r["status"] == st)
        for st in ("done", "failed", "diverged", "timeout", "pending", "running")
    }
    total_seconds = sum(r.get("wall_seconds") or 0 for r in runs)
    s.study_line = (
        f"{len(runs)} runs: {counts['done']} done, {counts['failed']} failed, {counts['diverged']} "
        f"diverged, {counts['timeout']} timed out, {counts['pending'] + counts['running']} not finished; "
        f"{total_seconds / 60:.1f} minutes of training in total."
    )
    s.study_line += spend_sentence(runs, meta.get("forecast"))
    if counts["failed"] + counts["diverged"] + counts["timeout"]:
        s.warnings.append(
            f"{counts['failed'] + counts['diverged'] + counts['timeout']} run(s) did not finish; "
            "the fit uses finished runs only (see Failures)."
        )
    s.provenance_rows = _provenance_rows(runs)
    _add_fit(s, study_dir / "report" / "fit.json")
    from scalelab.report.hypotheses import evaluate

    s.hypothesis_outcomes = [(h, evaluate(h, s.fit)) for h in s.hypotheses]
    target = meta.get("target") or {}
    s.target_flops = target.get("compute_flops")
    s.isoflop_minima = _isoflop_minima(study_dir, s)
    from scalelab.report.transfer import is_lr_sweep, transfer_view

    sweep = Path(transfer_dir) if transfer_dir else (study_dir if is_lr_sweep(study_dir) else None)
    if sweep is not None:
        s.transfer = transfer_view(sweep, study_dir / "report")
        if s.transfer is not None:
            s.warnings += [f"transfer: {w}" for w in s.transfer.warnings]
    s.headline = _headline(s, target) + _pva_sentence(s)
    if s.transfer is not None and s.transfer.sentence:
        s.headline += " " + s.transfer.sentence
    if s.transfer is not None and s.transfer.recommended_lr is not None:
        s.recommendation_rows.append(
            ("learning rate (from the transfer sweep)", f"{s.transfer.recommended_lr:.3g}")
        )
    s.recommendation_rows += _batch_rows(s, meta, noise_scale)
    _add_decision(s, usd_per_hour)
    return s


def _add_decision(s: StudySummary, usd_per_hour: float | None) -> None:
    """Anomalies, the recommended run and the next actions (report.anomalies, report.decision)."""
    from scalelab.report.anomalies import find_anomalies
    from scalelab.report.decision import next_actions, recommend_run
    from scalelab.report.figures import read_metrics

    study_runs = [r for r in s.runs if r.get("role", "study") == "study"]
    s.anomalies = find_anomalies(
        study_runs,
        lambda r: read_metrics(r["run_dir"]) if r.get("run_dir") else [],
        s.predict,
        s.loss_key,
        s.n_key,
    )
    rec = (s.fit or {}).get("recommendation") or {}
    if s.batch is not None:
        lr, lr_source = s.batch.lr, "rescaled to the measured-noise batch from the tuned (batch, LR) pair"
    elif s.transfer is not None and s.transfer.recommended_lr:
        lr, lr_source = s.transfer.recommended_lr, "from the transfer sweep"
    else:
        lr, lr_source = None, "the study's learning rate (no transfer sweep given)"
    try:
        s.recommended = recommend_run(
            s.done_runs,
            rec,
            s.n_key,
            lr=lr,
            lr_source=lr_source,
            batch_sequences=None if s.batch is None else s.batch.batch_sequences,
            usd_per_hour=usd_per_hour,
        )
    except ScalelabError as err:
        s.warnings.append(f"no recommended run: {err}")
    s.actions = next_actions(s)


def _add_fit(s: StudySummary, fit_path: Path) -> None:
    from scalelab.report.fitview import FitView

    view = FitView.load(fit_path)
    if view is None:
        return
    s.fit = view.raw
    s.fit_line = view.describe()
    s.fit_rows = view.parameter_rows()
    s.recommendation_rows = view.recommendation_rows()
    s.backtest_rows = view.backtest_rows()
    bt = view.raw.get("backtest")
    if bt and bt.get("mean_abs_relative_error") is not None:
        inside = (
            ""
            if bt.get("coverage") is None
            else (
                f", {round(bt['coverage'] * bt['test_runs'])} of {bt['test_runs']} inside their prediction intervals"
            )
        )
        s.warnings.append(
            f"backtest: fitted without the {bt['test_runs']} largest-compute runs, the law missed them by "
            f"{100 * bt['mean_abs_relative_error']:.1f} % on average (max {100 * bt['max_abs_relative_error']:.1f} %)"
            f"{inside}, extrapolating {bt['extrapolation_factor']:.3g}×; expect misses of this size at the "
            "target, or narrow them with runs nearer to it (`scalelab study advise STUDY_DIR`)"
        )
    s.warnings += view.warnings()
    s.predict = view.predictor()
    s.optimal = view.optimizer()
    s.n_key = view.n_params_key
    s.predicted_vs_actual = view.predicted_vs_actual(s.target_runs, s.loss_key)
    for row in s.predicted_vs_actual:
        if row.get("inside") is False:
            s.warnings.append(
                f"the big run {row['run_id']} reached loss {row['actual']:.4g}, OUTSIDE the predicted interval "
                f"[{row['interval'][0]:.4g}, {row['interval'][1]:.4g}]: the law did not transfer to its scale; "
                "refit with this run included (`scalelab fit STUDY_DIR`) before sizing anything larger"
            )


def _headline(s: StudySummary, target: dict[str, Any]) -> str:
    done = len(s.done_runs)
    if s.fit is None:
        return (
            f"{done} of {len(s.runs)} runs finished. No scaling law fitted yet, so no recommendation: "
            "run `scalelab fit` on this directory, then `scalelab report` again."
        )
    rec = dict(s.recommendation_rows)
    if "compute budget" in rec:
        n_label, n_opt = next(((k, v) for k, v in rec.items() if k.startswith("N_opt")), ("N_opt", "?"))
        core = (
            f"for a budget of {rec['compute budget']}, train N ≈ {n_opt} {n_label.removeprefix('N_opt (').removesuffix(')')} "
            f"on D ≈ {rec.get('D_opt (tokens)', '?')} tokens; predicted loss "
            f"{rec.get('predicted loss', '?')}"
            + (f"; {rec['verdict']}" if rec.get("verdict") else "")
            + f". Based on {done} finished runs."
        )
        if s.warnings:
            return (
                f"LOW CONFIDENCE — the fit raised {len(s.warnings)} warning(s), listed below; read this as "
                f"a rough estimate, not a recommendation to commit budget to: {core}"
            )
        return core[0].upper() + core[1:] + " The fit raised no warnings."
    return f"Fitted on {done} finished runs. " + s.fit_line


def _batch_rows(
    s: StudySummary, meta: dict[str, Any], noise_scale: str | Path | None
) -> list[tuple[str, str]]:
    """Batch size and LR for the recommended run, from a measured gradient noise scale (McCandlish et al.):
    batch ≈ B_noise, capped to keep enough steps; the LR rescaled from the tuned (batch, LR) pair."""
    if noise_scale is None:
        return [
            (
                "batch size",
                "no gradient-noise measurement given: keep the study's global batch, or measure "
                "with `scalelab transfer noise-scale CONFIG --json > noise.json` and pass "
                "`--noise-scale noise.json`",
            )
        ]
    from scalelab.transfer.batch import recommend_batch

    try:
        b_noise = float(json.loads(Path(noise_scale).read_text())["b_noise_tokens"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ScalelabError(
            f"{noise_scale}: not the JSON of `scalelab transfer noise-scale --json` ({err})"
        ) from None
    rec_d = (s.fit or {}).get("recommendation") or {}
    train, model = meta.get("train", {}), meta.get("model", {})
    if not rec_d.get("D_opt"):
        return [
            (
                "batch size",
                f"critical batch ≈ B_noise = {b_noise:.4g} tokens (no recommended D to size the run)",
            )
        ]
    lr = (
        s.transfer.recommended_lr
        if s.transfer is not None and s.transfer.recommended_lr
        else train.get("lr", 3e-3)
    )
    rec = s.batch = recommend_batch(
        b_noise,
        target_tokens=int(rec_d["D_opt"]),
        context_tokens=int(model.get("context_tokens", 128)),
        tuned_lr=float(lr),
        tuned_batch_sequences=int(train.get("global_batch_size", 16)),
    )
    return [
        (
            "batch size",
            f"{rec.batch_sequences} sequences ({rec.batch_tokens} tokens), {rec.steps} steps; "
            + "; ".join(rec.reasons),
        ),
        (
            "learning rate at that batch",
            f"{rec.lr:.3g} ({rec.lr_scaling.rule}; "
            f"{'trusted' if rec.lr_scaling.trusted else 'NOT trusted'}: {rec.lr_scaling.note})",
        ),
    ]


def _isoflop_minima(study_dir: Path, s: StudySummary) -> list[tuple[float, float, float]]:
    """Per-budget minima (C, N*, L*) from the IsoFLOP estimator, for studies with an IsoFLOP design."""
    if not any((r.get("point") or {}).get("budget_flops") for r in s.done_runs):
        return []
    from scalelab.errors import FitError
    from scalelab.fit.api import table_from_study
    from scalelab.fit.isoflop import IsoFLOPLaw

    try:
        n_params = "total" if s.n_key == "n_params_total" else "non_embedding"
        loss = "eval" if s.loss_key == "eval_loss" else "train"
        law = IsoFLOPLaw(n_bootstrap=0).fit(table_from_study(study_dir, n_params=n_params, loss=loss))
    except FitError as err:
        s.warnings.append(f"IsoFLOP analysis not possible: {err}")
        return []
    s.warnings += [f"IsoFLOP: {w}" for w in law.warnings_]
    return [(float(np.exp(lc)), float(np.exp(xs)), float(ls)) for lc, xs, _ld, ls in law.minima_]


def _pva_sentence(s: StudySummary) -> str:
    rows = [r for r in s.predicted_vs_actual if r.get("inside") is not None]
    if not rows:
        return ""
    inside = sum(r["inside"] for r in rows)
    return (
        f" Predicted versus actual: {inside} of {len(rows)} big run(s) fell inside the predicted interval"
        + (" — the prediction held." if inside == len(rows) else " — see the section below.")
    )
