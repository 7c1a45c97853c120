"""Serving metrics in Prometheus text format (counters, gauges, histograms), without a client library.

Why hand-written: the exposition format is a few lines of text, and the server's needs (thread-safe
updates from the engine thread, a handful of series) do not justify another dependency.
"""

from __future__ import annotations

import bisect
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence

LATENCY_BUCKETS_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    inner = ",".join(
        f'{k}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
        for k, v in sorted(labels.items())
    )
    return "{" + inner + "}"


def _num(x: float) -> str:
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    return repr(float(x)) if not float(x).is_integer() else str(int(x))


class Histogram:
    """Cumulative-bucket histogram (Prometheus semantics: `le` upper bounds, plus sum and count)."""

    def __init__(self, buckets: Sequence[float]) -> None:
        self.buckets = tuple(sorted(buckets))
        self.counts = [0] * (len(self.buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str, labels: dict[str, str]) -> list[str]:
        out, acc = [], 0
        for le, c in zip((*self.buckets, math.inf), self.counts, strict=True):
            acc += c
            out.append(f"{name}_bucket{_labels({**labels, 'le': _num(le)})} {acc}")
        out.append(f"{name}_sum{_labels(labels)} {_num(self.sum)}")
        out.append(f"{name}_count{_labels(labels)} {self.count}")
        return out


class Metrics:
    """A registry of named series; every update takes one lock (the engine thread and the event loop write).

    Gauges may also be callables read at exposition time (queue depth, cache bytes).
    """

    def __init__(self, rate_window_seconds: float = 10.0) -> None:
        self._lock = threading.Lock()
        self._help: dict[str, tuple[str, str]] = {}
        self._counters: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self._gauges: dict[str, Callable[[], float]] = {}
        self._hists: dict[tuple[str, tuple[tuple[str, str], ...]], Histogram] = {}
        self._buckets: dict[str, Sequence[float]] = {}
        self._rate_window = rate_window_seconds
        self._token_events: deque[tuple[float, int]] = deque()

    # -- declaration
    def counter(self, name: str, help_: str) -> None:
        self._help[name] = ("counter", help_)

    def gauge(self, name: str, help_: str, fn: Callable[[], float], *, kind: str = "gauge") -> None:
        """A series read from `fn` at exposition; `kind="counter"` for monotonic values kept elsewhere."""
        self._help[name] = (kind, help_)
        self._gauges[name] = fn

    def histogram(self, name: str, help_: str, buckets: Sequence[float]) -> None:
        self._help[name] = ("histogram", help_)
        self._buckets[name] = buckets

    # -- updates
    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            self._counters[key] = self._counters.get(key, 0.0) + amount

    def observe(self, name: str, value: float, **labels: str) -> None:
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            hist = self._hists.get(key)
            if hist is None:
                hist = self._hists[key] = Histogram(self._buckets[name])
            hist.observe(value)

    def tokens_generated(self, n: int) -> None:
        """Count `n` generated tokens (for the total and the recent tokens/s)."""
        now = time.monotonic()
        with self._lock:
            self._token_events.append((now, n))
            key = ("scalelab_serve_generated_tokens_total", ())
            self._counters[key] = self._counters.get(key, 0.0) + n

    def tokens_per_second(self) -> float:
        """Generated tokens per second over the last `rate_window_seconds`."""
        now = time.monotonic()
        with self._lock:
            while self._token_events and self._token_events[0][0] < now - self._rate_window:
                self._token_events.popleft()
            total = sum(n for _, n in self._token_events)
        return total / self._rate_window

    def value(self, name: str, **labels: str) -> float:
        """Current value of a counter (0 when never incremented) — for tests and reports."""
        with self._lock:
            return self._counters.get((name, tuple(sorted(labels.items()))), 0.0)

    # -- exposition
    def render(self) -> str:
        """The Prometheus text exposition (version 0.0.4)."""
        gauges = {name: float(fn()) for name, fn in self._gauges.items()}
        with self._lock:
            counters = dict(self._counters)
            hists = {k: h for k, h in self._hists.items()}
            lines: list[str] = []
            for name, (kind, help_) in sorted(self._help.items()):
                lines.append(f"# HELP {name} {help_}")
                lines.append(f"# TYPE {name} {kind}")
                if name in gauges:
                    lines.append(f"{name} {_num(gauges[name])}")
                elif kind == "counter":
                    series = [(dict(lbl), v) for (n, lbl), v in counters.items() if n == name]
                    for lbl, v in sorted(series, key=lambda s: sorted(s[0].items())) or [({}, 0.0)]:
                        lines.append(f"{name}{_labels(lbl)} {_num(v)}")
                else:
                    for (n, lbl), h in sorted(hists.items()):
                        if n == name:
                            lines.extend(h.lines(name, dict(lbl)))
        return "\n".join(lines) + "\n"
