"""Training progress as events for a front end to render (the CLI): after every step, the step, loss,
smoothed tokens/s, MFU and an ETA from the smoothed step time. Library code only reports; it never prints."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from scalelab.train.trainer import Callback, TrainState


@dataclass(frozen=True)
class StepProgress:
    """One step's progress; `eta_seconds` is None until a step time is known."""

    run_id: str
    step: int
    total_steps: int
    tokens: int
    loss: float | None
    eval_loss: float | None
    tokens_per_second: float | None
    mfu: float | None
    eta_seconds: float | None
    done: bool  # the last step (or the run stopped)


class ProgressCallback(Callback):
    """Calls `report(StepProgress)` after every step; tokens/s and step time are exponential moving
    averages (weight `smoothing` on the past), so one slow step (an eval, a checkpoint) does not swing
    the ETA. Place it after the metrics logger so MFU is known."""

    def __init__(self, report: Callable[[StepProgress], None], run_id: str = "", smoothing: float = 0.8):
        self.report = report
        self.run_id = run_id
        self.smoothing = smoothing
        self._step_seconds: float | None = None
        self._tokens_per_second: float | None = None
        self._eval_loss: float | None = None

    def _smooth(self, old: float | None, new: float) -> float:
        return new if old is None else self.smoothing * old + (1 - self.smoothing) * new

    def on_eval_end(self, state: TrainState) -> None:
        if state.eval_loss is not None and math.isfinite(state.eval_loss):
            self._eval_loss = float(state.eval_loss)

    def on_step_end(self, state: TrainState) -> None:
        if state.step_seconds > 0:
            self._step_seconds = self._smooth(self._step_seconds, state.step_seconds)
        if state.tokens_per_second > 0:
            self._tokens_per_second = self._smooth(self._tokens_per_second, state.tokens_per_second)
        remaining = max(0, state.total_steps - state.step)
        done = remaining == 0 or state.stop
        eta = 0.0 if done else None if self._step_seconds is None else remaining * self._step_seconds
        mfu = state.extra.get("mfu")
        self.report(
            StepProgress(
                run_id=self.run_id,
                step=state.step,
                total_steps=state.total_steps,
                tokens=state.tokens,
                loss=float(state.loss) if math.isfinite(state.loss) else None,
                eval_loss=self._eval_loss,
                tokens_per_second=self._tokens_per_second,
                mfu=float(mfu) if mfu is not None and math.isfinite(mfu) else None,
                eta_seconds=eta,
                done=done,
            )
        )
