"""Bad input never 500s: hypothesis throws request bodies at a real server on loopback — lone surrogates,
NaN/Infinity, huge integers, extreme temperatures, wrong types, unknown fields, broken JSON — and every
known-invalid body gets a 4xx, no body gets a 5xx, and the server keeps serving after all of them."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from scalelab.serve._testing import train_tiny_run  # noqa: E402
from scalelab.serve.app import BackgroundServer  # noqa: E402
from scalelab.serve.server import InferenceServer, ServeConfig  # noqa: E402

FUZZ = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
    derandomize=True,
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[InferenceServer, httpx.Client, str]]:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("serve_fuzz")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SCALELAB_CACHE_DIR", str(root / "cache"))
        run_dir: Path = train_tiny_run(root, **{"train.tokens": 8 * 64 * 5})
    srv = InferenceServer.from_run_dir(run_dir, ServeConfig(max_batch=4, max_queue=64))
    with BackgroundServer(srv) as bg, httpx.Client(base_url=bg.url, timeout=30) as client:
        yield srv, client, srv.run.spec.run_id


def _post(client: httpx.Client, path: str, body: Any) -> httpx.Response:
    raw = json.dumps(body, allow_nan=True).encode()  # NaN/Infinity as JSON extensions; surrogates as \ud8xx
    return client.post(path, content=raw, headers={"content-type": "application/json"})


def _healthy(client: httpx.Client) -> None:
    r = client.get("/health")
    assert r.status_code == 200 and r.json()["status"] == "ok", r.text


SURROGATES = st.text(st.characters(categories=["Cs"]), min_size=1, max_size=3)
TEXT_WITH_SURROGATE = st.tuples(st.text(max_size=5), SURROGATES, st.text(max_size=5)).map("".join)
NONFINITE = st.sampled_from([math.nan, math.inf, -math.inf])
HUGE_INT = st.one_of(st.integers(min_value=2**63), st.integers(max_value=-(2**63) - 1))
WEIRD = st.one_of(
    NONFINITE,
    HUGE_INT,
    st.floats(),
    st.integers(),
    st.text(max_size=8),
    TEXT_WITH_SURROGATE,
    st.booleans(),
    st.none(),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)

# field → values that are invalid for it on every route
INVALID = {
    "prompt": st.one_of(
        TEXT_WITH_SURROGATE, st.integers(), NONFINITE, st.lists(TEXT_WITH_SURROGATE, min_size=1)
    ),
    "max_tokens": st.one_of(HUGE_INT, NONFINITE, st.integers(max_value=0)),
    "temperature": st.one_of(
        NONFINITE, st.floats(min_value=101, allow_infinity=False), st.floats(max_value=-1e-300)
    ),
    "seed": st.one_of(HUGE_INT, NONFINITE),
    "top_p": st.one_of(NONFINITE, st.floats(min_value=1.0001, allow_infinity=False), st.just(0.0)),
}


def _native(model: str) -> dict[str, Any]:
    return {"prompt": "def ", "max_tokens": 3, "temperature": 0.7, "seed": 1}


def _completion(model: str) -> dict[str, Any]:
    return {"model": model, "prompt": "def ", "max_tokens": 3, "temperature": 0.7, "seed": 1}


def _chat(model: str) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "seed": 1}


ROUTES = [("/v1/generate", _native), ("/v1/completions", _completion), ("/v1/chat/completions", _chat)]


@FUZZ
@given(route=st.sampled_from(ROUTES), field=st.sampled_from(sorted(INVALID)), data=st.data())
def test_known_invalid_field_is_4xx(server: Any, route: Any, field: str, data: st.DataObject) -> None:
    _, client, model = server
    path, make = route
    body = make(model)
    value = data.draw(INVALID[field])
    if path == "/v1/chat/completions" and field == "prompt":
        body["messages"][0]["content"] = value  # the chat equivalent of a prompt
    else:
        body[field] = value
    r = _post(client, path, body)
    assert 400 <= r.status_code < 500, (path, body, r.status_code, r.text)
    if path != "/v1/generate":
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}


@FUZZ
@given(
    route=st.sampled_from(ROUTES), key=st.text(max_size=12) | SURROGATES, value=WEIRD, replace=st.booleans()
)
def test_any_field_value_is_never_5xx(server: Any, route: Any, key: str, value: Any, replace: bool) -> None:
    _, client, model = server
    path, make = route
    body = make(model)
    if replace and body:
        key = sorted(body)[len(key) % len(body)]
    body[key] = value
    r = _post(client, path, body)
    assert r.status_code < 500, (path, body, r.status_code, r.text)
    json.loads(r.text)  # the error (or the answer) is valid JSON


@FUZZ
@given(path=st.sampled_from([p for p, _ in ROUTES]), raw=st.binary(max_size=64))
def test_raw_bytes_are_never_5xx(server: Any, path: str, raw: bytes) -> None:
    _, client, _ = server
    r = client.post(path, content=raw, headers={"content-type": "application/json"})
    assert 400 <= r.status_code < 500, (raw, r.status_code, r.text)


@pytest.mark.parametrize(
    "raw",
    [
        b'{"prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}",  # beyond Python's int-parsing limit
        b'{"prompt": "x", "temperature": 1e999}',
        b'{"prompt": "\\ud800"}',
        b'{"prompt": "\\udfff\\ud800", "temperature": NaN}',
        b"[" * 5000 + b"]" * 5000,  # deeper than the JSON parser's recursion limit
    ],
)
def test_pathological_json_is_4xx(server: Any, raw: bytes) -> None:
    _, client, _ = server
    for path in ("/v1/generate", "/v1/completions"):
        r = client.post(path, content=raw, headers={"content-type": "application/json"})
        assert 400 <= r.status_code < 500, (path, r.status_code, r.text)
    _healthy(client)


def test_tiny_temperature_is_greedy_not_nan(server: Any) -> None:
    _, client, model = server
    body = {"prompt": "import ", "max_tokens": 8}
    tiny = client.post("/v1/generate", json={**body, "temperature": 5e-324, "seed": 3}).json()
    greedy = client.post("/v1/generate", json={**body, "temperature": 0.0}).json()
    assert tiny["tokens"] == greedy["tokens"] and len(tiny["tokens"]) > 0
    r = client.post(
        "/v1/completions", json={"model": model, "prompt": "import ", "max_tokens": 8, "temperature": 5e-324}
    )
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == greedy["text"]


def test_server_still_serves_after_the_fuzzing(server: Any) -> None:
    srv, client, _ = server
    _healthy(client)
    r = client.post("/v1/generate", json={"prompt": "ok", "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200 and srv.engine.free_slots == srv.config.max_batch
    assert 'code="500"' not in client.get("/metrics").text
