"""What a study spent: its runs' recorded energy (by how it was obtained) and device-hours × price.

The report's totals come from here (`spend_sentence`), the forecast of the same from `study.forecast`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from scalelab.units import energy


@dataclass(frozen=True)
class Spend:
    """Totals over a study's runs; `energy_joules` sums the runs that have a figure (see `by_source`)."""

    energy_joules: float
    by_source: dict[str, int] = field(default_factory=dict)
    device_hours: float = 0.0
    cost: float | None = None
    currency: str = "USD"


def _record(row: dict[str, Any]) -> dict[str, Any]:
    try:
        rec = json.loads(row.get("record_json") or "{}")
    except ValueError:
        rec = {}
    return rec if isinstance(rec, dict) else {}


def study_spend(runs: list[dict[str, Any]], forecast: dict[str, Any] | None = None) -> Spend:
    """Energy and cost of registry rows; `forecast` is the study's `[forecast]` section (price, currency)."""
    forecast = forecast or {}
    joules, hours = 0.0, 0.0
    by_source: dict[str, int] = {}
    for row in runs:
        rec = _record(row)
        energy = row.get("energy_joules")
        source = rec.get("energy_source") or ("unavailable" if energy is None else "unknown")
        if row.get("wall_seconds") is None and energy is None:
            continue  # never ran
        by_source[source] = by_source.get(source, 0) + 1
        joules += energy or 0.0
        hours += (row.get("wall_seconds") or 0.0) / 3600.0 * int(rec.get("world_size") or 1)
    price = forecast.get("price_per_device_hour")
    return Spend(
        joules, by_source, hours, None if price is None else price * hours, forecast.get("currency") or "USD"
    )


def spend_sentence(runs: list[dict[str, Any]], forecast: dict[str, Any] | None = None) -> str:
    """' Energy: … kWh (n measured, m estimated …); cost … USD.' for the report's study line, or ''."""
    s = study_spend(runs, forecast)
    if not s.by_source:
        return ""
    sources = ", ".join(f"{n} {src}" for src, n in sorted(s.by_source.items()))
    line = f" Energy: {energy(s.energy_joules)} ({sources})"
    if s.cost is not None:
        line += f"; cost {s.cost:.2f} {s.currency} for {s.device_hours:.3g} device-hours"
    return line + "."
