"""The serving engine without HTTP: the KV-cached forward equals a full forward, batching does not change
the tokens a seeded request gets, requests finish independently, caches stay within their byte bounds."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from scalelab.errors import CheckpointError
from scalelab.serve._testing import train_tiny_run
from scalelab.serve.cache import LRUCache, PrefixCache
from scalelab.serve.engine import Engine, Job
from scalelab.serve.families import cached_family
from scalelab.serve.kvcache import KVPool, extend
from scalelab.serve.loading import LoadedRun, load_run
from scalelab.serve.sampling import SamplingParams


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoadedRun]:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("serve_engine")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SCALELAB_CACHE_DIR", str(root / "cache"))
        yield load_run(train_tiny_run(root))


def _prompts(run: LoadedRun) -> list[list[int]]:
    texts = ["def ", "import email.utils\n", "class Message:\n    ", "x", "return self._headers[", "# "]
    eod = run.tokenizer.eod_id
    return [[eod, *run.tokenizer.encode(t).tolist()] for t in texts]


def _generate(
    run: LoadedRun, prompts: list[list[int]], params: list[SamplingParams], **kw: object
) -> list[list[int]]:
    engine = Engine(run.model, max_batch=max(len(prompts), 1), **kw)  # type: ignore[arg-type]
    jobs = [Job("generate", p, q) for p, q in zip(prompts, params, strict=True)]
    engine.admit(jobs)
    while engine.active:
        engine.decode()
    assert engine.free_slots == len(prompts)
    return [j.generated for j in jobs]


def test_kv_cache_logits_equal_full_forward(run: LoadedRun) -> None:
    model = run.model
    text = "From: someone@example.com\nSubject: a test of the cache\n"
    ids = torch.from_numpy(run.tokenizer.encode(text)[:60].astype("int64"))[None]
    full = model(ids)
    pool = KVPool(cached_family(model), slots=3)  # type: ignore[arg-type]
    slot = torch.tensor([1])
    parts = [extend(pool, slot, ids[:, :20], torch.tensor([0]), torch.tensor([20]))]
    for t in range(20, ids.shape[1]):  # then one token at a time from the cache
        parts.append(extend(pool, slot, ids[:, t : t + 1], torch.tensor([t]), torch.tensor([1])))
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-4, rtol=1e-4)


def test_padded_batch_prefill_equals_each_alone(run: LoadedRun) -> None:
    model = run.model
    prompts = _prompts(run)[:3]
    pool = KVPool(cached_family(model), slots=3)  # type: ignore[arg-type]
    width = max(map(len, prompts))
    tokens = torch.zeros(3, width, dtype=torch.long)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = torch.tensor(p)
    lens = torch.tensor([len(p) for p in prompts])
    batched = extend(pool, torch.arange(3), tokens, torch.zeros(3, dtype=torch.long), lens)
    for i, p in enumerate(prompts):
        alone = model(torch.tensor([p]))[0]
        torch.testing.assert_close(batched[i, : len(p)], alone, atol=1e-4, rtol=1e-4)


def test_batched_and_unbatched_generation_give_the_same_tokens(run: LoadedRun) -> None:
    prompts = _prompts(run)
    params = [
        SamplingParams(max_tokens=n, temperature=t, top_k=k, seed=s)
        for n, t, k, s in [
            (20, 0.8, None, 1),
            (5, 1.0, 40, 2),
            (30, 0.0, None, None),
            (12, 1.3, 5, 3),
            (25, 0.7, None, 4),
            (1, 1.0, None, 5),
        ]
    ]
    batched = _generate(run, prompts, params)
    alone = [_generate(run, [p], [q])[0] for p, q in zip(prompts, params, strict=True)]
    assert batched == alone
    assert all(0 < len(b) <= p.max_tokens for b, p in zip(batched, params, strict=True))
    assert len({tuple(b) for b in batched}) > 1
    again = _generate(run, prompts, params)
    assert again == batched  # a fixed seed is deterministic


def test_requests_finish_independently_and_join_between_steps(run: LoadedRun) -> None:
    engine = Engine(run.model, max_batch=4)
    eod = run.tokenizer.eod_id
    long = Job("generate", [eod, 100, 101], SamplingParams(max_tokens=40, temperature=0.0))
    short = Job("generate", [eod, 102], SamplingParams(max_tokens=3, temperature=0.0))
    engine.admit([long, short])
    steps = 0
    while not short.done:
        engine.decode()
        steps += 1
    assert steps == 2 and not long.done and engine.free_slots == 3  # the short one left; its slot is free
    late = Job("generate", [eod, 103, 104], SamplingParams(max_tokens=4, temperature=0.0))
    engine.admit([late])  # joins while the long one is mid-generation
    while engine.active:
        engine.decode()
    assert (
        late.finished_at is not None and long.finished_at is not None and late.finished_at < long.finished_at
    )
    assert late.generated == _generate(run, [late.ids], [late.params])[0]
    assert long.generated == _generate(run, [long.ids], [long.params])[0]


def test_cancelled_request_frees_its_slot(run: LoadedRun) -> None:
    engine = Engine(run.model, max_batch=2)
    job = Job("generate", [run.tokenizer.eod_id, 65], SamplingParams(max_tokens=50, temperature=0.0))
    engine.admit([job])
    job.cancel()
    engine.decode()
    assert job.finish_reason == "cancelled" and engine.free_slots == 2


def test_prefix_cache_reuses_kv_and_keeps_tokens(run: LoadedRun) -> None:
    eod = run.tokenizer.eod_id
    head = [eod, *run.tokenizer.encode("From: a@example.com\nTo: b@example.com\nSubject: ").tolist()]
    first, second = [*head, *b"hello"], [*head, *b"world!"]
    params = [SamplingParams(max_tokens=8, temperature=0.9, seed=7)]
    cache = PrefixCache(max_bytes=1 << 20, block_tokens=16)
    a = _generate(run, [first], params, prefix_cache=cache)[0]
    assert len(cache.lru) == 1 and cache.lru.bytes > 0
    engine = Engine(run.model, max_batch=1, prefix_cache=cache)
    job = Job("generate", second, params[0])
    engine.admit([job])
    while engine.active:
        engine.decode()
    assert job.prefix_hit_tokens == 48 and cache.lru.hits == 1
    assert job.generated == _generate(run, [second], params)[0]
    assert a == _generate(run, [first], params)[0]


def test_lru_cache_bounded_in_bytes() -> None:
    cache: LRUCache[str] = LRUCache(max_bytes=100)
    for i in range(10):
        assert cache.put(f"k{i}", "v", 30)
    assert cache.bytes <= 100 and len(cache) == 3 and cache.evictions == 7
    assert cache.get("k9") == "v" and cache.get("k0") is None
    assert (cache.hits, cache.misses) == (1, 1)
    assert not cache.put("huge", "v", 101) and cache.bytes <= 100


def test_corrupted_checkpoint_is_refused(tmp_path: Path, run: LoadedRun) -> None:
    import shutil

    bad = tmp_path / "run"
    shutil.copytree(run.run_dir, bad)
    weights = next((bad / "checkpoint").glob("step-*")) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(CheckpointError, match="no checkpoint verifies"):
        load_run(bad)


def test_a_lone_request_does_not_wait_out_the_batching_window(run: LoadedRun) -> None:
    """With a 10 s --max-wait-ms, a lone request is admitted once no other has arrived for the arrival
    gap (2 ms), not after 10 s; the window only bounds how long a burst of arrivals is gathered."""
    import threading

    from scalelab.serve.scheduler import Scheduler

    engine = Engine(run.model, max_batch=4)  # type: ignore[arg-type]
    scheduler = Scheduler(engine, max_batch=4, max_wait_ms=10_000, max_queue=4)
    done = threading.Event()
    job = Job("generate", _prompts(run)[0], SamplingParams(max_tokens=3), on_done=lambda _j: done.set())
    scheduler.start()
    try:
        scheduler.submit(job)
        assert done.wait(5.0), "the lone request waited for the batching window"
    finally:
        scheduler.stop()
    assert job.finish_reason == "length" and job.admitted_at is not None
    assert job.admitted_at - job.submitted_at < 2.0


def test_a_burst_that_fills_the_slots_is_admitted_at_once(
    run: LoadedRun, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Arrivals within a burst do not wake the engine thread, but the one that fills the free slots does:
    with a 10 s arrival gap and window, four requests on four slots are admitted together right away."""
    import threading
    import time

    from scalelab.serve import scheduler as scheduler_module
    from scalelab.serve.scheduler import Scheduler

    monkeypatch.setattr(scheduler_module, "ARRIVAL_GAP_SECONDS", 10.0)
    engine = Engine(run.model, max_batch=4)  # type: ignore[arg-type]
    batches: list[int] = []
    admit = engine.admit
    monkeypatch.setattr(engine, "admit", lambda js: (batches.append(len(js)) if js else None, admit(js)))
    scheduler = Scheduler(engine, max_batch=4, max_wait_ms=10_000, max_queue=4)
    finished = threading.Semaphore(0)
    jobs = [
        Job("generate", p, SamplingParams(max_tokens=2), on_done=lambda _j: finished.release())
        for p in _prompts(run)[:4]
    ]
    scheduler.start()
    try:
        scheduler.submit(jobs[0])
        time.sleep(0.3)  # the engine thread now waits out the (10 s) gap for more arrivals
        for job in jobs[1:]:
            scheduler.submit(job)
        assert all(finished.acquire(timeout=5.0) for _ in jobs), "the full burst waited for the gap"
    finally:
        scheduler.stop()
    assert batches == [4]  # one admission: one batched prefill
