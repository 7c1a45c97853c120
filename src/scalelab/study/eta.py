"""A running study's ETA: the unfinished runs' forecasts, scaled by how long finished runs took against
their own forecasts, spread over the parallel slots, and counted down between completions."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping


class StudyEta:
    """`forecasts`: run id → forecast seconds (None: unknown) for the runs still to do; `parallel`: runs
    at once. Runs without a forecast count as the mean actual time of finished runs (unknown before one
    finishes). `finished(run_id, seconds)` after each run; `seconds_left()` at any time."""

    def __init__(
        self,
        forecasts: Mapping[str, float | None],
        parallel: int = 1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.forecasts = dict(forecasts)
        self.parallel = max(1, parallel)
        self.clock = clock
        self.pending = set(self.forecasts)
        self.actual: dict[str, float] = {}
        self.left: dict[str, float] = {}  # measured seconds left of runs in progress
        self._estimate = self._compute()
        self._at = clock()

    def finished(self, run_id: str, seconds: float) -> None:
        """A run ended (any status): its time joins the actuals, the estimate is recomputed."""
        self.pending.discard(run_id)
        if seconds > 0:
            self.actual[run_id] = seconds
        self._estimate, self._at = self._compute(), self.clock()

    def remaining(self, run_id: str, seconds: float) -> None:
        """A run in progress has `seconds` left (measured from its own step rate): used instead of its
        scaled forecast."""
        self.left[run_id] = seconds
        self._estimate, self._at = self._compute(), self.clock()

    def ratio(self) -> float:
        """Actual / forecast seconds over finished runs that had a forecast (1 before any)."""
        pairs = [(s, self.forecasts[r]) for r, s in self.actual.items() if self.forecasts.get(r)]
        if not pairs:
            return 1.0
        return sum(s for s, _ in pairs) / sum(f for _, f in pairs if f)

    def _compute(self) -> float | None:
        if not self.pending:
            return 0.0
        ratio = self.ratio()
        mean_actual = sum(self.actual.values()) / len(self.actual) if self.actual else None
        work = 0.0
        for run_id in self.pending:
            forecast = self.forecasts.get(run_id)
            if run_id in self.left:
                work += self.left[run_id]
            elif forecast is not None:
                work += forecast * ratio
            elif mean_actual is not None:
                work += mean_actual
            else:
                return None
        return work / min(self.parallel, len(self.pending))

    def seconds_left(self) -> float | None:
        """The wall-clock seconds left (None while unknown), counting down since the last completion."""
        if self._estimate is None:
            return None
        return max(0.0, self._estimate - (self.clock() - self._at))
