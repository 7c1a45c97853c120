"""`InferenceServer`: one loaded (optionally quantized) model behind the dynamic-batching scheduler, with
the response cache, the prefix cache and the metrics — everything a front end (the FastAPI app in
`serve/app.py`, or a test) needs, without any HTTP in it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from scalelab.errors import ScalelabError
from scalelab.serve.cache import LRUCache, PrefixCache
from scalelab.serve.engine import Engine, Job
from scalelab.serve.loading import LoadedRun, load_run
from scalelab.serve.metrics import BATCH_BUCKETS, LATENCY_BUCKETS_SECONDS, Metrics
from scalelab.serve.quantize import model_size_bytes, quantize_model
from scalelab.serve.sampling import SamplingParams
from scalelab.serve.scheduler import QueueFull, Scheduler

log = logging.getLogger(__name__)

__all__ = ["ClientGone", "InferenceServer", "PromptTooLong", "QueueFull", "ServeConfig", "ServerError"]


class PromptTooLong(ScalelabError):
    """The prompt (or text to score) does not fit the model's context."""

    def __init__(self, field: str, tokens: int, limit: int) -> None:
        super().__init__(f"{field}: {tokens} tokens, the limit is {limit} (context of the model)")
        self.field, self.tokens, self.limit = field, tokens, limit


class ClientGone(ScalelabError):
    """The client disconnected before its request finished; its slot was freed."""


class ServerError(ScalelabError):
    """The engine failed the request (see the server log)."""


@dataclass(frozen=True)
class ServeConfig:
    """How a model is served. Byte sizes bound the caches; `max_queue` bounds waiting requests."""

    max_batch: int = 32
    max_wait_ms: float = 5.0
    max_queue: int = 256
    quantize: Literal["int8"] | None = None
    device: str = "cpu"
    threads: int | None = None
    response_cache_bytes: int = 16 << 20
    prefix_cache_bytes: int = 64 << 20
    prefix_block_tokens: int = 16


def _resolve(fut: asyncio.Future[Job], job: Job) -> None:
    if not fut.done():
        fut.set_result(job)


class InferenceServer:
    """Generate and score through the batching engine; start() before use, stop() after."""

    def __init__(self, run: LoadedRun, config: ServeConfig | None = None) -> None:
        self.config = config = config or ServeConfig()
        self.run = run
        self.device = torch.device(config.device)
        if config.threads:
            torch.set_num_threads(config.threads)
        self.fp32_size_bytes = model_size_bytes(run.model)
        model = run.model.to(self.device)
        if config.quantize:
            model = quantize_model(model, config.quantize, self.device)
        self.model = model
        self.size_bytes = model_size_bytes(model) if config.quantize else self.fp32_size_bytes
        self.tokenizer = run.tokenizer
        self.context_tokens = run.context_tokens
        self.metrics = Metrics()
        self.response_cache: LRUCache[dict[str, Any]] = LRUCache(config.response_cache_bytes)
        self.prefix_cache = PrefixCache(config.prefix_cache_bytes, config.prefix_block_tokens)
        self.engine = Engine(
            model,
            max_batch=config.max_batch,
            device=self.device,
            prefix_cache=self.prefix_cache if config.prefix_cache_bytes > 0 else None,
            metrics=self.metrics,
        )
        self.scheduler = Scheduler(
            self.engine,
            max_batch=config.max_batch,
            max_wait_ms=config.max_wait_ms,
            max_queue=config.max_queue,
        )
        self._declare_metrics()
        self.started_at = time.time()

    @classmethod
    def from_run_dir(cls, run_dir: str | Path, config: ServeConfig | None = None) -> InferenceServer:
        config = config or ServeConfig()
        device = config.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
            config = ServeConfig(**{**asdict(config), "device": device})
        return cls(load_run(run_dir), config)

    # ------------------------------------------------------------------------------- metrics
    def _declare_metrics(self) -> None:
        m, rc, pc = self.metrics, self.response_cache, self.prefix_cache.lru
        m.counter("scalelab_serve_requests_total", "HTTP requests by endpoint and status code")
        m.counter("scalelab_serve_generated_tokens_total", "tokens generated")
        m.counter("scalelab_serve_cancelled_total", "requests dropped because the client disconnected")
        m.counter("scalelab_serve_rejected_total", "requests refused with 503 because the queue was full")
        m.gauge(
            "scalelab_serve_queue_depth", "requests waiting for a slot", lambda: self.scheduler.queue_depth
        )
        m.gauge("scalelab_serve_active_requests", "requests holding a KV slot", lambda: self.scheduler.active)
        m.gauge("scalelab_serve_max_batch", "KV slots (maximum decode batch)", lambda: self.config.max_batch)
        m.gauge(
            "scalelab_serve_tokens_per_second", "generated tokens/s over the last 10 s", m.tokens_per_second
        )
        m.gauge(
            "scalelab_serve_model_size_bytes",
            "serialized size of the served weights",
            lambda: self.size_bytes,
        )
        m.gauge(
            "scalelab_serve_kv_pool_bytes",
            "bytes of the preallocated KV slot pool",
            lambda: self.engine.pool.nbytes,
        )
        for name, cache in (("response", rc), ("prefix", pc)):
            m.gauge(
                f"scalelab_serve_{name}_cache_hits_total",
                f"{name} cache hits",
                lambda c=cache: c.hits,
                kind="counter",
            )
            m.gauge(
                f"scalelab_serve_{name}_cache_misses_total",
                f"{name} cache misses",
                lambda c=cache: c.misses,
                kind="counter",
            )
            m.gauge(
                f"scalelab_serve_{name}_cache_bytes",
                f"bytes held by the {name} cache",
                lambda c=cache: c.bytes,
            )
            m.gauge(
                f"scalelab_serve_{name}_cache_max_bytes",
                f"bound of the {name} cache",
                lambda c=cache: c.max_bytes,
            )
            m.gauge(
                f"scalelab_serve_{name}_cache_entries", f"entries in the {name} cache", lambda c=cache: len(c)
            )
            m.gauge(
                f"scalelab_serve_{name}_cache_evictions_total",
                f"{name} cache evictions",
                lambda c=cache: c.evictions,
                kind="counter",
            )
        m.histogram(
            "scalelab_serve_request_latency_seconds", "request latency by endpoint", LATENCY_BUCKETS_SECONDS
        )
        m.histogram(
            "scalelab_serve_time_to_first_token_seconds", "submit → first token", LATENCY_BUCKETS_SECONDS
        )
        m.histogram(
            "scalelab_serve_queue_wait_seconds", "submit → admitted to a slot", LATENCY_BUCKETS_SECONDS
        )
        m.histogram("scalelab_serve_decode_batch_size", "requests per decode step", BATCH_BUCKETS)
        m.histogram("scalelab_serve_prefill_batch_size", "requests per batched prefill", BATCH_BUCKETS)

    # ----------------------------------------------------------------------------- lifecycle
    def start(self) -> None:
        self.scheduler.start()

    def stop(self) -> None:
        self.scheduler.stop()

    @property
    def healthy(self) -> bool:
        return self.scheduler.running

    def health(self) -> dict[str, Any]:
        return {
            "status": "ok" if self.healthy else "error",
            "run_id": self.run.spec.run_id,
            "checkpoint_step": self.run.step,
            "quantize": self.config.quantize,
            "context_tokens": self.context_tokens,
            "queue_depth": self.scheduler.queue_depth,
            "active_requests": self.scheduler.active,
            "uptime_seconds": time.time() - self.started_at,
            **(
                {"error": f"{type(self.scheduler.error).__name__}: {self.scheduler.error}"}
                if self.scheduler.error
                else {}
            ),
        }

    # ------------------------------------------------------------------------------ requests
    def encode(self, text: str) -> list[int]:
        """Token ids with the end-of-document token first: a prompt starts a new document."""
        return [self.tokenizer.eod_id, *self.tokenizer.encode(text).tolist()]

    async def _run_job(self, job: Job, disconnected: Callable[[], Awaitable[bool]] | None) -> Job:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Job] = loop.create_future()
        job.on_done = lambda j: loop.call_soon_threadsafe(_resolve, fut, j)
        try:
            self.scheduler.submit(job)
        except QueueFull:
            self.metrics.inc("scalelab_serve_rejected_total")
            raise
        watcher: asyncio.Task[None] | None = None
        if disconnected is not None:

            async def watch() -> None:
                while not await disconnected():
                    await asyncio.sleep(0.02)

            watcher = asyncio.create_task(watch())
        try:
            waiting: set[asyncio.Future[Any]] = {fut, *([watcher] if watcher else [])}
            done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if fut not in done:
                self._abandon(job)
                raise ClientGone("client disconnected")
        except asyncio.CancelledError:
            self._abandon(job)
            raise
        finally:
            if watcher is not None:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
        if job.finish_reason in ("error", "shutdown"):
            raise ServerError(f"request failed in the engine ({job.finish_reason})")
        return job

    def _abandon(self, job: Job) -> None:
        job.cancel()
        if self.scheduler.withdraw(job):  # still waiting: nothing in the engine to free
            self.engine.finish(job, "cancelled")

    async def generate(
        self,
        prompt: str,
        params: SamplingParams,
        disconnected: Callable[[], Awaitable[bool]] | None = None,
    ) -> dict[str, Any]:
        """Generate up to `params.max_tokens` tokens after `prompt`; identical deterministic requests hit
        the response cache. Raises PromptTooLong, QueueFull, ClientGone or ServerError."""
        t0 = time.monotonic()
        ids = self.encode(prompt)
        limit = self.context_tokens - 1
        if len(ids) > limit:
            raise PromptTooLong("prompt", len(ids), limit)
        key = None
        if params.deterministic:
            norm = params if params.temperature else SamplingParams(params.max_tokens, 0.0, None, None)
            key = json.dumps({"prompt": prompt, **asdict(norm)}, sort_keys=True)
            hit = self.response_cache.get(key)
            if hit is not None:
                self.metrics.observe(
                    "scalelab_serve_request_latency_seconds", time.monotonic() - t0, endpoint="generate"
                )
                return {**hit, "cached": True}
        job = await self._run_job(Job("generate", ids, params, stop_id=self.tokenizer.eod_id), disconnected)
        result = {
            "text": self.tokenizer.decode(job.generated),
            "tokens": job.generated,
            "finish_reason": job.finish_reason,
            "usage": {"prompt_tokens": len(ids), "completion_tokens": len(job.generated)},
            "prefix_cached_tokens": job.prefix_hit_tokens,
            "cached": False,
        }
        if key is not None:
            self.response_cache.put(key, result, len(key) + len(json.dumps(result)))
        now = time.monotonic()
        self.metrics.observe("scalelab_serve_request_latency_seconds", now - t0, endpoint="generate")
        if job.first_token_at is not None:
            self.metrics.observe(
                "scalelab_serve_time_to_first_token_seconds", job.first_token_at - job.submitted_at
            )
        return result

    async def score(
        self, text: str, disconnected: Callable[[], Awaitable[bool]] | None = None
    ) -> dict[str, Any]:
        """Log-likelihood (nats) of `text` as a new document: the sum over its tokens, and per token."""
        t0 = time.monotonic()
        ids = self.encode(text)
        if len(ids) - 1 > self.context_tokens:
            raise PromptTooLong("text", len(ids) - 1, self.context_tokens)
        job = await self._run_job(Job("score", ids), disconnected)
        total = float(sum(job.logprobs))
        n = len(job.logprobs)
        self.metrics.observe(
            "scalelab_serve_request_latency_seconds", time.monotonic() - t0, endpoint="score"
        )
        return {
            "logprob": total,
            "tokens": n,
            "mean_logprob": total / n if n else 0.0,
            "token_logprobs": job.logprobs,
        }
