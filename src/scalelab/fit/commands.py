"""`scalelab fit` and `scalelab recommend`: thin wrappers over `scalelab.fit.api`, rendered with rich."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from scalelab.errors import FitError

LAWS = ("chinchilla", "kaplan", "power", "power:C", "power:N", "power:D", "isoflop")


def _fmt(v: Any, spec: str = ".4g") -> str:
    if v is None:
        return "—"
    if isinstance(v, str):
        return v
    try:
        return format(float(v), spec)
    except (TypeError, ValueError):
        return str(v)


def _iv(iv: Any, spec: str = ".4g") -> str:
    if not iv:
        return ""
    return f"  [{_fmt(iv[0], spec)}, {_fmt(iv[1], spec)}]"


def render_fit(d: dict[str, Any], console: Console) -> None:
    """Tables for a fit.json dict: parameters, derived quantities, comparison, backtest, warnings."""
    f = d["fit"]
    conf = int(100 * d["settings"].get("confidence", 0.9))
    t = Table(title=f"{f['law']}: {f['form']}  ({d['data']['n_runs']} runs, {conf} % intervals)")
    t.add_column("parameter")
    t.add_column("estimate", justify="right")
    t.add_column(f"{conf} % interval", justify="right")
    for k, v in f["params"].items():
        t.add_row(k, _fmt(v), _iv(f["intervals"].get(k)).strip())
    for k, v in f.get("derived", {}).items():
        t.add_row(k, _fmt(v), _iv(f.get("derived_intervals", {}).get(k)).strip(), style="cyan")
    console.print(t)
    conv = f.get("convergence", {})
    boot = f.get("bootstrap", {})
    cal = f.get("calibration")
    if cal:
        console.print(calibration_line(cal), highlight=False)
    for line in prior_lines(f):
        console.print(line, highlight=False)
    console.print(
        f"objective {_fmt(conv.get('objective'))}, converged: {conv.get('converged')}; bootstrap "
        f"{boot.get('n', 0)} resamples by {boot.get('unit') or 'run'} "
        f"(converged {_fmt(boot.get('converged_fraction'), '.0%')}); C: {f.get('accounting', {}).get('formula', '')}"
    )
    if d.get("comparison"):
        c = Table(title="law comparison (Gaussian log-residual likelihood)")
        for col in ("law", "params", "AIC", "ΔAIC", "BIC", "ΔBIC"):
            c.add_column(col, justify="right" if col != "law" else "left")
        for row in d["comparison"]:
            if "aic" not in row:
                c.add_row(row["law"], "—", row.get("error", "")[:40], "", "", "")
                continue
            c.add_row(
                row["law"],
                str(row["n_params"]),
                _fmt(row["aic"], ".1f"),
                _fmt(row["delta_aic"], ".1f"),
                _fmt(row["bic"], ".1f"),
                _fmt(row["delta_bic"], ".1f"),
            )
        console.print(c)
    bt = d.get("backtest")
    if bt:
        b = Table(title=f"backtest: fit {bt['train_runs']} runs, predict the {bt['test_runs']} largest")
        for col in ("N", "D", "C", "loss", "predicted", "rel. error", "interval", "inside"):
            b.add_column(col, justify="right")
        for r in bt["rows"]:
            b.add_row(
                _fmt(r["N"], ".3g"),
                _fmt(r["D"], ".3g"),
                _fmt(r["C"], ".3g"),
                _fmt(r["loss"]),
                _fmt(r["predicted"]),
                _fmt(r["relative_error"], "+.2%"),
                _iv(r.get("interval")).strip(),
                "" if r.get("inside") is None else ("yes" if r["inside"] else "NO"),
            )
        console.print(b)
    if d.get("recommendation"):
        render_recommendation(d["recommendation"], console, d.get("settings", {}).get("n_params"))
    grp = d.get("groups")
    if grp and "shared" in grp:
        console.print(
            f"groups {', '.join(grp['shared']['groups'])}: shared vs separate exponents — "
            f"ΔAIC(separate − shared) {_fmt(grp['delta_aic_separate_minus_shared'], '.1f')}, "
            f"ΔBIC {_fmt(grp['delta_bic_separate_minus_shared'], '.1f')}; preferred: "
            f"{grp['preferred_by_aic']} (AIC), {grp['preferred_by_bic']} (BIC)"
        )
        for g, iv in (grp["separate"].get("intervals") or {}).items():
            p = grp["separate"]["params"][g]
            console.print(
                f"  {g}: alpha {_fmt(p['alpha'], '.3f')}{_iv(iv.get('alpha'), '.3f')}, "
                f"beta {_fmt(p['beta'], '.3f')}{_iv(iv.get('beta'), '.3f')}"
            )
        if grp.get("verdict"):
            console.print(escape(grp["verdict"]), highlight=False)
    for w in d.get("warnings", []):
        console.print(f"[yellow]warning:[/] {escape(w)}", highlight=False)


def calibration_line(cal: dict[str, Any]) -> str:
    """One line on where the interval's model-form error comes from."""
    from scalelab.fit.calibrate import source_text

    prefix = "intervals: " if cal.get("method") == "fallback" else "intervals calibrated by "
    return prefix + source_text(cal)


def prior_lines(f: dict[str, Any]) -> list[str]:
    """What the prior said, what the posterior says, and how much the data moved it."""
    pvp = f.get("prior_vs_posterior")
    if not pvp:
        return []
    out = [f"MAP fit under the prior {f.get('prior', {}).get('source', '?')} (Laplace posterior):"]
    for k, r in pvp.items():
        out.append(
            f"  {k}: prior {r['prior_mean']:.4g} ± {r['prior_sd']:.3g} → posterior {r['posterior_mean']:.4g} "
            f"± {r['posterior_sd']:.3g} (width {r['width_ratio']:.2f}x the prior's; moved "
            f"{r['shift_in_prior_sds']:+.2f} prior sd)"
        )
    return out


def n_label(n_params: str | None) -> str:
    """What a fit's N counts, for a table row: a study's non-embedding or total parameters, or the
    N column of a table as given."""
    if n_params == "total":
        return "total params"
    if n_params == "non_embedding":
        return "non-embedding params"
    return "params, the table's N"


def render_recommendation(rec: dict[str, Any], console: Console, n_params: str | None = None) -> None:
    """The recommendation as a table; `n_params` is the fit's N setting when `rec` does not carry it."""
    iv = rec.get("intervals", {})
    conf = int(round(100 * rec.get("confidence", 0.9)))
    t = Table(title=f"recommendation ({conf} % intervals)")
    t.add_column("quantity")
    t.add_column("value", justify="right")
    t.add_column("interval", justify="right")
    if "N_opt" in rec:
        t.add_row("compute (FLOPs)", _fmt(rec["compute_flops"], ".3g"), "")
        t.add_row(
            f"N_opt ({n_label(rec.get('n_params', n_params))})",
            _fmt(rec["N_opt"], ".3g"),
            _iv(iv.get("N_opt"), ".3g").strip(),
        )
        t.add_row("D_opt (tokens)", _fmt(rec["D_opt"], ".3g"), _iv(iv.get("D_opt"), ".3g").strip())
        t.add_row(
            "tokens per parameter",
            _fmt(rec["tokens_per_param"], ".3g"),
            _iv(iv.get("tokens_per_param"), ".3g").strip(),
        )
        calibrated = "calibrated" in (rec.get("interval_kinds") or {}).get("loss", "")
        t.add_row(
            "predicted loss" + (" (calibrated interval)" if calibrated else ""),
            _fmt(rec["loss"]),
            _iv(iv.get("loss")).strip(),
        )
        if iv.get("loss_parameter_only"):
            t.add_row(
                "  parameter-only interval (no model-form error)", "", _iv(iv["loss_parameter_only"]).strip()
            )
    else:
        t.add_row("target loss", _fmt(rec["target_loss"]), "")
        t.add_row(
            "compute needed (FLOPs)",
            _fmt(rec["compute_flops"], ".3g"),
            _iv(iv.get("compute_flops"), ".3g").strip(),
        )
        if iv.get("compute_flops_parameter_only"):
            t.add_row(
                "  parameter-only interval (no model-form error)",
                "",
                _iv(iv["compute_flops_parameter_only"], ".3g").strip(),
            )
        for k, v in (rec.get("at_optimum") or {}).items():
            t.add_row(f"  {k}", _fmt(v, ".3g"), "")
    console.print(t)
    if rec.get("accounting"):
        console.print(f"FLOP accounting: {rec['accounting']}")
    kinds = rec.get("interval_kinds") or {}
    if kinds.get("N_opt"):
        console.print(f"N_opt, D_opt intervals: {kinds['N_opt']}", highlight=False)
    cal = rec.get("calibration")
    if cal and cal.get("verdict"):
        console.print(f"loss interval: {cal['verdict']}", highlight=False)
    for w in rec.get("warnings", []):
        console.print(f"[yellow]warning:[/] {escape(w)}", highlight=False)


def register(app: typer.Typer) -> None:
    """Add the top-level `fit` and `recommend` commands to the scalelab app."""

    @app.command("fit")
    def fit_cmd(
        source: Annotated[
            Path, typer.Argument(help="Study directory or a CSV/Parquet/JSONL table (N, D, loss).")
        ],
        law: Annotated[str, typer.Option("--law", help="chinchilla | kaplan | power[:C|N|D] | isoflop")] = "",
        bootstrap: Annotated[
            int | None, typer.Option("--bootstrap", help="Bootstrap resamples (default 1000).")
        ] = None,
        holdout: Annotated[str | None, typer.Option("--holdout", help="Backtest: largest:K.")] = None,
        prior: Annotated[
            str | None,
            typer.Option(
                "--prior",
                help="Fit by MAP under a prior: published:chinchilla (Hoffmann et al. 2022), "
                "published:epoch (Besiroglu et al. 2024), or an earlier fit.json. Default: [study.fit] prior.",
            ),
        ] = None,
        seed: Annotated[int | None, typer.Option("--seed", help="Bootstrap seed.")] = None,
        jobs: Annotated[
            int | None, typer.Option("--jobs", help="Worker processes for the bootstrap.")
        ] = None,
        out: Annotated[Path | None, typer.Option("--out", help="Where to write fit.json.")] = None,
        json_: Annotated[
            bool, typer.Option("--json", help="Print fit.json to stdout instead of tables.")
        ] = False,
    ) -> None:
        """Fit a scaling law with bootstrap intervals; writes fit.json (DIR/report/fit.json for a study)."""
        from scalelab.fit.api import default_output, fit_source

        if law and law not in LAWS:
            raise FitError(f"--law {law!r}: use one of {', '.join(LAWS)}")
        if bootstrap is not None and bootstrap < 0:
            raise FitError(f"--bootstrap must be >= 0, got {bootstrap}")
        if bootstrap is None and not source.is_dir():
            bootstrap = 1000
        from scalelab.fit.api import check_output_path
        from scalelab.fit.progress import reporting

        if out is not None:
            check_output_path(out)  # before the fit's seconds, not after them
        console = Console()
        err = Console(stderr=True)
        # --json: a machine reads the output, so no progress at all; else a bar on a terminal, lines otherwise
        view = None if json_ else FitProgressView(err, live=err.is_terminal and console.is_terminal)
        with view or contextlib.nullcontext(), reporting(view):
            rep = fit_source(
                source,
                law=law or None,
                bootstrap=bootstrap,
                holdout=holdout,
                seed=seed,
                n_jobs=jobs,
                prior=prior,
            )
        path = rep.save(out or default_output(source))
        d = rep.to_dict()
        if json_:
            typer.echo(json.dumps(d, indent=2))
            return
        render_fit(d, console)
        console.print(f"fit: {path}")

    @app.command("recommend")
    def recommend_cmd(
        fit_json: Annotated[Path, typer.Argument(help="fit.json written by `scalelab fit`.")],
        compute: Annotated[
            float | None, typer.Option("--compute", help="Compute budget in FLOPs, e.g. 1e21.")
        ] = None,
        target_loss: Annotated[
            float | None, typer.Option("--target-loss", help="Target loss, e.g. 2.1.")
        ] = None,
        json_: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    ) -> None:
        """Compute-optimal N and D (with intervals) for a budget, or the compute needed for a target loss."""
        from scalelab.fit.api import recommend

        rec = recommend(fit_json, compute=compute, target_loss=target_loss)
        if json_:
            typer.echo(json.dumps(rec, indent=2))
            return
        render_recommendation(rec, Console())


class FitProgressView:
    """A fit's progress on stderr: a rich bar on a terminal (the stage, refits done of total); otherwise a
    plain line when a stage begins, at most one every `interval_seconds`, and when it completes, so a
    logged `scalelab fit` is never silent for the seconds a bootstrap takes."""

    def __init__(
        self,
        console: Console,
        *,
        live: bool = True,
        interval_seconds: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn

        self.console = console
        self.interval_seconds = interval_seconds
        self.clock = clock
        self._last: tuple[str, float] | None = None
        self.progress = (
            Progress(
                SpinnerColumn(),
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                console=console,
                transient=True,
            )
            if live
            else None
        )
        self.task = self.progress.add_task("fitting", total=None) if self.progress is not None else None

    def __enter__(self) -> FitProgressView:
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.stop()

    def __call__(self, p: Any) -> None:  # fit.progress.FitProgress
        if self.progress is not None:
            self.progress.update(
                self.task, description=p.stage, completed=p.done, total=p.total if p.total else None
            )
            return
        now = self.clock()
        new_stage = self._last is None or self._last[0] != p.stage
        finished = bool(p.total) and p.done >= p.total
        if new_stage or finished or now - self._last[1] >= self.interval_seconds:  # type: ignore[index]
            self._last = (p.stage, now)
            done = f" {p.done}/{p.total}" if p.total else ""
            self.console.print(f"fit: {p.stage}{done}", markup=False, highlight=False, soft_wrap=True)
