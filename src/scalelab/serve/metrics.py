"""Serving metrics through `prometheus_client`: one registry per server (so two servers in one process
never share series), request series labelled by route *template* (never the raw path), and gauges read
from the engine and the caches at scrape time.

Series (all prefixed `scalelab_serve_`): requests_total{route,method,code},
request_latency_seconds{route} (HTTP, first byte in → last byte out), time_to_first_token_seconds,
queue_wait_seconds, decode_batch_size, prefill_batch_size, decode_step_seconds, generated_tokens_total,
tokens_per_second, batch_occupancy, queue_depth, active_requests, cancelled_total, rejected_total, and
per cache (response, prefix): {hits,misses,evictions}_total, hit_rate, bytes, max_bytes, entries.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

LATENCY_BUCKETS_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
#: the `route` label of a request no route matched (404s): one series, whatever the URL
UNMATCHED_ROUTE = "unmatched"
KNOWN_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})
PREFIX = "scalelab_serve"


class CacheStats(Protocol):
    """What the cache collector reads (see `serve/cache.py`)."""

    hits: int
    misses: int
    evictions: int
    bytes: int
    max_bytes: int

    def __len__(self) -> int: ...


class _CacheCollector(Collector):
    """Counters and gauges of byte-bounded caches, read at scrape time (the caches keep the numbers)."""

    def __init__(self, caches: dict[str, CacheStats]) -> None:
        self.caches = caches

    def collect(self) -> Iterator[Any]:
        fams: dict[str, Any] = {}

        def fam(kind: type, name: str, help_: str) -> Any:
            if name not in fams:
                fams[name] = kind(f"{PREFIX}_{name}", help_, labels=["cache"])
            return fams[name]

        for label, c in self.caches.items():
            looked = c.hits + c.misses
            fam(CounterMetricFamily, "cache_hits", "cache hits").add_metric([label], c.hits)
            fam(CounterMetricFamily, "cache_misses", "cache misses").add_metric([label], c.misses)
            fam(CounterMetricFamily, "cache_evictions", "cache evictions").add_metric([label], c.evictions)
            fam(GaugeMetricFamily, "cache_hit_rate", "hits / lookups since start (0 before any)").add_metric(
                [label], c.hits / looked if looked else 0.0
            )
            fam(GaugeMetricFamily, "cache_bytes", "bytes held").add_metric([label], c.bytes)
            fam(GaugeMetricFamily, "cache_max_bytes", "byte bound").add_metric([label], c.max_bytes)
            fam(GaugeMetricFamily, "cache_entries", "entries held").add_metric([label], len(c))
        yield from fams.values()

    def describe(self) -> Iterable[Any]:
        return []


class Metrics:
    """The server's series in its own `CollectorRegistry`; updates are thread-safe (prometheus_client)."""

    def __init__(self, rate_window_seconds: float = 10.0) -> None:
        self.registry = reg = CollectorRegistry()
        p = PREFIX
        self.requests = Counter(
            f"{p}_requests",
            "HTTP responses by route template, method and status",
            ["route", "method", "code"],
            registry=reg,
        )
        self.request_latency = Histogram(
            f"{p}_request_latency_seconds",
            "HTTP request latency by route template (request in → response complete)",
            ["route"],
            buckets=LATENCY_BUCKETS_SECONDS,
            registry=reg,
        )
        self.time_to_first_token = Histogram(
            f"{p}_time_to_first_token_seconds",
            "submit → first token",
            buckets=LATENCY_BUCKETS_SECONDS,
            registry=reg,
        )
        self.queue_wait = Histogram(
            f"{p}_queue_wait_seconds",
            "submit → admitted to a slot",
            buckets=LATENCY_BUCKETS_SECONDS,
            registry=reg,
        )
        self.decode_batch = Histogram(
            f"{p}_decode_batch_size", "requests per decode step", buckets=BATCH_BUCKETS, registry=reg
        )
        self.prefill_batch = Histogram(
            f"{p}_prefill_batch_size", "requests per batched prefill", buckets=BATCH_BUCKETS, registry=reg
        )
        self.step_seconds = Histogram(
            f"{p}_step_seconds",
            "engine step time by kind (prefill, decode, score)",
            ["kind"],
            buckets=LATENCY_BUCKETS_SECONDS,
            registry=reg,
        )
        self.generated_tokens = Counter(f"{p}_generated_tokens", "tokens generated", registry=reg)
        self.cancelled = Counter(
            f"{p}_cancelled", "requests dropped because the client disconnected", registry=reg
        )
        self.rejected = Counter(
            f"{p}_rejected", "requests refused with 503 because the queue was full", registry=reg
        )
        self._rate_window = rate_window_seconds
        self._token_events: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()
        self.gauge("tokens_per_second", "generated tokens/s over the last 10 s", self.tokens_per_second)

    def gauge(self, name: str, help_: str, fn: Callable[[], float]) -> None:
        """A gauge `scalelab_serve_<name>` whose value is read from `fn` at scrape time."""
        Gauge(f"{PREFIX}_{name}", help_, registry=self.registry).set_function(fn)

    def caches(self, caches: dict[str, CacheStats]) -> None:
        """Expose hits, misses, evictions, hit rate, bytes and entries of `caches` (label `cache`)."""
        self.registry.register(_CacheCollector(caches))

    def request_done(self, route: str, method: str, code: int, seconds: float) -> None:
        """Count one HTTP response; `route` must be a route template or UNMATCHED_ROUTE."""
        method = method if method in KNOWN_METHODS else "other"
        self.requests.labels(route, method, str(code)).inc()
        self.request_latency.labels(route).observe(seconds)

    def tokens_generated(self, n: int) -> None:
        """Count `n` generated tokens (for the total and the recent tokens/s)."""
        now = time.monotonic()
        self.generated_tokens.inc(n)
        with self._lock:
            self._token_events.append((now, n))

    def tokens_per_second(self) -> float:
        """Generated tokens per second over the last `rate_window_seconds`."""
        now = time.monotonic()
        with self._lock:
            while self._token_events and self._token_events[0][0] < now - self._rate_window:
                self._token_events.popleft()
            total = sum(n for _, n in self._token_events)
        return total / self._rate_window

    def value(self, name: str, **labels: str) -> float:
        """Current value of a sample by its exposed name (0 when absent) — for tests and reports."""
        got = self.registry.get_sample_value(name, labels)
        return 0.0 if got is None else float(got)

    def render(self) -> bytes:
        """The Prometheus text exposition."""
        return generate_latest(self.registry)
