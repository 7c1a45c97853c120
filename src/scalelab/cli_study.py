"""Tables of a study's runs for `study watch` and `study status`, laid out to fit an 80-column terminal:
each run named by id, width, N (non-embedding parameters) and D (tokens); failures listed under the table.
Also the `study advise` command and its view."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Group
from rich.table import Table
from rich.text import Text

from scalelab.units import binary_bytes, duration, si

if TYPE_CHECKING:
    from scalelab.study.watch import RunProgress

COLORS = {"done": "green", "failed": "red", "diverged": "magenta", "timeout": "yellow", "running": "cyan"}


def _num(x: Any, spec: str = ".4g") -> str:
    return "—" if x is None else format(float(x), spec)


def _flops(x: float | None) -> str:
    """6.02e23 → '6.0e23' (FLOPs span too many orders of magnitude for k/M/G)."""
    if x is None:
        return "—"
    mantissa, exponent = f"{float(x):.1e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def _table(title: str, columns: Sequence[str], left: Sequence[str] = ("run id", "status")) -> Table:
    table = Table(
        title=title,
        box=None,
        padding=(0, 0, 0, 1),
        pad_edge=False,
        title_justify="left",
        header_style="bold underline",
    )
    for col in columns:
        table.add_column(col, justify="left" if col in left else "right", no_wrap=True)
    return table


def _status(status: str) -> str:
    return f"[{COLORS.get(status, 'white')}]{status}[/]"


def _failures(rows: Sequence[tuple[str, str | None]]) -> Text | None:
    failed = [(run_id, error) for run_id, error in rows if error]
    if not failed:
        return None
    text = Text("failures:\n", style="bold")
    for run_id, error in failed:
        text.append(f"  {run_id}: {error.splitlines()[0][:300]}\n")
    return text


def study_title(study: str, counts: dict[str, int], eta_seconds: float | None) -> str:
    """'runs/x: 3 done, 1 running · study ETA 4m10s'."""
    title = f"{study}: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    return title + ("" if eta_seconds is None else f" · study ETA {duration(eta_seconds)}")


def watch_view(title: str, rows: Sequence[RunProgress]) -> Group:
    """`study watch`: per run its shape, progress through D, losses, throughput and ETA."""
    spread = any(r.grad_norm_spread is not None for r in rows)
    cols = ["run id", "status", "width", "N", "D", "done", "loss", "eval", "tok/s", "ETA"]
    table = _table(title, cols + (["spread"] if spread else []))
    for r in rows:
        done = None if r.tokens is None or not r.tokens_planned else r.tokens / r.tokens_planned
        cells = [
            r.run_id,
            _status(r.status),
            _num(r.width, ".0f"),
            si(r.n_params),
            si(r.tokens_planned),
            "—" if done is None else f"{done:.0%}",
            _num(r.loss),
            _num(r.eval_loss),
            si(r.tokens_per_second),
            "—" if r.eta_seconds is None else duration(r.eta_seconds),
        ]
        table.add_row(*cells, *([_num(r.grad_norm_spread, ".2f")] if spread else []))
    failures = _failures([(r.run_id, r.error) for r in rows if r.status != "done"])
    return Group(table, *([failures] if failures else []))


def status_view(title: str, rows: Sequence[dict[str, Any]]) -> Group:
    """`study status`: per run its shape, FLOPs, losses, forecast and actual time (registry rows)."""
    from scalelab.study.watch import run_size

    cols = ["run id", "status", "width", "N", "D", "FLOPs", "eval", "train", "fcst", "wall"]
    table = _table(title, cols)
    for r in rows:
        width, n_params, tokens = run_size(r)
        table.add_row(
            r["run_id"],
            _status(r["status"]),
            _num(width, ".0f"),
            si(n_params),
            si(tokens),
            _flops(r.get("flops")),
            _num(r.get("eval_loss")),
            _num(r.get("final_train_loss")),
            duration(r.get("forecast_seconds")),
            duration(r.get("wall_seconds")),
        )
    failures = _failures([(r["run_id"], r.get("error")) for r in rows])
    return Group(table, *([failures] if failures else []))


def plan_view(title: str, rows: Sequence[dict[str, Any]]) -> Group:
    """`study plan`: per planned run its shape, N (non-embedding and total), D, FLOPs, WSD branch point,
    forecast time and peak memory, in 80 columns; a legend names the N columns."""
    cols = ["run id", "width", "depth", "seed", "N", "N total", "D", "FLOPs", "branch", "fcst", "mem"]
    table = _table(title, cols, left=("run id", "branch"))
    for r in rows:
        table.add_row(
            r["run_id"],
            _num(r["width"], ".0f"),
            _num(r["depth"], ".0f"),
            _num(r["seed"], ".0f"),
            si(r["n_params"]),
            si(r["n_params_total"]),
            si(r["tokens"]),
            _flops(r["flops"]),
            f"{r['branch_of'][:6]}@{r['branch_step']}" if r["branch_of"] else "—",
            duration(r["forecast_seconds"]),
            binary_bytes(r["forecast_peak_memory_bytes"]).replace(" ", "").replace("iB", ""),
        )
    legend = Text(
        "N: non-embedding parameters; D: training tokens; fcst: forecast wall time; mem: forecast peak memory",
        style="dim",
    )
    return Group(table, legend)


def _sample_line(ss: Any, group: str | None) -> Text:
    """The sample-size answer in one line (of one group, when named)."""
    goal = f"±{100 * ss.goal_half_width:.1f} %"
    who = f"[{group}] " if group is not None else ""
    if not ss.runs:
        return Text(f"{who}the interval is already within {goal}")
    if ss.reachable:
        lo, hi = ss.half_width_range
        spread = (
            f" (10–90 % of simulated outcomes: ±{100 * lo:.1f}–{100 * hi:.1f} %)" if math.isfinite(hi) else ""
        )
        return Text(
            f"{who}to reach {goal}: {len(ss.runs)} runs at {_flops(ss.rung_flops)} FLOPs each "
            f"(N = {', '.join(si(r.N) for r in ss.runs)}; {_flops(ss.total_flops)} FLOPs in all), "
            f"expected ±{100 * ss.half_width_expected:.1f} %{spread}"
        )
    left = (
        f"still leaves ±{100 * ss.half_width_expected:.1f} %"
        if math.isfinite(ss.half_width_expected)
        else "leaves a fit with no finite interval"
    )
    return Text(
        f"{who}{goal} is not reached by one rung below the target compute: at {_flops(ss.rung_flops)} "
        f"FLOPs a rung {left}"
    )


def advise_view(advice: Any, shown: int = 10) -> Group:
    """`study advise`: candidates by shrink of the target's interval per FLOP; the chosen runs; sample size."""
    from rich.markup import escape

    from scalelab.study.advise import half_width

    ranked = advice.ranked
    now = ", ".join(
        f"{'' if g is None or advice.group else g + ' '}±{100 * half_width(w):.1f} %"
        for g, w in advice.width_now().items()
    )
    title = (
        f"next runs for the {advice.quantity} interval at {_flops(advice.target_flops)} FLOPs "
        f"(now {now})" + (f" · group {advice.group}" if advice.group else "")
    )
    table = _table(
        title, ["candidate", "N", "D", "FLOPs", "interval after", "shrink/PFLOP"], left=("candidate",)
    )
    chosen = {id(s) for s in advice.chosen}
    for s in ranked[:shown]:
        c = s.candidate
        mark = "[green]✓[/] " if id(s) in chosen else "  "
        table.add_row(
            mark + escape(c.label),  # a grouped candidate's "[group]" is text, not markup
            si(c.N),
            si(c.D),
            _flops(c.flops),
            f"±{100 * half_width(s.width_after):.1f} %",
            f"{s.safe_shrink_per_flop * 1e15:.3g}",
        )
    parts: list[Any] = [table]
    if advice.design_path:
        parts.append(Text(f"chosen runs (✓) written as a list design to {advice.design_path}"))
    else:
        parts.append(Text("no candidate is expected to shrink the interval; nothing written", style="yellow"))
    for g, ss in advice.samples.items():
        parts.append(_sample_line(ss, None if advice.group else g))
    parts.append(
        Text(
            "score: the expected shrink of the interval's log width less its spread over the run's possible "
            "outcomes, per PFLOP"
            + (
                "; a grouped study's groups are fitted and ranked together"
                if advice.groups and not advice.group
                else ""
            ),
            style="dim",
        )
    )
    return Group(*parts)


def study_advise(
    study_dir: Annotated[Path, typer.Argument(help="Study directory (with finished runs).")],
    target_compute: Annotated[
        float | None, typer.Option("--target-compute", help="FLOPs of the target (default: [study.target]).")
    ] = None,
    budget: Annotated[
        float | None, typer.Option("--budget", help="FLOPs to spend on the next runs (default: the top 3).")
    ] = None,
    width: Annotated[
        float | None,
        typer.Option("--width", help="Also say what reaches an interval of ± this fraction (e.g. 0.05)."),
    ] = None,
    quantity: Annotated[str, typer.Option("--quantity", help="loss (at the target) or N_opt.")] = "loss",
    draws: Annotated[
        int,
        typer.Option(
            "--draws",
            min=0,
            help="Outcomes per candidate: 1 = the fit's prediction (measured best); K > 1 = K nodes of the "
            "calibrated predictive distribution, ranked by expected shrink less its spread.",
        ),
    ] = 1,
    bootstrap: Annotated[
        int, typer.Option("--bootstrap", min=0, help="Bootstrap draws per refit (N_opt needs some).")
    ] = 0,
    group: Annotated[
        str | None,
        typer.Option("--group", help="Advise one group of a grouped study (default: all, ranked together)."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")] = False,
) -> None:
    """Which next runs shrink the target's calibrated interval the most per FLOP (each candidate refitted
    with simulated outcomes); writes the chosen ones to DIR/report/advice.toml as a list design."""
    from rich.console import Console

    from scalelab.study.advise_study import advise_study

    advice = advise_study(
        study_dir,
        target_compute,
        budget_flops=budget,
        quantity=quantity,
        width=width,
        draws=draws,
        bootstrap=bootstrap,
        group=group,
    )
    if as_json:
        print(json.dumps(advice.to_dict(), indent=2, default=float))
        return
    Console().print(advise_view(advice))
