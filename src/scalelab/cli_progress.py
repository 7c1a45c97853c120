"""The CLI's view of a training run's progress: a rich bar on a terminal, a plain line every few seconds
otherwise (and at the first and last step), so logs of long runs show step, loss, tokens/s, MFU and ETA."""

from __future__ import annotations

import time
from collections.abc import Callable
from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TextColumn
from rich.text import Text

from scalelab.train.progress import StepProgress
from scalelab.units import duration, si


def step_fields(p: StepProgress) -> str:
    """'loss 3.214 · eval 3.301 · 12.3k tok/s · MFU 1.2% · ETA 2m05s' (unknown values left out)."""
    parts = []
    if p.loss is not None:
        parts.append(f"loss {p.loss:.4f}")
    if p.eval_loss is not None:
        parts.append(f"eval {p.eval_loss:.4f}")
    if p.tokens_per_second is not None:
        parts.append(f"{si(p.tokens_per_second)} tok/s")
    if p.mfu is not None:
        parts.append(f"MFU {p.mfu:.1%}")
    parts.append(f"ETA {duration(p.eta_seconds)}")
    return " · ".join(parts)


def step_line(p: StepProgress) -> str:
    """One plain progress line: 'RUN step 12/200 (6%) · loss … · ETA …'."""
    pct = p.step / p.total_steps if p.total_steps else 1.0
    head = f"{p.run_id} " if p.run_id else ""
    return f"{head}step {p.step}/{p.total_steps} ({pct:.0%}) · {step_fields(p)}"


class StepProgressView:
    """Renders StepProgress events: `live` (a terminal) → a rich bar with the fields beside it; otherwise a
    plain line at the first step, then at most one every `interval_seconds`, and at the last step."""

    def __init__(
        self,
        console: Console,
        *,
        live: bool,
        interval_seconds: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.console = console
        self.live = live
        self.interval_seconds = interval_seconds
        self.clock = clock
        self._last: float | None = None
        self._bar: Progress | None = None
        self._task: int | None = None

    def __enter__(self) -> StepProgressView:
        if self.live:
            self._bar = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                console=self.console,
            )
            self._bar.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._bar is not None:
            self._bar.stop()

    def __call__(self, p: StepProgress) -> None:
        if self._bar is not None:
            if self._task is None:
                self._task = self._bar.add_task(p.run_id or "training", total=p.total_steps, info="")
            self._bar.update(self._task, completed=p.step, info=step_fields(p))
            return
        now = self.clock()
        if p.done or self._last is None or now - self._last >= self.interval_seconds:
            self._last = now
            self.console.print(step_line(p), markup=False, highlight=False, soft_wrap=True)


class LiveTextColumn(ProgressColumn):
    """A progress column whose text `text()` computes at every refresh (a countdown, say)."""

    def __init__(self, text: Callable[[], str]) -> None:
        super().__init__()
        self.text = text

    def render(self, task: Task) -> Text:
        return Text(self.text())
