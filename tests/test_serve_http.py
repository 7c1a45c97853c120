"""A real server on loopback (uvicorn in a thread, free port): same tokens batched and unbatched, every
kind of bad input gets its status code, a full queue gets 503 + Retry-After, a client that disconnects
frees its slot, caches show in /metrics — and the server still answers /health after each."""

from __future__ import annotations

import asyncio
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from scalelab.serve._testing import train_tiny_run  # noqa: E402
from scalelab.serve.app import BackgroundServer  # noqa: E402
from scalelab.serve.server import InferenceServer, ServeConfig  # noqa: E402

MAX_QUEUE = 4
MAX_BATCH = 8


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("serve_http")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SCALELAB_CACHE_DIR", str(root / "cache"))
        yield train_tiny_run(root)


@pytest.fixture(scope="module")
def served(run_dir: Path) -> Iterator[tuple[InferenceServer, str]]:
    config = ServeConfig(max_batch=MAX_BATCH, max_wait_ms=50, max_queue=MAX_QUEUE, prefix_block_tokens=16)
    server = InferenceServer.from_run_dir(run_dir, config)
    with BackgroundServer(server) as bg:
        yield server, bg.url


def _metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, flags=re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


def _healthy(url: str) -> None:
    r = httpx.get(f"{url}/health", timeout=5)
    assert r.status_code == 200 and r.json()["status"] == "ok"


REQUESTS = [
    {"prompt": "def ", "max_tokens": 24, "temperature": 0.8, "seed": 1},
    {"prompt": "import email", "max_tokens": 6, "temperature": 1.0, "top_k": 20, "seed": 2},
    {"prompt": "", "max_tokens": 16, "temperature": 0.0},
    {"prompt": "class Header:\n    def __init__(self, ", "max_tokens": 20, "temperature": 1.2, "seed": 3},
    {"prompt": "# Copyright", "max_tokens": 3, "temperature": 0.7, "top_k": 3, "seed": 4},
    {"prompt": "return", "max_tokens": 12, "temperature": 0.9, "seed": 5},
]


async def _concurrently(url: str, bodies: list[dict[str, Any]], path: str = "/v1/generate") -> list[Any]:
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        return await asyncio.gather(*(client.post(path, json=b) for b in bodies))


def test_batched_and_unbatched_generation_give_the_same_tokens(
    served: tuple[InferenceServer, str], run_dir: Path
) -> None:
    server, url = served
    before = server.metrics.value("scalelab_serve_generated_tokens_total")
    responses = asyncio.run(_concurrently(url, REQUESTS))
    assert [r.status_code for r in responses] == [200] * len(REQUESTS), [r.text for r in responses]
    batched = [r.json() for r in responses]
    assert all(not b["cached"] for b in batched), batched
    hist = server.metrics.render().decode()
    count = _metric(hist, "scalelab_serve_decode_batch_size_count")
    assert _metric(hist, "scalelab_serve_decode_batch_size_sum") > count  # some decode steps were batched
    assert server.metrics.value("scalelab_serve_generated_tokens_total") > before

    single = InferenceServer.from_run_dir(run_dir, ServeConfig(max_batch=1, response_cache_bytes=0))
    with BackgroundServer(single) as bg, httpx.Client(base_url=bg.url, timeout=30) as client:
        alone = [client.post("/v1/generate", json=b).json() for b in REQUESTS]
    assert [b["tokens"] for b in batched] == [a["tokens"] for a in alone]
    assert [b["text"] for b in batched] == [a["text"] for a in alone]
    _healthy(url)


def test_bad_inputs_get_their_status_and_the_server_keeps_serving(
    served: tuple[InferenceServer, str],
) -> None:
    server, url = served
    ctx = server.context_tokens
    with httpx.Client(base_url=url, timeout=10) as c:
        r = c.post("/v1/generate", content=b'{"prompt": "x", ', headers={"content-type": "application/json"})
        assert r.status_code == 422 and "JSON" in r.text
        for body, field in [
            ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
            ({"prompt": "x", "temperature": -1}, "temperature"),
            ({"prompt": "x", "top_k": 0}, "top_k"),
            ({"prompt": "x", "seed": -3}, "seed"),
            ({"prompt": 12}, "prompt"),
            ({"max_tokens": 4}, "prompt"),
            ({"prompt": "x", "bogus": 1}, "bogus"),
        ]:
            r = c.post("/v1/generate", json=body)
            assert r.status_code == 422, body
            assert any(field in e["loc"] for e in r.json()["detail"]), (body, r.json())
        r = c.post("/v1/score", json={"text": ""})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "text"
        r = c.post("/v1/generate", json={"prompt": "y" * (ctx + 5)})
        assert r.status_code == 413
        detail = r.json()["detail"]
        assert (
            detail["field"] == "prompt"
            and detail["limit_tokens"] == ctx - 1
            and str(ctx - 1) in detail["message"]
        )
        r = c.post("/v1/score", json={"text": "z" * (ctx + 1)})
        assert r.status_code == 413 and r.json()["detail"]["limit_tokens"] == ctx
        assert (
            c.post("/v1/generate", json={"prompt": "ok", "max_tokens": 2, "temperature": 0}).status_code
            == 200
        )
    _healthy(url)


def test_full_queue_gets_503_with_retry_after(served: tuple[InferenceServer, str]) -> None:
    server, url = served
    n = MAX_BATCH + MAX_QUEUE + 6

    async def main() -> list[Any]:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            with server.scheduler.paused():  # the engine holds still: requests pile up
                tasks = [
                    asyncio.create_task(
                        client.post("/v1/generate", json={"prompt": f"p{i}", "max_tokens": 4, "seed": i})
                    )
                    for i in range(n)
                ]
                deadline = time.monotonic() + 10
                while (
                    sum(t.done() for t in tasks) < n - MAX_BATCH - MAX_QUEUE and time.monotonic() < deadline
                ):
                    await asyncio.sleep(0.01)
                assert server.scheduler.waiting_beyond_slots <= MAX_QUEUE  # bounded, never more
            return await asyncio.gather(*tasks)

    responses = asyncio.run(main())
    codes = [r.status_code for r in responses]
    assert codes.count(503) == n - MAX_BATCH - MAX_QUEUE and set(codes) == {200, 503}
    assert all(r.headers["retry-after"] == "1" for r in responses if r.status_code == 503)
    assert server.metrics.value("scalelab_serve_rejected_total") >= codes.count(503)
    assert server.scheduler.queue_depth == 0
    _healthy(url)


def test_client_disconnect_frees_its_slot(served: tuple[InferenceServer, str]) -> None:
    server, url = served
    host, port = url.removeprefix("http://").split(":")
    before = server.metrics.value("scalelab_serve_cancelled_total")
    body = b'{"prompt": "a long one", "max_tokens": 50, "temperature": 0.5, "seed": 11}'
    with server.scheduler.paused():
        sock = socket.create_connection((host, int(port)), timeout=5)
        sock.sendall(
            b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        time.sleep(0.3)  # the request is queued (or taken) but cannot advance
        sock.close()  # the client goes away
        deadline = time.monotonic() + 5
        while server.scheduler.queue_depth and time.monotonic() < deadline:
            time.sleep(0.02)
    deadline = time.monotonic() + 10
    while server.metrics.value("scalelab_serve_cancelled_total") <= before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.metrics.value("scalelab_serve_cancelled_total") == before + 1
    assert server.scheduler.active == 0 and server.engine.free_slots == MAX_BATCH
    _healthy(url)


def test_caches_hit_and_show_in_metrics(served: tuple[InferenceServer, str]) -> None:
    server, url = served
    head = "From: a@example.com\nTo: b@example.com\nSubject: re: "
    with httpx.Client(base_url=url, timeout=10) as c:
        body = {"prompt": head + "one", "max_tokens": 5, "temperature": 0.0}
        first, second = c.post("/v1/generate", json=body).json(), c.post("/v1/generate", json=body).json()
        assert not first["cached"] and second["cached"] and first["tokens"] == second["tokens"]
        other = c.post("/v1/generate", json={"prompt": head + "two", "max_tokens": 5, "seed": 9}).json()
        assert other["prefix_cached_tokens"] >= 48
        text = c.get("/metrics").text
    for cache in ("response", "prefix"):
        label = f'{{cache="{cache}"}}'
        assert _metric(text, f"scalelab_serve_cache_hits_total{label}") >= 1
        assert 0 < _metric(text, f"scalelab_serve_cache_hit_rate{label}") <= 1
        assert (
            0
            < _metric(text, f"scalelab_serve_cache_bytes{label}")
            <= _metric(text, f"scalelab_serve_cache_max_bytes{label}")
        )
    for name in (
        "scalelab_serve_queue_depth",
        "scalelab_serve_tokens_per_second",
        "scalelab_serve_batch_occupancy",
        "scalelab_serve_decode_batch_size_count",
    ):
        _metric(text, name)
    assert 'scalelab_serve_request_latency_seconds_bucket{le="+Inf",route="/v1/generate"}' in text


def test_score_is_the_models_log_likelihood(served: tuple[InferenceServer, str]) -> None:
    server, url = served
    text = "import sys\n"
    got = httpx.post(f"{url}/v1/score", json={"text": text}, timeout=10).json()
    ids = torch.tensor([server.encode(text)])
    with torch.no_grad():
        logp = torch.log_softmax(server.model(ids[:, :-1]), dim=-1)[0]
    expected = float(logp[torch.arange(ids.shape[1] - 1), ids[0, 1:]].sum())
    assert got["tokens"] == len(text.encode()) and got["logprob"] == pytest.approx(expected, abs=1e-3)


def test_metrics_are_valid_prometheus_labelled_by_route_template(served: tuple[InferenceServer, str]) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    server, url = served

    def series(text: str) -> set[tuple[str, tuple[tuple[str, str], ...]]]:
        return {
            (s.name, tuple(sorted(s.labels.items())))
            for fam in text_string_to_metric_families(text)
            for s in fam.samples
        }

    with httpx.Client(base_url=url, timeout=10) as c:
        c.post("/v1/generate", json={"prompt": "a", "max_tokens": 2, "seed": 1})
        c.get("/no/such/url/0")
        before = series(c.get("/metrics").text)
        for i in range(1, 25):  # every unknown URL falls into the one `unmatched` series
            assert c.get(f"/no/such/url/{i}?q={i}").status_code == 404
            assert c.post(f"/v1/generate/{i}", json={}).status_code in (404, 405)
        text = c.get("/metrics").text
    after = series(text)
    routes = {dict(lbl).get("route") for _, lbl in after if dict(lbl).get("route")}
    assert routes <= {"/v1/generate", "/v1/score", "/health", "/metrics", "/v1/completions", "unmatched"}
    assert {n for n, _ in after - before} <= {
        "scalelab_serve_requests_total",
        "scalelab_serve_requests_created",
    }
    families = {fam.name: fam.type for fam in text_string_to_metric_families(text)}
    for name, kind in {
        "scalelab_serve_request_latency_seconds": "histogram",
        "scalelab_serve_time_to_first_token_seconds": "histogram",
        "scalelab_serve_decode_batch_size": "histogram",
        "scalelab_serve_step_seconds": "histogram",
        "scalelab_serve_tokens_per_second": "gauge",
        "scalelab_serve_batch_occupancy": "gauge",
        "scalelab_serve_queue_depth": "gauge",
        "scalelab_serve_cache_hit_rate": "gauge",
        "scalelab_serve_generated_tokens": "counter",
        "scalelab_serve_requests": "counter",
    }.items():
        assert families.get(name) == kind, (name, families.get(name))
    assert server.metrics.value("scalelab_serve_request_latency_seconds_count", route="unmatched") >= 25


def test_dropped_stream_frees_its_slot(served: tuple[InferenceServer, str]) -> None:
    server, url = served
    before = server.metrics.value("scalelab_serve_cancelled_total")
    body = {
        "model": server.run.spec.run_id,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 40,
        "stream": True,
    }
    with server.scheduler.paused():  # the engine holds still: the request cannot finish on its own
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=10) as r:
            assert r.status_code == 200
            assert '"role": "assistant"' in next(r.iter_lines())  # the stream has started; now leave
    deadline = time.monotonic() + 10
    while server.metrics.value("scalelab_serve_cancelled_total") <= before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.metrics.value("scalelab_serve_cancelled_total") == before + 1
    assert server.scheduler.active == 0 and server.engine.free_slots == MAX_BATCH
    _healthy(url)


def test_the_serving_process_hides_its_startup_objects_from_the_collector(
    served: tuple[InferenceServer, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`run` freezes what is loaded before serving (a full collection of it paused both threads ~150 ms
    under load) and shortens the GIL switch interval, for the time it serves only."""
    import gc
    import sys

    import uvicorn

    from scalelab.serve import app as app_module

    server, _ = served
    seen: dict[str, float] = {}

    def fake_run(self: uvicorn.Server) -> None:
        seen["frozen"] = gc.get_freeze_count()
        seen["switch"] = sys.getswitchinterval()

    monkeypatch.setattr(uvicorn.Server, "run", fake_run)
    before = sys.getswitchinterval()
    app_module.run(server, port=0)
    assert seen["frozen"] > 10_000  # the model, torch, FastAPI…: everything alive at start
    assert seen["switch"] == app_module.GIL_SWITCH_SECONDS
    assert gc.get_freeze_count() == 0 and sys.getswitchinterval() == before
