"""Diminishing returns of one factor at a time: the loss gain per doubling of a resource, and where it
falls under a stated threshold (the analysis behind an `ofat` design's report section)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

#: the resource each kind of factor grows, as a run-record key: what "a doubling" doubles
RESOURCE = {"train.tokens": "tokens", "compute": "flops"}


def resource_key(factor: str, n_key: str = "n_params") -> str:
    """The run field a factor's doublings are counted in (tokens, N for model fields, FLOPs for compute)."""
    return RESOURCE.get(factor, n_key if factor.startswith("model.") else "flops")


@dataclass(frozen=True)
class FactorReturns:
    """One factor's ladder: resource levels, mean loss (over seeds) and the gain per doubling between
    neighbouring levels; `exhausted_at` is the first level whose next doubling gains under `threshold`."""

    factor: str
    resource: str
    levels: list[float]
    loss: list[float]
    gain_per_doubling: list[float]  # between level i and i+1
    threshold: float
    exhausted_at: float | None

    def sentence(self) -> str:
        if len(self.levels) < 2:
            return f"{self.factor}: one level only, no returns to measure"
        last = self.gain_per_doubling[-1]
        if self.exhausted_at is None:
            return (
                f"{self.factor}: still {last:.3g} loss per doubling of {self.resource} at the largest level "
                f"(threshold {self.threshold:g}): worth growing further"
            )
        return (
            f"{self.factor}: the gain per doubling of {self.resource} falls under {self.threshold:g} from "
            f"{self.exhausted_at:.3g} on (last step {last:.3g}): diminishing returns"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "factor": self.factor,
            "resource": self.resource,
            "levels": self.levels,
            "loss": self.loss,
            "gain_per_doubling": self.gain_per_doubling,
            "threshold": self.threshold,
            "exhausted_at": self.exhausted_at,
            "sentence": self.sentence(),
        }


def factor_returns(
    factor: str,
    runs: Sequence[Mapping[str, Any]],
    threshold: float,
    loss_key: str = "eval_loss",
    n_key: str = "n_params",
) -> FactorReturns:
    """Gain per doubling along one factor from its runs (records with `loss_key` and the resource)."""
    key = resource_key(factor, n_key)
    by_level: dict[float, list[float]] = {}
    for r in runs:
        if r.get(key) is not None and r.get(loss_key) is not None:
            by_level.setdefault(float(r[key]), []).append(float(r[loss_key]))
    levels = sorted(by_level)
    loss = [float(np.mean(by_level[v])) for v in levels]
    gains = [(loss[i] - loss[i + 1]) / math.log2(levels[i + 1] / levels[i]) for i in range(len(levels) - 1)]
    exhausted = next((levels[i] for i, g in enumerate(gains) if g < threshold), None)
    return FactorReturns(factor, key, levels, loss, gains, threshold, exhausted)


def ofat_returns(
    runs: Sequence[Mapping[str, Any]], threshold: float, loss_key: str = "eval_loss", n_key: str = "n_params"
) -> list[FactorReturns]:
    """Per factor of an `ofat` design (runs whose point has `factors`), its diminishing-returns ladder."""
    names: dict[str, None] = {}
    for r in runs:
        for f in (r.get("point") or {}).get("factors") or {}:
            names.setdefault(f, None)
    return [
        factor_returns(
            f,
            [r for r in runs if f in ((r.get("point") or {}).get("factors") or {})],
            threshold,
            loss_key,
            n_key,
        )
        for f in names
    ]
