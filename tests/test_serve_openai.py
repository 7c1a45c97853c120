"""The official `openai` client against a real `scalelab serve` process on 127.0.0.1: models.list,
completions (plain, list of prompts, n, logprobs, stream=True), chat completions (plain and streamed),
stop strings cut the text where they start, and errors come back in OpenAI's shape."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from readme_text import blocks  # noqa: E402
from scalelab.serve._testing import serve_process, train_tiny_run  # noqa: E402
from scalelab.serve.openai import CHAT_STOP, ChatMessage, render_chat  # noqa: E402

PROMPT = "def "


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("serve_openai")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SCALELAB_CACHE_DIR", str(root / "cache"))
        yield train_tiny_run(root)


@pytest.fixture(scope="module")
def url(run_dir: Path) -> Iterator[str]:
    with serve_process(run_dir, "--threads", "1", "--max-batch", "8") as (base, _):
        yield base


@pytest.fixture(scope="module")
def client(url: str) -> Iterator[openai.OpenAI]:
    c = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=30)
    yield c
    c.close()


@pytest.fixture(scope="module")
def model(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


def test_the_readme_client_block_runs_as_written(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    (block,) = [b for b in blocks("python") if "OpenAI(" in b]
    assert "http://127.0.0.1:8000/v1" in block  # the README's default address; this server's port differs
    exec(compile(block.replace("http://127.0.0.1:8000", url), "README.md", "exec"), {})
    assert capsys.readouterr().out.endswith("\n")  # it printed the completion's text


def test_models_list_names_the_run(client: openai.OpenAI, url: str) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [httpx.get(f"{url}/health", timeout=5).json()["run_id"]]
    assert models[0].owned_by == "scalelab"


def test_completion_plain_and_streamed_agree(client: openai.OpenAI, model: str) -> None:
    kw = {"model": model, "prompt": PROMPT, "max_tokens": 12, "temperature": 0.8, "seed": 3}
    plain = client.completions.create(**kw)
    choice = plain.choices[0]
    assert plain.object == "text_completion" and choice.finish_reason in ("stop", "length")
    assert plain.usage is not None and 0 < plain.usage.completion_tokens <= 12
    assert plain.usage.total_tokens == plain.usage.prompt_tokens + plain.usage.completion_tokens
    chunks = list(client.completions.create(**kw, stream=True))
    streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    assert streamed == choice.text and len(chunks) >= 2
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason


def test_stop_truncates_before_the_stop_string(client: openai.OpenAI, model: str) -> None:
    kw = {"model": model, "prompt": PROMPT, "max_tokens": 40, "temperature": 0.8, "seed": 11}
    full = client.completions.create(**kw).choices[0].text
    assert len(full) >= 8, full
    stop = full[5:8]  # a string the seeded continuation is known to contain
    cut = full[: full.index(stop)]
    got = client.completions.create(**kw, stop=[stop, "\x00"])
    assert got.choices[0].text == cut and got.choices[0].finish_reason == "stop"
    assert got.usage is not None and got.usage.completion_tokens < len(full.encode())
    streamed = client.completions.create(**kw, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == cut


def test_list_of_prompts_n_seed_and_logprobs(client: openai.OpenAI, model: str) -> None:
    kw = {"model": model, "max_tokens": 6, "temperature": 0.9, "seed": 5, "n": 2}
    a = client.completions.create(prompt=["import ", "class "], **kw, logprobs=2)
    b = client.completions.create(prompt=["import ", "class "], **kw)
    assert [c.index for c in a.choices] == [0, 1, 2, 3]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # seeded: reproducible
    lp = a.choices[0].logprobs
    assert lp is not None and len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs)
    assert all(v <= 0 for v in lp.token_logprobs) and all(len(t) <= 2 for t in lp.top_logprobs)
    assert "".join(lp.tokens) == a.choices[0].text or a.choices[0].finish_reason == "stop"


def test_chat_completion_plain_and_streamed(client: openai.OpenAI, model: str) -> None:
    messages = [
        {"role": "system", "content": "You write Python."},
        {"role": "user", "content": "Say hello."},
    ]
    plain = client.chat.completions.create(model=model, messages=messages, max_tokens=10, temperature=0)
    msg = plain.choices[0].message
    assert plain.object == "chat.completion" and msg.role == "assistant" and CHAT_STOP not in msg.content
    chunks = list(
        client.chat.completions.create(
            model=model, messages=messages, max_tokens=10, temperature=0, stream=True
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == msg.content


def test_chat_template_is_the_documented_one() -> None:
    msgs = [
        ChatMessage(role="system", content="S"),
        ChatMessage(role="user", content="hi"),
        ChatMessage(role="assistant", content=[{"type": "text", "text": "yo"}]),  # type: ignore[list-item]
        ChatMessage(role="user", content="again"),
    ]
    assert render_chat(msgs) == "S\n\nUser: hi\n\nAssistant: yo\n\nUser: again\n\nAssistant:"


def test_errors_come_back_in_openai_shape(client: openai.OpenAI, model: str, url: str) -> None:
    with pytest.raises(openai.NotFoundError) as nf:
        client.completions.create(model="no-such-model", prompt="x", max_tokens=2)
    assert nf.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model=model, prompt="x", max_tokens=2, temperature=7)
    assert bad.value.param == "temperature"
    raw = f'{{"model": "{model}", "prompt": "x", "top_p": NaN}}'.encode()
    r = httpx.post(
        f"{url}/v1/completions", content=raw, headers={"content-type": "application/json"}, timeout=10
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_p"
    with pytest.raises(openai.BadRequestError) as long_:
        client.completions.create(model=model, prompt="y" * 500, max_tokens=2)
    assert long_.value.code == "context_length_exceeded"
    r = httpx.post(f"{url}/v1/chat/completions", json={"model": model, "messages": []}, timeout=10)
    err = r.json()["error"]
    assert (
        r.status_code == 400
        and set(err) == {"message", "type", "param", "code"}
        and err["param"] == "messages"
    )


def test_stream_with_n_and_usage(client: openai.OpenAI, model: str) -> None:
    chunks = list(
        client.completions.create(
            model=model, prompt=["a", "b"], n=2, max_tokens=5, seed=1, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        )
    )  # fmt: skip
    finished = {c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason}
    assert finished == {0, 1, 2, 3}
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4 * 5


@pytest.mark.parametrize("stop", [None, "e"])
def test_streamed_logprobs_equal_the_plain_ones(client: openai.OpenAI, model: str, stop: str | None) -> None:
    kw = {"model": model, "prompt": PROMPT, "max_tokens": 16, "temperature": 0.8, "seed": 7, "stop": stop}
    plain = client.completions.create(**kw, logprobs=3).choices[0]
    chunks = [c.choices[0] for c in client.completions.create(**kw, logprobs=3, stream=True) if c.choices]
    assert "".join(c.text for c in chunks) == plain.text
    lps = [c.logprobs for c in chunks if c.logprobs is not None]
    assert plain.logprobs is not None and lps
    assert [t for lp in lps for t in lp.tokens] == plain.logprobs.tokens
    assert [v for lp in lps for v in lp.token_logprobs] == plain.logprobs.token_logprobs
    assert [v for lp in lps for v in lp.top_logprobs] == plain.logprobs.top_logprobs
    assert [v for lp in lps for v in lp.text_offset] == plain.logprobs.text_offset
    assert all(len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) for lp in lps)
    assert all(len(t) <= 3 for lp in lps for t in lp.top_logprobs)


def test_streamed_chat_logprobs_equal_the_plain_ones(client: openai.OpenAI, model: str) -> None:
    kw = {
        "model": model, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 10,
        "temperature": 0.7, "seed": 2, "logprobs": True, "top_logprobs": 2,
    }  # fmt: skip
    plain = client.chat.completions.create(**kw).choices[0]
    chunks = [c.choices[0] for c in client.chat.completions.create(**kw, stream=True) if c.choices]
    assert "".join(c.delta.content or "" for c in chunks) == plain.message.content
    assert plain.logprobs is not None and plain.logprobs.content is not None
    streamed = [e for c in chunks if c.logprobs and c.logprobs.content for e in c.logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in plain.logprobs.content]
    assert all(len(e.top_logprobs) == 2 for e in streamed)
