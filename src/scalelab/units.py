"""Human-readable numbers for tables and figures (k/M/G suffixes, binary byte units)."""

from __future__ import annotations

from typing import Any


def si(x: Any, digits: int = 3) -> str:
    """1234567 → '1.23M'; None → '—'."""
    if x is None:
        return "—"
    x = float(x)
    for unit, div in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.{digits}g}{unit}"
    return f"{x:.{digits}g}"


def binary_bytes(x: Any) -> str:
    """1536 → '1.5 KiB'; None → '—'."""
    if x is None:
        return "—"
    x = float(x)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(x) < 1024:
            return f"{x:.0f} {unit}" if unit == "B" else f"{x:.1f} {unit}"
        x /= 1024
    return f"{x:.1f} TiB"


def duration(seconds: Any) -> str:
    """42.3 → '42s', 185 → '3m05s', 7384 → '2h03m'; None → '—'."""
    if seconds is None:
        return "—"
    s = max(0, round(float(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def count(x: Any, digits: int = 3) -> str:
    """A count of things (parameters, tokens): 1.23e9 → '1.23B', 44_500 → '44.5k'; None → '—'."""
    if x is None:
        return "—"
    x = float(x)
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.{digits}g}{unit}"
    return f"{x:.{digits}g}"


def flops(x: Any) -> str:
    """Compute in FLOPs, as papers write it: 3.4e20 → '3.4e20 FLOPs'; None → '—'."""
    if x is None:
        return "—"
    mantissa, exponent = f"{float(x):.2g}e0".split("e")[:2]
    return f"{mantissa}e{int(exponent)} FLOPs" if int(exponent) else f"{mantissa} FLOPs"


def energy(joules: Any) -> str:
    """Energy for a reader, never in e-notation: 68 → '68 J', 5.4e4 → '15 Wh', 7.2e7 → '20 kWh',
    9e9 → '2.5 MWh'; None → '—'."""
    if joules is None:
        return "—"
    j = float(joules)
    if abs(j) < 3600:
        return f"{j:.3g} J"
    for unit, div in (("MWh", 3.6e9), ("kWh", 3.6e6), ("Wh", 3600.0)):
        if abs(j) >= div:
            return f"{j / div:,.3g} {unit}" if j / div < 1000 else f"{j / div:,.0f} {unit}"
    return f"{j:.3g} J"  # pragma: no cover - every j >= 3600 matched above


def factor(x: float) -> str:
    """A ratio for a reader, never in e-notation: 25.3, 2.62k, 311G; 'over 10^15' beyond that."""
    if x < 1000:
        return f"{x:.3g}"
    return si(x) if x < 1e15 else "over 10^15"
