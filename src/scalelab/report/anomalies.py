"""Runs a reader should look at before trusting the fit: diverged or failed runs, loss spikes in the
training curve, and finished runs far off the fitted law — each with what to do about it."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from scalelab.units import count

#: a step's loss above this × the median of the previous SPIKE_WINDOW steps' is a spike
SPIKE_FACTOR = 1.5
SPIKE_WINDOW = 10
#: a run whose log residual exceeds max(OFF_FIT_SDS × the residuals' robust sd, OFF_FIT_MIN) is off the fit
OFF_FIT_SDS = 4.0
OFF_FIT_MIN = 0.03


@dataclass(frozen=True)
class Anomaly:
    run_id: str
    kind: str  # "diverged" | "failed" | "spike" | "off-fit"
    detail: str  # what was seen, in numbers
    action: str  # what to do about it
    step: int | None = None
    tokens: float | None = None
    loss: float | None = None

    @property
    def flag(self) -> str:
        """The short label the runs table shows."""
        return {"off-fit": "off the fit", "spike": "loss spike"}.get(self.kind, self.kind)


def loss_spikes(
    metrics: Sequence[dict[str, Any]], factor: float = SPIKE_FACTOR, window: int = SPIKE_WINDOW
) -> list[dict[str, Any]]:
    """Steps whose training loss exceeds `factor` × the median of the `window` steps before it."""
    steps = [m for m in metrics if m.get("loss") is not None and "step" in m]
    out = []
    for i in range(window, len(steps)):
        base = statistics.median(float(s["loss"]) for s in steps[i - window : i])
        loss = float(steps[i]["loss"])
        if base > 0 and (loss > factor * base or not np.isfinite(loss)):
            out.append(
                {"step": steps[i]["step"], "tokens": steps[i].get("tokens"), "loss": loss, "baseline": base}
            )
    return out


def _where(r: dict[str, Any], n_key: str) -> str:
    return f"run {r['run_id']} (N={count(r.get(n_key))}, D={count(r.get('tokens'))})"


def find_anomalies(
    runs: Sequence[dict[str, Any]],
    metrics_of: Callable[[dict[str, Any]], Sequence[dict[str, Any]]],
    predict: Callable[[np.ndarray, np.ndarray], np.ndarray] | None,
    loss_key: str,
    n_key: str,
) -> list[Anomaly]:
    """Every anomaly among `runs` (registry rows): status, spikes in `metrics_of(run)`, distance from `predict`."""
    out: list[Anomaly] = []
    for r in runs:
        where = _where(r, n_key)
        if r["status"] == "diverged":
            out.append(
                Anomaly(
                    r["run_id"],
                    "diverged",
                    f"{where} diverged: {(r.get('error') or 'loss blew up').splitlines()[0]}",
                    "lower train.lr (or lengthen the warmup) for this size and re-run it; the fit leaves it out",
                )
            )
        elif r["status"] in ("failed", "timeout"):
            out.append(
                Anomaly(
                    r["run_id"],
                    "failed",
                    f"{where} {r['status']}",
                    "read its error under Failures, fix the cause and run `scalelab study run` again (finished "
                    "runs are skipped); the fit leaves it out",
                )
            )
        if r["status"] not in ("done", "diverged"):
            continue
        spikes = loss_spikes(metrics_of(r))
        if spikes:
            worst = max(spikes, key=lambda s: s["loss"] / s["baseline"])
            out.append(
                Anomaly(
                    r["run_id"],
                    "spike",
                    f"{where}: training loss spiked to {worst['loss']:.3g} at step {worst['step']} "
                    f"({worst['loss'] / worst['baseline']:.1f}× the median of the {SPIKE_WINDOW} steps before; "
                    f"{len(spikes)} spike step(s))",
                    "look at its loss curve; if the final loss is off the fit too, re-run it with another "
                    "train.seed or a lower train.lr",
                    step=int(worst["step"]),
                    tokens=worst.get("tokens"),
                    loss=worst["loss"],
                )
            )
    out += _off_fit([r for r in runs if r["status"] == "done"], predict, loss_key, n_key)
    return out


def _off_fit(
    runs: Sequence[dict[str, Any]],
    predict: Callable[[np.ndarray, np.ndarray], np.ndarray] | None,
    loss_key: str,
    n_key: str,
) -> list[Anomaly]:
    pts = [r for r in runs if r.get(loss_key) and r.get(n_key) and r.get("tokens")]
    if predict is None or len(pts) < 4:
        return []
    n = np.array([r[n_key] for r in pts], float)
    d = np.array([r["tokens"] for r in pts], float)
    res = np.log([r[loss_key] for r in pts]) - np.log(predict(n, d))
    robust_sd = 1.4826 * float(np.median(np.abs(res - np.median(res))))
    limit = max(OFF_FIT_SDS * robust_sd, OFF_FIT_MIN)
    out = []
    for r, e in zip(pts, res, strict=True):
        if abs(e) > limit:
            out.append(
                Anomaly(
                    r["run_id"],
                    "off-fit",
                    f"{_where(r, n_key)}: loss {r[loss_key]:.4g} is {100 * (np.exp(e) - 1):+.1f} % off the fit "
                    f"(limit ±{100 * limit:.1f} %)",
                    "check its loss curve and record; if it is a bad run, re-run it with another train.seed — "
                    "one bad point moves every exponent",
                )
            )
    return out
