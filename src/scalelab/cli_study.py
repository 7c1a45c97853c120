"""Tables of a study's runs for `study watch` and `study status`, laid out to fit an 80-column terminal:
each run named by id, width, N (non-embedding parameters) and D (tokens); failures listed under the table."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

from scalelab.study.watch import RunProgress, run_size
from scalelab.units import duration, si

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
