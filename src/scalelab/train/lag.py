"""Convergence lag: how far behind in loss a run is at equal training time, against a reference run.

The reference is the run named by `train.reference_run` (a run directory or its metrics.jsonl; set it in
`[execution]` so it does not change the run id) — typically the same config trained unloaded, in one
process or on uncontended workers. Time is the training time each run has spent, the running sum of
`step_seconds` (the slowest rank's under DDP/FSDP; evals and checkpoints excluded, so the lag is what
slower or contended workers cost). At each step of this run, with t its training time so far,

    convergence_lag(t) = loss(t) − loss_ref(t)

where loss_ref is the reference's per-step training loss linearly interpolated in its own training time.
Positive: this run is behind. Past the end of the reference curve (or before its first step) there is no
value (no extrapolation). `ConvergenceLagCallback` writes `convergence_lag`, `reference_loss` and
`train_seconds` into each metrics.jsonl line.
"""

from __future__ import annotations

import bisect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scalelab.errors import TrainingError
from scalelab.train.trainer import Callback, TrainState


@dataclass(frozen=True)
class LossCurve:
    """A run's training loss against its cumulative training seconds (increasing)."""

    seconds: tuple[float, ...]
    loss: tuple[float, ...]

    @classmethod
    def from_rows(cls, rows: list[dict[str, Any]]) -> LossCurve:
        """From metrics.jsonl rows: step rows (with loss and step_seconds) in order, time summed."""
        t, seconds, loss = 0.0, [], []
        for r in rows:
            if r.get("loss") is None or r.get("step_seconds") is None:
                continue
            t += float(r["step_seconds"])
            seconds.append(t)
            loss.append(float(r["loss"]))
        return cls(tuple(seconds), tuple(loss))

    def at(self, t: float) -> float | None:
        """The loss at training time `t`, linearly interpolated; None outside the curve's time range."""
        s = self.seconds
        if not s or t < s[0] or t > s[-1]:
            return None
        i = bisect.bisect_left(s, t)
        if s[i] == t or i == 0:
            return self.loss[i]
        t0, t1 = s[i - 1], s[i]
        w = (t - t0) / (t1 - t0)
        return self.loss[i - 1] + w * (self.loss[i] - self.loss[i - 1])


def read_reference(path: str | Path) -> LossCurve:
    """The loss curve of the reference run at `path` (a run directory or a metrics.jsonl file)."""
    p = Path(path)
    file = p / "metrics.jsonl" if p.is_dir() else p
    try:
        lines = file.read_text().splitlines()
    except OSError as err:
        raise TrainingError(f"train.reference_run: cannot read {file}: {err.strerror or err}") from None
    rows = []
    for n, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except ValueError:
            raise TrainingError(f"train.reference_run: {file} line {n} is not JSON") from None
    curve = LossCurve.from_rows(rows)
    if not curve.seconds:
        raise TrainingError(f"train.reference_run: {file} has no step rows with loss and step_seconds")
    return curve


class ConvergenceLagCallback(Callback):
    """Adds convergence_lag (loss − the reference's loss at the same training time), reference_loss and
    train_seconds to every step's metrics; runs after `CrossRankMetrics` (global loss and time)."""

    def __init__(self, reference: LossCurve) -> None:
        self.reference = reference

    def on_step_end(self, state: TrainState) -> None:
        metrics = state.extra.setdefault("metrics", {})
        metrics["train_seconds"] = state.train_seconds
        ref = self.reference.at(state.train_seconds)
        if ref is not None:
            metrics.update(reference_loss=ref, convergence_lag=state.loss - ref)
