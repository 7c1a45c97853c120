"""Summarise a coordinate check (`scalelab.models.parametrization.coord_check`) as slopes across width.

For each layer, at a given step (default: the last), the activation RMS at each width and the slope of
ln RMS against ln width: ≈ 0 when the parametrization keeps activations width independent (μP), > 0 when
they grow with width (SP after a few Adam steps, mostly in the logits).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

#: |slope of ln RMS vs ln width| below which a layer is called width independent
DEFAULT_COORD_TOLERANCE = 0.2


@dataclass
class CoordLayer:
    layer: str
    step: int
    widths: list[int]
    rms: list[float]
    slope: float
    stable: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize_coord_check(
    rows: Sequence[dict[str, Any]], step: int | None = None, tolerance: float = DEFAULT_COORD_TOLERANCE
) -> list[CoordLayer]:
    """Per layer: RMS by width at `step` and its log–log slope against width."""
    if not rows:
        return []
    step = max(int(r["step"]) for r in rows) if step is None else step
    layers: dict[str, dict[int, float]] = {}
    for r in rows:
        if int(r["step"]) == step:
            layers.setdefault(str(r["layer"]), {})[int(r["width"])] = float(r["rms"])
    out = []
    for layer, by_width in layers.items():
        widths = sorted(by_width)
        rms = [by_width[w] for w in widths]
        if len(widths) >= 2 and all(v > 0 for v in rms):
            slope = float(np.polyfit(np.log(widths), np.log(rms), 1)[0])
        else:
            slope = math.nan
        out.append(CoordLayer(layer, step, widths, rms, slope, bool(abs(slope) <= tolerance)))
    return out
