"""Progress of a fit's long steps (bootstrap refits, backtests), reported to a callback the caller installs
with `reporting(...)`; the library never prints, and with no callback installed reporting costs nothing."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass


@dataclass(frozen=True)
class FitProgress:
    """`done` of `total` units of `stage` ('bootstrap refits', 'backtest', ...); total 0: a stage began."""

    stage: str
    done: int
    total: int


_callback: ContextVar[Callable[[FitProgress], None] | None] = ContextVar("fit_progress", default=None)


@contextlib.contextmanager
def reporting(callback: Callable[[FitProgress], None] | None) -> Iterator[None]:
    """Send the progress of fits run inside this block to `callback` (in this process only)."""
    token = _callback.set(callback)
    try:
        yield
    finally:
        _callback.reset(token)


def report(stage: str, done: int = 0, total: int = 0) -> None:
    """Tell the installed callback (if any) that `done` of `total` units of `stage` are finished."""
    cb = _callback.get()
    if cb is not None:
        cb(FitProgress(stage, done, total))
