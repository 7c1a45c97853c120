"""The study report: one self-contained HTML file (figures embedded, no scripts, no network) + summary.md.

Reads only artifacts on disk — the registry, the run directories and `report/fit.json` — so a report can
be rebuilt anywhere the study directory is copied.
"""

from __future__ import annotations

import base64
import html
import json
import logging
from pathlib import Path
from typing import Any

from scalelab.errors import ScalelabError
from scalelab.io import atomic_write_bytes, atomic_write_text
from scalelab.report import figures
from scalelab.report.design import design_sections
from scalelab.report.lag import lag_sections
from scalelab.report.summary import StudySummary, summarize
from scalelab.units import count, duration, flops

log = logging.getLogger(__name__)

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:980px;margin:2em auto;padding:0 1em;
color:#1d1d1f;line-height:1.45}
h1{font-size:1.7em;margin-bottom:.2em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.8em}
.summary{background:#f4f7fb;border-left:4px solid #3867d6;padding:.8em 1.2em;margin:1em 0}
.warn{background:#fff6e5;border-left:4px solid #e0a100;padding:.6em 1.2em;margin:.6em 0}
table{border-collapse:collapse;width:100%;font-size:.88em;margin:.6em 0}
th,td{border-bottom:1px solid #e5e5e5;padding:.3em .5em;text-align:right}
th:first-child,td:first-child{text-align:left}td.l,th.l{text-align:left}
.done{color:#1e8e3e}.failed,.timeout{color:#c5221f}.diverged{color:#a142f4}
figure{margin:1em 0}figure img{max-width:100%;border:1px solid #eee}figcaption{font-size:.85em;color:#555}
code,pre{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.85em}pre{white-space:pre-wrap;
background:#f6f6f6;padding:.6em}nav ol{columns:2}.muted{color:#666;font-size:.9em}
.decision h3{margin:1.1em 0 .3em}ol.actions li{margin:.3em 0}a.download{display:inline-block;margin:.3em 0;
padding:.3em .8em;border:1px solid #3867d6;border-radius:4px;color:#3867d6;text-decoration:none}
.flag{color:#c5221f;font-weight:600}pre.toml{max-height:22em;overflow:auto;border:1px solid #e5e5e5}
@media print{nav{display:none}body{max-width:none}pre.toml{max-height:none}}
"""


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _num(x: Any, spec: str = ".4g") -> str:
    return "—" if x is None else format(float(x), spec)


def _figure(png: bytes | None, fig_id: str, caption: str, out_dir: Path) -> str:
    if png is None:
        return f'<figure id="{fig_id}"><figcaption>{_e(caption)} — no data yet.</figcaption></figure>'
    atomic_write_bytes(out_dir / f"{fig_id}.png", png)
    data = base64.b64encode(png).decode()
    return (
        f'<figure id="{fig_id}"><img alt="{_e(caption)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{_e(caption)}</figcaption></figure>"
    )


def _runs_table(runs: list[dict[str, Any]], flags: dict[str, list[str]]) -> str:
    head = (
        "<tr><th>run id</th><th class=l>status</th><th>N non-embedding</th><th>N total</th><th>D (tokens)</th>"
        "<th>C (FLOPs)</th><th>eval loss</th><th>train loss</th><th>wall</th><th>forecast</th>"
        "<th class=l>flags</th></tr>"
    )
    body = []
    for r in runs:
        body.append(
            f"<tr><td><code>{_e(r['run_id'])}</code></td><td class='l {_e(r['status'])}'>{_e(r['status'])}"
            f"{' (target)' if r.get('role') == 'target' else ''}</td>"
            f"<td>{count(r.get('n_params'))}</td><td>{count(r.get('n_params_total'))}</td>"
            f"<td>{count(r.get('tokens'))}</td><td>{flops(r.get('flops')).removesuffix(' FLOPs')}</td>"
            f"<td>{_num(r.get('eval_loss'), '.4f')}</td><td>{_num(r.get('final_train_loss'), '.4f')}</td>"
            f"<td>{duration(r.get('wall_seconds'))}</td><td>{duration(r.get('forecast_seconds'))}</td>"
            f"<td class='l flag'>{_e(', '.join(flags.get(r['run_id'], [])))}</td></tr>"
        )
    return f"<table>{head}{''.join(body)}</table>"


def _decision(s: StudySummary, out_dir: Path) -> str:
    """The executive summary: the headline, the recommended run (shown and downloadable), the next actions,
    loss against compute out to the target, and the caveats."""
    parts = [f"<div class=summary><p>{_e(s.headline)}</p></div>"]
    if s.recommended is not None:
        data = base64.b64encode(s.recommended.toml.encode()).decode()
        parts.append(
            "<h3>Recommended run</h3>"
            + _kv_table(s.recommended.rows)
            + f'<a class=download download="recommended_run.toml" href="data:application/toml;base64,{data}">'
            "Download recommended_run.toml</a> <span class=muted>(also written beside this page as "
            "<code>report/recommended_run.toml</code>; its text is below the next actions)</span>"
        )
    if s.actions:
        parts.append(
            "<h3>Next actions</h3><ol class=actions>"
            + "".join(f"<li>{_e(a)}</li>" for a in s.actions)
            + "</ol>"
        )
    parts.append(
        _figure(
            figures.loss_vs_compute(
                s.done_runs, s.optimal, s.loss_key, s.n_key, s.target_flops, s.target_runs
            ),
            "loss-vs-compute",
            "Final loss of each run against its compute, the fitted compute-optimal loss with its interval, "
            "and the target budget's predicted loss with its interval (diamond).",
            out_dir,
        )
    )
    if s.recommended is not None:
        parts.append(
            "<h3>recommended_run.toml</h3><p class=muted>Ready for <code>scalelab train "
            "report/recommended_run.toml --out runs/big</code>; machine settings (device, precision, "
            "threads, strategy) go under <code>[execution]</code>.</p>"
            f"<pre class=toml>{_e(s.recommended.toml)}</pre>"
        )
    if s.warnings:
        parts.append("<h3>Caveats</h3>" + "".join(f"<div class=warn>{_e(w)}</div>" for w in s.warnings))
    return "<div class=decision>" + "".join(parts) + "</div>"


def _pva_table(rows: list[dict[str, Any]]) -> str:
    head = (
        "<tr><th>run id</th><th>N</th><th>D</th><th>actual loss</th><th>predicted</th>"
        "<th>prediction interval</th><th>error</th><th class=l>verdict</th></tr>"
    )
    body = []
    for r in rows:
        iv = r.get("interval")
        verdict = "no interval" if r.get("inside") is None else ("inside" if r["inside"] else "OUTSIDE")
        cls = "done" if r.get("inside") else "failed"
        body.append(
            f"<tr><td><code>{_e(r['run_id'])}</code></td><td>{_num(r['N'], '.3g')}</td><td>{_num(r['D'], '.3g')}</td>"
            f"<td>{_num(r['actual'])}</td><td>{_num(r['predicted'])}</td>"
            f"<td>{'—' if not iv else f'[{_num(iv[0])}, {_num(iv[1])}]'}</td>"
            f"<td>{100 * r['relative_error']:+.2f} %</td><td class='l {cls}'>{verdict}</td></tr>"
        )
    return (
        f"<p>Runs added with <code>scalelab study add-run</code> (not fitted) against the fit's single-run "
        f"prediction interval.</p><table>{head}{''.join(body)}</table>"
    )


def _kv_table(rows: list[tuple[str, Any]]) -> str:
    return (
        "<table>"
        + "".join(f"<tr><td class=l>{_e(k)}</td><td class=l>{_e(v)}</td></tr>" for k, v in rows)
        + "</table>"
    )


def render_html(s: StudySummary, out_dir: Path) -> str:
    """The whole report as an HTML string (figures written beside it as PNG and embedded)."""
    sections: list[tuple[str, str, str]] = []  # (id, title, body)
    sections.append(("summary", "Executive summary: the decision", _decision(s, out_dir)))
    if s.recommendation_rows:
        sections.append(("recommendation", "Recommendation", _kv_table(s.recommendation_rows)))
    anomalies = "".join(f"<div class=warn>{_e(a.detail)}: {_e(a.action)}.</div>" for a in s.anomalies)
    sections.append(
        ("runs", "The study", f"<p>{_e(s.study_line)}</p>{_runs_table(s.runs, s.flags())}{anomalies}")
    )
    sections.append(
        (
            "loss-curves",
            "Loss curves",
            _figure(
                figures.loss_curves(
                    s.done_runs,
                    {
                        a.run_id: [(a.tokens, a.loss)]
                        for a in s.anomalies
                        if a.kind == "spike" and a.tokens is not None
                    },
                ),
                "loss-curves",
                "Training loss per run against tokens seen (log scale); dots are held-out evals, red "
                "crosses loss spikes.",
                out_dir,
            ),
        )
    )
    sections.append(
        (
            "fit",
            "Scaling-law fit",
            (f"<p>{_e(s.fit_line)}</p>" + (_kv_table(s.fit_rows) if s.fit_rows else ""))
            + _figure(
                figures.fit_vs_data(s.done_runs, s.predict, s.loss_key, s.n_key),
                "fit",
                "Final loss of each run against N, one colour per token budget D, with the "
                "fitted law's curves.",
                out_dir,
            )
            + _figure(
                figures.frontier(s.done_runs, s.optimal, s.n_key, s.target_flops),
                "frontier",
                "Compute-optimal N for each compute budget, with its bootstrap interval; dots are the runs, "
                "the dashed line the study's target.",
                out_dir,
            ),
        )
    )
    if any((r.get("point") or {}).get("budget_flops") for r in s.done_runs):
        isoflop_png = figures.isoflop_curves(s.done_runs, s.loss_key, s.n_key, s.isoflop_minima)
        caption = (
            "Loss against N at fixed compute, a parabola in log N per budget; stars mark each "
            "budget's fitted minimum."
        )
        sections.append(("isoflop", "IsoFLOP curves", _figure(isoflop_png, "isoflop", caption, out_dir)))
    residuals_png = figures.residuals(s.done_runs, s.predict, s.loss_key, s.n_key)
    caption = "Log residuals of every run against N, D and C; a trend means the law's form misfits."
    sections.append(
        ("residuals", "Residual diagnostics", _figure(residuals_png, "residuals", caption, out_dir))
    )
    if s.transfer is not None:
        t = s.transfer
        body = (
            f"<p>LR sweep: <code>{_e(t.source)}</code>. {_e(t.sentence)}</p>"
            + _kv_table(t.slope_rows)
            + _kv_table(t.optimum_rows)
        )
        caption = "Loss against learning rate per size (optimum marked), and the optimum LR against width."
        sections.append(
            ("transfer", "Hyperparameter transfer", body + _figure(t.png, "transfer", caption, out_dir))
        )
    if s.predicted_vs_actual:
        sections.append(("predicted-vs-actual", "Predicted versus actual", _pva_table(s.predicted_vs_actual)))
    if s.backtest_rows:
        sections.append(("backtest", "Held-out backtest", _kv_table(s.backtest_rows)))
    if s.hypothesis_outcomes:
        sections.append(
            (
                "hypotheses",
                "Pre-registered hypotheses",
                "<p>Frozen in <code>preregistration.json</code> when the study started; each checked "
                "against the fit's intervals.</p>" + _kv_table(s.hypothesis_outcomes),
            )
        )
    sections.extend(lag_sections(s.runs))
    sections += design_sections(s, out_dir, lambda png, i, c: _figure(png, i, c, out_dir), _kv_table)
    sections.append(("provenance", "Data and provenance", _kv_table(s.provenance_rows)))
    if s.failures:
        fail = "".join(
            f"<h3><code>{_e(r['run_id'])}</code>: {_e(r['status'])}</h3><pre>{_e(r.get('error') or '')}</pre>"
            for r in s.failures
        )
        sections.append(("failures", "Failures", fail))

    toc = "".join(f'<li><a href="#{sid}">{_e(title)}</a></li>' for sid, title, _ in sections)
    body = "".join(
        f'<section id="sec-{sid}"><h2 id="{sid}">{_e(title)}</h2>{content}</section>'
        for sid, title, content in sections
    )
    return (
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
        "<meta name=viewport content='width=device-width,initial-scale=1'>"
        f"<title>scalelab report: {_e(s.name)}</title><style>{CSS}</style></head><body>"
        f"<h1>Scaling study: {_e(s.name)}</h1><p class=muted>{_e(s.description)} Generated {_e(s.generated_at)} "
        f"by scalelab {_e(s.version)}.</p><nav><h2>Contents</h2><ol>{toc}</ol></nav>{body}</body></html>"
    )


def build_report(
    study_dir: str | Path,
    transfer_dir: str | Path | None = None,
    noise_scale: str | Path | None = None,
    usd_per_hour: float | None = None,
) -> Path:
    """Write `report/index.html` and `report/summary.md` for the study in `study_dir`; return the HTML path.

    `transfer_dir`: an LR-sweep study whose transfer analysis the report includes (default: the study
    itself when its design sweeps `train.lr`); `noise_scale`: `scalelab transfer noise-scale --json` output,
    for the batch-size recommendation; `usd_per_hour`: the price of the study's hardware, for the recommended
    run's forecast cost. Also writes `report/recommended_run.toml` when the fit recommends a run."""
    study_dir = Path(study_dir)
    if not (study_dir / "registry.sqlite").exists():
        raise ScalelabError(
            f"{study_dir}: not a study directory (no registry.sqlite); run `scalelab study run` first"
        )
    out_dir = study_dir / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize(study_dir, transfer_dir, noise_scale, usd_per_hour)
    page = render_html(summary, out_dir)
    atomic_write_text(out_dir / "index.html", page)
    atomic_write_text(out_dir / "summary.md", summary.markdown())
    if summary.recommended is not None:
        atomic_write_text(out_dir / "recommended_run.toml", summary.recommended.toml)
    else:  # no stale recommendation from an earlier fit
        (out_dir / "recommended_run.toml").unlink(missing_ok=True)
    atomic_write_text(
        out_dir / "summary.json", json.dumps(summary.to_dict(), indent=2, sort_keys=True, default=str)
    )
    return out_dir / "index.html"
