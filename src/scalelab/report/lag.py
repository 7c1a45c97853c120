"""The report's convergence-lag section: per run, the loss gap at equal training time against its
reference run (`train.reference_run`; definition in train/lag.py), from the run's metrics.jsonl."""

from __future__ import annotations

import html
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from scalelab.report.figures import read_metrics


def lag_summary(rows: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """{steps, mean, last, last_seconds} of the rows' convergence_lag values; None when there are none."""
    lags = [
        (r["convergence_lag"], r.get("train_seconds")) for r in rows if r.get("convergence_lag") is not None
    ]
    if not lags:
        return None
    values = [v for v, _ in lags]
    return {
        "steps": len(values),
        "mean": sum(values) / len(values),
        "last": values[-1],
        "last_seconds": lags[-1][1],
    }


def _reference_of(run_dir: Path) -> str:
    try:
        config = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError):
        return "?"
    return str((config.get("execution") or {}).get("reference_run") or config["train"].get("reference_run"))


def lag_sections(
    runs: Sequence[dict[str, Any]], read: Callable[[Path], list[dict[str, Any]]] = read_metrics
) -> list[tuple[str, str, str]]:
    """The ("convergence-lag", title, HTML) section when any run measured a lag; else nothing."""
    body = []
    for r in runs:
        if not r.get("run_dir"):
            continue
        run_dir = Path(r["run_dir"])
        summary = lag_summary(read(run_dir))
        if summary is None:
            continue
        body.append(
            f"<tr><td><code>{html.escape(str(r['run_id']))}</code></td>"
            f"<td class=l><code>{html.escape(_reference_of(run_dir))}</code></td><td>{summary['steps']}</td>"
            f"<td>{summary['mean']:+.4f}</td><td>{summary['last']:+.4f}</td>"
            f"<td>{summary['last_seconds'] or 0:.3g} s</td></tr>"
        )
    if not body:
        return []
    head = (
        "<tr><th>run id</th><th class=l>reference run</th><th>steps compared</th><th>mean lag</th>"
        "<th>last lag</th><th>at training time</th></tr>"
    )
    text = (
        "<p>Loss minus the reference run's loss at the same training time (sum of step times, the slowest "
        "rank's; evals excluded), the reference's curve interpolated; positive: behind. Steps past the "
        "reference's last step are not compared.</p>"
    )
    return [("convergence-lag", "Convergence lag", text + f"<table>{head}{''.join(body)}</table>")]
