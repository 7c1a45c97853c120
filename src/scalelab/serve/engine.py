"""The synchronous core of continuous batching: admit requests into KV slots, prefill them together, and
advance every active request by one token per `decode()` call.

No threads and no asyncio here (the scheduler drives it), so tests can step it by hand. A request
finishes on its own (max_tokens, end-of-document, context full, cancelled) and frees its slot at once;
new requests can be admitted between any two decode steps.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from scalelab.serve.cache import PrefixCache
from scalelab.serve.families import cached_family
from scalelab.serve.kvcache import KVPool, SlotPool, cache_mismatch, extend, forward_last
from scalelab.serve.metrics import Metrics
from scalelab.serve.sampling import SamplingParams, sample_tokens

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Job:
    """One request as the engine sees it; result fields are filled in by the engine thread."""

    kind: Literal["generate", "score"]
    ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    on_done: Callable[[Job], None] | None = None
    stop_id: int | None = None
    #: called in the engine thread after each generated token (streaming); must be quick
    on_token: Callable[[Job], None] | None = None
    #: checked after each generated token; True finishes the job with reason "stop" (stop strings)
    should_stop: Callable[[Job], bool] | None = None
    #: record each generated token's log-probability and this many most likely alternatives
    top_logprobs: int | None = None
    # results
    generated: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # score: per token; generate: per generated token
    top: list[list[tuple[int, float]]] = field(default_factory=list)  # generate with top_logprobs
    finish_reason: str | None = None
    prefix_hit_tokens: int = 0
    # timing (time.monotonic)
    submitted_at: float = field(default_factory=time.monotonic)
    admitted_at: float | None = None
    first_token_at: float | None = None
    finished_at: float | None = None
    # engine state
    slot: int | None = None
    generator: np.random.Generator | None = None
    _cancel: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """Ask the engine to drop this request (client gone); safe from any thread."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


def _record_logprobs(job: Job, row: torch.Tensor, token: int) -> None:
    """Log-probability (the model's distribution, before temperature) of `token` and the top alternatives."""
    logp = torch.log_softmax(row.double(), dim=-1).numpy()
    job.logprobs.append(float(logp[token]))
    k = min(int(job.top_logprobs or 0), logp.size)
    if k:
        best = np.argpartition(-logp, k - 1)[:k]
        best = best[np.argsort(-logp[best], kind="stable")]
        job.top.append([(int(i), float(logp[i])) for i in best])
    else:
        job.top.append([])


class Engine:
    """Batched prefill and decode over a KV slot pool (`max_batch` slots) for one model.

    Models of a family with a KV-cache adapter (`serve/families.py`) that passes `cache_mismatch` decode
    through the cache (`cached` is True); any other causal LM is served by a cache-less full forward of
    each sequence at every step (`kvcache.forward_last`: same tokens, more compute, no prefix cache).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        max_batch: int,
        device: torch.device | str = "cpu",
        prefix_cache: PrefixCache | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.model = model
        self.device = torch.device(device)
        self.context_tokens = model.shape.context_tokens
        family = cached_family(model)
        if family is not None and (why := cache_mismatch(family, self.device)) is not None:
            log.warning("%s: KV cache disabled, serving with a full forward (%s)", type(model).__name__, why)
            family = None
        self.cached = family is not None
        self.pool: SlotPool = (
            KVPool(family, max_batch, self.device) if family is not None else SlotPool(max_batch)
        )
        if not self.cached and prefix_cache is not None:
            log.info("%s: no KV cache, so no prefix cache", type(model).__name__)
            prefix_cache = None
        self.prefix_cache = prefix_cache
        self.metrics = metrics
        self.active: list[Job] = []

    @property
    def free_slots(self) -> int:
        return self.pool.free_slots

    # ------------------------------------------------------------------------------- lifecycle
    def finish(self, job: Job, reason: str) -> None:
        job.finish_reason = reason
        job.finished_at = time.monotonic()
        if job.slot is not None:
            self.pool.release(job.slot)
            job.slot = None
        if job in self.active:
            self.active.remove(job)
        if self.metrics is not None and reason == "cancelled":
            self.metrics.cancelled.inc()
        if job.on_done is not None:
            try:
                job.on_done(job)
            except Exception:  # noqa: BLE001 — a broken callback must not stop the engine
                log.exception("on_done callback failed")

    def drop_cancelled(self) -> int:
        """Free the slots of cancelled requests; returns how many were dropped."""
        gone = [j for j in self.active if j.cancelled]
        for job in gone:
            self.finish(job, "cancelled")
        return len(gone)

    def _accept_all(self, jobs: Sequence[Job], logits: torch.Tensor) -> None:
        """Sample the next token of each job from its row of (B, V) logits."""
        tokens = sample_tokens(logits, [j.params for j in jobs], [j.generator for j in jobs])  # type: ignore[misc]
        now = time.monotonic()  # one clock read a step, not one a request
        accepted = 0
        for row, (job, token) in enumerate(zip(jobs, tokens, strict=True)):
            if job.top_logprobs is not None and token != job.stop_id:
                _record_logprobs(job, logits[row], token)
            accepted += self._accept(job, token, now)
        if self.metrics is not None:
            self.metrics.tokens_generated(accepted)

    def _accept(self, job: Job, token: int, now: float) -> bool:
        """Append `token` to `job` (False: it was the stop token, not appended); finish the job when a stop
        condition holds."""
        if job.first_token_at is None:
            job.first_token_at = now
            if self.metrics is not None:
                self.metrics.time_to_first_token.observe(now - job.submitted_at)
        if job.stop_id is not None and token == job.stop_id:
            self.finish(job, "stop")
            return False
        generated = job.generated
        generated.append(token)
        if job.on_token is not None:
            job.on_token(job)
        if job.should_stop is not None and job.should_stop(job):
            self.finish(job, "stop")
        elif len(generated) >= job.params.max_tokens:
            self.finish(job, "length")
        elif len(job.ids) + len(generated) >= self.context_tokens:
            self.finish(job, "context")
        return True

    # ---------------------------------------------------------------------------------- steps
    @torch.inference_mode()
    def admit(self, jobs: Sequence[Job]) -> None:
        """Give each job a slot, prefill all of them in one batched call and sample their first tokens."""
        for job in [j for j in jobs if j.cancelled]:
            self.finish(job, "cancelled")
        jobs = [j for j in jobs if not j.cancelled]
        if not jobs:
            return
        if len(jobs) > self.free_slots:
            raise RuntimeError(f"admit: {len(jobs)} jobs but {self.free_slots} free slots")
        starts: list[int] = []
        for job in jobs:
            if not 0 < len(job.ids) < self.context_tokens:
                raise ValueError(f"prompt of {len(job.ids)} tokens: need 1..{self.context_tokens - 1}")
            job.slot = self.pool.allocate()
            job.admitted_at = time.monotonic()
            job.generator = job.params.generator()
            start = 0
            if self.prefix_cache is not None:
                entry = self.prefix_cache.lookup(job.ids)
                if entry is not None:
                    assert isinstance(self.pool, KVPool)
                    self.pool.write(job.slot, entry.k, entry.v)
                    start = entry.length
            job.prefix_hit_tokens = start
            starts.append(start)
        t0 = time.perf_counter()
        rows = self._prefill(jobs, starts)
        if self.metrics is not None:
            self.metrics.prefill_batch.observe(len(jobs))
            self.metrics.step_seconds.labels("prefill").observe(time.perf_counter() - t0)
        for job in jobs:
            assert job.slot is not None
            self.active.append(job)
            if self.prefix_cache is not None and isinstance(self.pool, KVPool):
                n = self.prefix_cache.wants(job.ids)
                if n:
                    k, v = self.pool.read(job.slot, n)
                    self.prefix_cache.store(job.ids[:n], k, v)
            if self.metrics is not None:
                self.metrics.queue_wait.observe(job.admitted_at - job.submitted_at)
        self._accept_all(jobs, rows)

    @torch.inference_mode()
    def decode(self) -> int:
        """One token for every active request (one batched call); returns the batch size."""
        self.drop_cancelled()
        jobs = sorted(self.active, key=lambda j: j.slot or 0)  # consecutive slots: `extend` reads a view
        if not jobs:
            return 0
        t0 = time.perf_counter()
        logits = self._next_logits(jobs)
        if self.metrics is not None:
            self.metrics.decode_batch.observe(len(jobs))
            self.metrics.step_seconds.labels("decode").observe(time.perf_counter() - t0)
        self._accept_all(jobs, logits)
        return len(jobs)

    def _prefill(self, jobs: Sequence[Job], starts: Sequence[int]) -> torch.Tensor:
        """(B, V) logits after each job's prompt (positions starts[b].. are new; the rest is cached)."""
        if not isinstance(self.pool, KVPool):
            return forward_last(self.model, [j.ids for j in jobs], self.device).float().cpu()
        width = max(len(j.ids) - s for j, s in zip(jobs, starts, strict=True))
        tokens = torch.zeros(len(jobs), width, dtype=torch.long)
        for row, (job, s) in enumerate(zip(jobs, starts, strict=True)):
            tokens[row, : len(job.ids) - s] = torch.tensor(job.ids[s:], dtype=torch.long)
        slots = torch.tensor([j.slot for j in jobs], dtype=torch.long)  # host indices: see `extend`
        start_t = torch.tensor(starts, dtype=torch.long)
        lens_t = torch.tensor([len(j.ids) - s for j, s in zip(jobs, starts, strict=True)], dtype=torch.long)
        return extend(self.pool, slots, tokens, start_t, lens_t, last_only=True).float().cpu()

    def _next_logits(self, jobs: Sequence[Job]) -> torch.Tensor:
        """(B, V) logits after each job's last generated token."""
        if not isinstance(self.pool, KVPool):
            return forward_last(self.model, [j.ids + j.generated for j in jobs], self.device).float().cpu()
        slots = torch.tensor([j.slot for j in jobs], dtype=torch.long)  # host indices: see `extend`
        tokens = torch.tensor([[j.generated[-1]] for j in jobs], dtype=torch.long)
        starts = torch.tensor([len(j.ids) + len(j.generated) - 1 for j in jobs], dtype=torch.long)
        ones = torch.ones(len(jobs), dtype=torch.long)
        return extend(self.pool, slots, tokens, starts, ones)[:, 0].float().cpu()

    @torch.inference_mode()
    def score(self, jobs: Sequence[Job]) -> None:
        """Log-probability of every token of each job after the first (one padded full forward)."""
        if not jobs:
            return
        width = max(len(j.ids) for j in jobs) - 1
        x = torch.zeros(len(jobs), width, dtype=torch.long)
        for row, job in enumerate(jobs):
            x[row, : len(job.ids) - 1] = torch.tensor(job.ids[:-1], dtype=torch.long)
        t0 = time.perf_counter()
        logp = F.log_softmax(self.model(x.to(self.device)).float(), dim=-1).cpu()
        if self.metrics is not None:
            self.metrics.step_seconds.labels("score").observe(time.perf_counter() - t0)
        for row, job in enumerate(jobs):
            job.admitted_at = job.first_token_at = time.monotonic()
            n = len(job.ids) - 1
            targets = torch.tensor(job.ids[1:], dtype=torch.long)
            job.logprobs = logp[row, torch.arange(n), targets].tolist()
            self.finish(job, "scored")
