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
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch

from scalelab.errors import ScalelabError
from scalelab.serve.cache import LRUCache, PrefixCache
from scalelab.serve.engine import Engine, Job
from scalelab.serve.loading import LoadedRun, load_run
from scalelab.serve.mailbox import mailbox
from scalelab.serve.metrics import Metrics
from scalelab.serve.quantize import model_size_bytes, quantize_model
from scalelab.serve.sampling import SamplingParams
from scalelab.serve.scheduler import QueueFull, Scheduler
from scalelab.serve.text import StopText, TokenOffsets

log = logging.getLogger(__name__)

__all__ = [
    "ClientGone",
    "Completion",
    "Disconnect",
    "InferenceServer",
    "PromptTooLong",
    "QueueFull",
    "ServeConfig",
    "ServerError",
    "StreamDelta",
    "TextStream",
]

#: an awaitable factory that completes when the client has gone (the HTTP layer's disconnect signal)
Disconnect = Callable[[], Awaitable[Any]]


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
    max_wait_ms: float = 20.0  # see scheduler.py: a lone request waits ARRIVAL_GAP_SECONDS only
    max_queue: int = 256
    quantize: Literal["int8", "int4"] | None = None
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
        m = self.metrics
        m.gauge("queue_depth", "requests waiting for a slot", lambda: self.scheduler.queue_depth)
        m.gauge("active_requests", "requests holding a KV slot", lambda: self.scheduler.active)
        m.gauge("max_batch", "KV slots (maximum decode batch)", lambda: self.config.max_batch)
        m.gauge(
            "batch_occupancy",
            "fraction of the KV slots in use",
            lambda: self.scheduler.active / self.config.max_batch,
        )
        m.gauge("model_size_bytes", "serialized size of the served weights", lambda: self.size_bytes)
        m.gauge("kv_pool_bytes", "bytes of the preallocated KV slot pool", lambda: self.engine.pool.nbytes)
        m.caches({"response": self.response_cache, "prefix": self.prefix_cache.lru})

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

    def prepare(
        self,
        prompt: str,
        params: SamplingParams,
        stop: Sequence[str] = (),
        top_logprobs: int | None = None,
    ) -> tuple[Job, StopText]:
        """The engine job for one generation and its stop-string view; raises PromptTooLong."""
        ids = self.encode(prompt)
        limit = self.context_tokens - 1
        if len(ids) > limit:
            raise PromptTooLong("prompt", len(ids), limit)
        stops = StopText(self.tokenizer.decode, stop)
        job = Job(
            "generate",
            ids,
            params,
            stop_id=None if params.ignore_eos else self.tokenizer.eod_id,
            should_stop=(lambda j: stops.hit(j.generated)) if stops.stops else None,
            top_logprobs=top_logprobs,
        )
        return job, stops

    def _submit(self, jobs: Sequence[Job], loop: asyncio.AbstractEventLoop) -> list[asyncio.Future[Job]]:
        """Queue all of `jobs` or none of them (QueueFull withdraws the ones already queued)."""
        futures: list[asyncio.Future[Job]] = []
        box = mailbox(loop)  # one wake-up of the loop for all the jobs that finish in one engine step
        for job in jobs:
            fut: asyncio.Future[Job] = loop.create_future()
            job.on_done = lambda j, f=fut: box.call(_resolve, f, j)
            try:
                self.scheduler.submit(job)
            except QueueFull:
                self.metrics.rejected.inc()
                for queued in jobs[: len(futures)]:
                    self._abandon(queued)
                raise
            futures.append(fut)
        return futures

    async def _run_jobs(self, jobs: Sequence[Job], until_disconnected: Disconnect | None) -> None:
        """Run `jobs` to the end; raises QueueFull, ClientGone (jobs dropped) or ServerError."""
        futures = self._submit(jobs, asyncio.get_running_loop())
        watcher = asyncio.ensure_future(until_disconnected()) if until_disconnected is not None else None
        try:
            everything = asyncio.gather(*futures)
            waiting: set[asyncio.Future[Any]] = {everything, *([watcher] if watcher else [])}
            done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if everything not in done:
                everything.cancel()
                raise ClientGone("client disconnected")
        except BaseException:
            for job in jobs:
                if not job.done:
                    self._abandon(job)
            raise
        finally:
            if watcher is not None:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await watcher
        if any(j.finish_reason in ("error", "shutdown") for j in jobs):
            raise ServerError("request failed in the engine (see the server log)")

    def _abandon(self, job: Job) -> None:
        job.cancel()
        if self.scheduler.withdraw(job):  # still waiting: nothing in the engine to free
            self.engine.finish(job, "cancelled")

    async def complete(
        self,
        prompt: str,
        params: SamplingParams,
        *,
        stop: Sequence[str] = (),
        top_logprobs: int | None = None,
        n: int = 1,
        until_disconnected: Disconnect | None = None,
    ) -> list[Completion]:
        """`n` generations after `prompt` (choice i uses seed + i when a seed is given), cut at the first
        stop string. Identical deterministic requests hit the response cache.
        Raises PromptTooLong, QueueFull, ClientGone or ServerError."""
        key = None
        if params.deterministic:
            norm = (
                replace(params, temperature=0.0, top_k=None, seed=None, top_p=1.0)
                if params.greedy
                else params
            )
            key = json.dumps(
                {"prompt": prompt, **asdict(norm), "stop": list(stop), "top": top_logprobs, "n": n},
                sort_keys=True,
            )
            hit = self.response_cache.get(key)
            if hit is not None:
                return [replace(c, cached=True) for c in hit]
        prepared = [self.prepare(prompt, choice_params(params, i), stop, top_logprobs) for i in range(n)]
        jobs = [job for job, _ in prepared]
        await self._run_jobs(jobs, until_disconnected)
        result = [_completion(job, stops) for job, stops in prepared]
        if key is not None:
            self.response_cache.put(key, result, len(key) + sum(c.nbytes for c in result))
        return result

    async def generate(
        self,
        prompt: str,
        params: SamplingParams,
        until_disconnected: Disconnect | None = None,
    ) -> dict[str, Any]:
        """The native /v1/generate result: text, tokens, finish_reason, usage, cache information."""
        (c,) = await self.complete(prompt, params, until_disconnected=until_disconnected)
        return {
            "text": c.text,
            "tokens": c.tokens,
            "finish_reason": c.engine_reason,
            "usage": {"prompt_tokens": c.prompt_tokens, "completion_tokens": len(c.tokens)},
            "prefix_cached_tokens": c.prefix_cached_tokens,
            "cached": c.cached,
        }

    def stream(
        self,
        requests: Sequence[tuple[str, SamplingParams]],
        *,
        stop: Sequence[str] = (),
        top_logprobs: int | None = None,
    ) -> TextStream:
        """Queue one generation per (prompt, params) now (raising PromptTooLong or QueueFull before any
        byte is sent); iterate the returned stream's `events()` for text deltas (with the log-probabilities
        of the tokens each delta covers when `top_logprobs` is not None)."""
        prepared = [self.prepare(p, params, stop, top_logprobs) for p, params in requests]
        return TextStream(self, prepared, asyncio.get_running_loop())

    async def score(self, text: str, until_disconnected: Disconnect | None = None) -> dict[str, Any]:
        """Log-likelihood (nats) of `text` as a new document: the sum over its tokens, and per token."""
        ids = self.encode(text)
        if len(ids) - 1 > self.context_tokens:
            raise PromptTooLong("text", len(ids) - 1, self.context_tokens)
        job = Job("score", ids)
        await self._run_jobs([job], until_disconnected)
        total = float(sum(job.logprobs))
        n = len(job.logprobs)
        return {
            "logprob": total,
            "tokens": n,
            "mean_logprob": total / n if n else 0.0,
            "token_logprobs": job.logprobs,
        }


def choice_params(params: SamplingParams, i: int) -> SamplingParams:
    """Sampling parameters of choice `i` of a request: seed + i, so n choices differ but reproduce."""
    if i == 0 or params.seed is None:
        return params
    return replace(params, seed=(params.seed + i) % (1 << 63))


@dataclass(frozen=True)
class Completion:
    """One finished generation. `finish_reason` is OpenAI's ("stop" | "length"); `engine_reason` the
    engine's ("stop", "length", "context"). `logprobs`/`top` are per generated token (with top_logprobs)."""

    text: str
    tokens: list[int]
    finish_reason: str
    engine_reason: str
    prompt_tokens: int
    prefix_cached_tokens: int
    logprobs: list[float] | None = None
    top: list[list[tuple[int, float]]] | None = None
    cached: bool = False

    @property
    def nbytes(self) -> int:
        return 64 + 4 * len(self.text) + 40 * len(self.tokens) * (2 + len(self.top[0]) if self.top else 1)


def _completion(job: Job, stops: StopText) -> Completion:
    text, _ = stops.text(job.generated)
    reason = job.finish_reason or "stop"
    return Completion(
        text=text,
        tokens=list(job.generated),
        finish_reason="stop" if reason == "stop" else "length",
        engine_reason=reason,
        prompt_tokens=len(job.ids),
        prefix_cached_tokens=job.prefix_hit_tokens,
        logprobs=list(job.logprobs) if job.top_logprobs is not None else None,
        top=list(job.top) if job.top_logprobs is not None else None,
    )


@dataclass(frozen=True)
class StreamDelta:
    """One event of a `TextStream`: choice `index` has `text` more; `finish` is None until it ends, then
    "stop" or "length". `tokens` are the generated tokens this text newly covers (`TokenOffsets.covered`),
    with their character `offsets` in the choice's text and, when asked for, `logprobs` and `top`."""

    index: int
    text: str
    finish: str | None
    tokens: list[int]
    offsets: list[int]
    logprobs: list[float] | None = None
    top: list[list[tuple[int, float]]] | None = None


class TextStream:
    """Generations in flight, read as text deltas: `async for delta in stream.events()` (`StreamDelta`).

    Leaving the loop early (client gone) cancels whatever is still running.
    """

    def __init__(
        self,
        server: InferenceServer,
        prepared: Sequence[tuple[Job, StopText]],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.server = server
        self.jobs = [job for job, _ in prepared]
        self.stops = [stops for _, stops in prepared]
        # (choice, tokens generated so far) after each token; (choice, None) once it has finished
        self._queue: asyncio.Queue[tuple[int, int | None]] = asyncio.Queue()
        box = mailbox(loop)
        for i, job in enumerate(self.jobs):
            job.on_token = lambda j, i=i: box.call(self._queue.put_nowait, (i, len(j.generated)))
        futures = server._submit(self.jobs, loop)
        for i, fut in enumerate(futures):
            fut.add_done_callback(lambda _f, i=i: self._queue.put_nowait((i, None)))

    @property
    def prompt_tokens(self) -> int:
        return sum(len(j.ids) for j in self.jobs)

    @property
    def completion_tokens(self) -> int:
        return sum(len(j.generated) for j in self.jobs)

    async def events(self) -> AsyncIterator[StreamDelta]:
        sent = [0] * len(self.jobs)  # characters sent, per choice
        sent_tokens = [0] * len(self.jobs)
        offsets = [TokenOffsets(s.decode) for s in self.stops]
        open_ = set(range(len(self.jobs)))
        try:
            while open_:
                i, count = await self._queue.get()
                if i not in open_:
                    continue
                job = self.jobs[i]
                done = count is None
                if done and job.finish_reason in ("error", "shutdown", "cancelled"):
                    raise ServerError(f"request failed in the engine ({job.finish_reason})")
                ids = job.generated[:count]
                text = self.stops[i].emittable(ids, done)
                delta, sent[i] = text[sent[i] :], max(sent[i], len(text))
                a, b = sent_tokens[i], max(sent_tokens[i], offsets[i].covered(ids, text, done))
                sent_tokens[i] = b
                finish = None
                if done:
                    open_.discard(i)
                    finish = "stop" if job.finish_reason == "stop" else "length"
                if delta or finish or b > a:
                    logged = job.top_logprobs is not None
                    yield StreamDelta(
                        i,
                        delta,
                        finish,
                        list(ids[a:b]),
                        offsets[i].offsets[a:b],
                        job.logprobs[a:b] if logged else None,
                        job.top[a:b] if logged else None,
                    )
        finally:
            self.close()

    def close(self) -> None:
        """Cancel the generations that have not finished (idempotent)."""
        for job in self.jobs:
            if not job.done:
                self.server._abandon(job)
