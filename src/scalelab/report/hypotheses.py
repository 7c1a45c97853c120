"""Pre-registered hypotheses checked against the fit: supported, contradicted or inconclusive.

A machine-checkable hypothesis compares one fitted quantity with numbers: ``alpha > 0.2``,
``beta <= 0.5``, ``a between 0.4 and 0.6``. Quantities are the law's parameters (E, A, B, alpha, beta),
derived ones (a, b, G, ...) and the recommendation's (N_opt, D_opt, tokens_per_param, loss). A
hypothesis is *supported* when its whole interval satisfies it, *contradicted* when its whole interval
violates it, and *inconclusive* otherwise — so a wide interval can never confirm anything. Other text
is reported as stated, unchecked.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable
from typing import Any

_OPS: dict[str, Callable[[float, float], bool]] = {
    ">": operator.gt,
    ">=": operator.ge,
    "<": operator.lt,
    "<=": operator.le,
}
_NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_CMP = re.compile(rf"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(>=|<=|>|<)\s*({_NUM})\s*$")
_BETWEEN = re.compile(rf"^\s*([A-Za-z_][A-Za-z0-9_]*)\s+between\s+({_NUM})\s+and\s+({_NUM})\s*$", re.I)


def quantities(fit_json: dict[str, Any]) -> dict[str, tuple[float, list[float] | None]]:
    """name → (point estimate, interval or None) for everything a hypothesis may name."""
    f = fit_json.get("fit", {})
    out: dict[str, tuple[float, list[float] | None]] = {}
    for values, intervals in (
        (f.get("params", {}), f.get("intervals", {})),
        (f.get("derived", {}), f.get("derived_intervals", {})),
    ):
        for k, v in values.items():
            if isinstance(v, int | float):
                out[k] = (float(v), intervals.get(k))
    rec = fit_json.get("recommendation") or {}
    for k in ("N_opt", "D_opt", "tokens_per_param", "loss", "compute_flops"):
        if isinstance(rec.get(k), int | float):
            out[k] = (float(rec[k]), (rec.get("intervals") or {}).get(k))
    return out


def _holds(pred: Callable[[float], bool], point: float, interval: list[float] | None) -> str:
    if interval and len(interval) == 2 and None not in interval:
        lo, hi = float(interval[0]), float(interval[1])
        ends = [pred(lo), pred(hi)]
        if all(ends):
            return f"supported (whole interval [{lo:.4g}, {hi:.4g}] satisfies it)"
        if not any(ends) and not pred(point):
            return f"contradicted (whole interval [{lo:.4g}, {hi:.4g}] violates it)"
        return f"inconclusive (interval [{lo:.4g}, {hi:.4g}] straddles the threshold)"
    return ("holds at the point estimate" if pred(point) else "fails at the point estimate") + (
        f" {point:.4g}; no interval, so not a test"
    )


def evaluate(hypothesis: str, fit_json: dict[str, Any] | None) -> str:
    """The outcome of one hypothesis, in words."""
    m_cmp, m_btw = _CMP.match(hypothesis), _BETWEEN.match(hypothesis)
    if not (m_cmp or m_btw):
        return "stated, not machine-checkable (write it as `alpha > 0.2` or `a between 0.4 and 0.6`)"
    if fit_json is None:
        return "not evaluated yet: no fit"
    q = quantities(fit_json)
    name = (m_cmp or m_btw).group(1)  # type: ignore[union-attr]
    if name not in q:
        return f"cannot evaluate: the fit has no quantity '{name}' (has: {', '.join(sorted(q))})"
    point, interval = q[name]
    if m_cmp:
        op, ref = _OPS[m_cmp.group(2)], float(m_cmp.group(3))
        # monotone in the quantity, so checking both interval ends decides the whole interval
        return _holds(lambda x: op(x, ref), point, interval)
    lo_ref, hi_ref = sorted((float(m_btw.group(2)), float(m_btw.group(3))))  # type: ignore[union-attr]
    inside = lambda x: lo_ref <= x <= hi_ref  # noqa: E731
    if interval and None not in interval and (interval[1] < lo_ref or interval[0] > hi_ref):
        return f"contradicted (whole interval [{interval[0]:.4g}, {interval[1]:.4g}] outside [{lo_ref:g}, {hi_ref:g}])"
    return _holds(inside, point, interval)
