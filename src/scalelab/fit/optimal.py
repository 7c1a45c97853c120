"""Compute-optimal allocation from a fitted ``L(N, D) = E + A/N^α + B/D^β``, and its inverse.

Compute accounting (``Accounting``): C = k · N^γ · D.

* ``6ND`` (k = 6, γ = 1): the usual approximation, used when the table had no compute column.
* ``table``: the table gave C (for a study, `models/flops.py`: 6N plus attention and the output
  layer per token); k and γ are then fitted to the runs by least squares on
  ``log(C/D) = log k + γ log N``, so the optimum uses the same accounting as the runs.

Closed form: minimising L(N, C/(k N^γ)) over N gives

    N_opt = (α A / (γ β B k^β))^{1/(α+γβ)} · C^{β/(α+γβ)},   D_opt = C / (k N_opt^γ),

which for 6ND is the familiar N_opt = G (C/6)^a, D_opt = G⁻¹ (C/6)^b with G = (αA/(βB))^{1/(α+β)},
a = β/(α+β), b = α/(α+β). Everything here is vectorised over parameter samples (bootstrap draws).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from scalelab.errors import FitError


@dataclass(frozen=True)
class Accounting:
    """C = k · N^γ · D; ``kind`` is "6ND" or "table" (fitted to the runs' own FLOP counts)."""

    kind: str = "6ND"
    k: float = 6.0
    gamma: float = 1.0

    @classmethod
    def from_runs(cls, N: np.ndarray, D: np.ndarray, C: np.ndarray, compute_source: str) -> Accounting:
        if compute_source != "table":
            return cls()
        lx = np.log(N)
        ly = np.log(C / D)
        if np.ptp(lx) < 1e-9:
            return cls("table", float(np.exp(np.mean(ly - lx))), 1.0)
        gamma, logk = np.polyfit(lx, ly, 1)
        return cls("table", float(np.exp(logk)), float(gamma))

    def describe(self) -> str:
        if self.kind == "6ND":
            return "C = 6·N·D (the table had no compute column)"
        return (
            f"C from the table's compute column (for a study: the models/flops.py accounting), fitted as "
            f"C = {self.k:.4g}·N^{self.gamma:.4f}·D"
        )

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "k": self.k, "gamma": self.gamma, "formula": self.describe()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Accounting:
        return cls(str(d.get("kind", "6ND")), float(d.get("k", 6.0)), float(d.get("gamma", 1.0)))


def optimal_allocation(
    E: Any, A: Any, B: Any, alpha: Any, beta: Any, compute: float, acc: Accounting = Accounting()
) -> dict[str, np.ndarray]:
    """N_opt, D_opt, the loss there and tokens per parameter for a budget (arrays over samples)."""
    E, A, B, alpha, beta = (np.asarray(v, dtype=np.float64) for v in (E, A, B, alpha, beta))
    C = np.asarray(compute, dtype=np.float64)
    g = acc.gamma
    with np.errstate(all="ignore"):
        log_n = (np.log(alpha * A) - np.log(g * beta * B) - beta * np.log(acc.k) + beta * np.log(C)) / (
            alpha + g * beta
        )
        N = np.exp(log_n)
        D = C / (acc.k * N**g)
        loss = E + A * N ** (-alpha) + B * D ** (-beta)
    return {"N_opt": N, "D_opt": D, "loss": loss, "tokens_per_param": D / N}


def compute_for_loss(
    E: Any, A: Any, B: Any, alpha: Any, beta: Any, target_loss: float, acc: Accounting = Accounting()
) -> np.ndarray:
    """Smallest compute (FLOPs) whose optimal allocation reaches `target_loss`; inf where unreachable
    (target ≤ E). Vectorised bisection in log C (the optimal loss falls monotonically with C)."""
    E, A, B, alpha, beta = np.broadcast_arrays(
        *(np.asarray(v, dtype=np.float64) for v in (E, A, B, alpha, beta))
    )
    target = float(target_loss)
    g = acc.gamma

    def loss_at(logc: np.ndarray) -> np.ndarray:
        log_n = (np.log(alpha * A) - np.log(g * beta * B) - beta * np.log(acc.k) + beta * logc) / (
            alpha + g * beta
        )
        log_d = logc - np.log(acc.k) - g * log_n
        return E + A * np.exp(-alpha * log_n) + B * np.exp(-beta * log_d)

    lo = np.full(E.shape, np.log(1e-6))
    hi = np.full(E.shape, np.log(1e80))
    with np.errstate(all="ignore"):
        for _ in range(120):
            mid = 0.5 * (lo + hi)
            above = loss_at(mid) > target
            lo = np.where(above, mid, lo)
            hi = np.where(above, hi, mid)
        ok = (target > E) & (loss_at(np.full(E.shape, np.log(1e80))) <= target)
    return np.where(ok, np.exp(hi), np.inf)


def check_budget(compute: float | None, target_loss: float | None) -> None:
    if (compute is None) == (target_loss is None):
        raise FitError("give exactly one of a compute budget (FLOPs) or a target loss")
    if compute is not None and not (np.isfinite(compute) and compute > 0):
        raise FitError(f"compute budget must be a positive number of FLOPs, got {compute}")
    if target_loss is not None and not (np.isfinite(target_loss) and target_loss > 0):
        raise FitError(f"target loss must be positive, got {target_loss}")
