"""OpenAI-compatible routes beside the native ones: GET /v1/models, POST /v1/completions and
POST /v1/chat/completions (streaming as server-sent events), errors in OpenAI's shape.

What is supported: `prompt` as a string or a list of strings, `max_tokens`, `temperature` (0–2; below
1e-5 it is greedy), `top_p`, `top_k` (an extension, as in vLLM), `stop` (a string or up to 4), `seed`,
`n`, `ignore_eos` (an extension), `logprobs` (completions: 0–5 alternatives; chat: `logprobs` +
`top_logprobs`), `stream` (SSE ending in `data: [DONE]`; `stream_options.include_usage`; with `logprobs`,
each chunk carries the log-probabilities of the tokens its text covers, in OpenAI's per-chunk shape, and
their concatenation equals the plain response's), `usage`. Not supported (400 naming the field): `echo`,
`logit_bias`, `best_of`, non-zero penalties, tools.

Chat template (the served models are base models, so the template is plain text the model has seen):

    {system message}\\n\\n            (each system/developer message, in order)
    User: {user message}\\n\\n
    Assistant: {assistant message}\\n\\n
    ...
    Assistant:

The reply is what follows the final "Assistant:"; generation also stops at "\\nUser:" (the model
starting the next turn), which is not part of the reply.

Errors: {"error": {"message", "type", "param", "code"}} with 400 for an invalid body (`param` names the
field), 404 for an unknown model, 400 `context_length_exceeded` for a prompt longer than the context,
503 + Retry-After when the queue is full, 500 for an engine failure.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from scalelab.serve.httputil import CLIENT_CLOSED, RETRY_AFTER_SECONDS, until_disconnected
from scalelab.serve.sampling import SamplingParams
from scalelab.serve.server import (
    ClientGone,
    Completion,
    InferenceServer,
    PromptTooLong,
    QueueFull,
    ServerError,
    StreamDelta,
    choice_params,
)
from scalelab.serve.text import TokenOffsets
from scalelab.serve.validation import Finite, Text, first_field

log = logging.getLogger(__name__)

__all__ = [
    "CHAT_STOP",
    "ChatCompletionRequest",
    "CompletionRequest",
    "create_router",
    "is_openai_path",
    "openai_error",
    "render_chat",
]

ROUTES = ("/v1/models", "/v1/completions", "/v1/chat/completions")
#: generation of a chat reply also ends where the model starts the user's next turn
CHAT_STOP = "\nUser:"
MAX_PROMPTS = 64
MAX_CHOICES = 16
Seed = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
Zero = Annotated[Finite, Field(ge=0.0, le=0.0, description="penalties are not supported: 0 only")]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _Sampling(BaseModel):
    """Fields common to completions and chat completions."""

    model_config = ConfigDict(extra="forbid")
    model: Text
    temperature: Annotated[Finite, Field(ge=0.0, le=2.0)] | None = 1.0
    top_p: Annotated[Finite, Field(gt=0.0, le=1.0)] | None = 1.0
    top_k: Annotated[int, Field(ge=1, le=1 << 20)] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_CHOICES)] = 1
    stop: Text | Annotated[list[Text], Field(max_length=4)] | None = None
    seed: Seed | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: Zero = 0.0
    frequency_penalty: Zero = 0.0
    user: Text | None = None
    ignore_eos: bool = False  # an extension (as in vLLM): do not stop at the end-of-document token

    def sampling(self, max_tokens: int) -> SamplingParams:
        seed = None if self.seed is None else self.seed % (1 << 63)
        temperature = 1.0 if self.temperature is None else self.temperature
        top_p = 1.0 if self.top_p is None else self.top_p
        return SamplingParams(max_tokens, temperature, self.top_k, seed, top_p, self.ignore_eos)

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(_Sampling):
    """POST /v1/completions body."""

    prompt: Text | Annotated[list[Text], Field(min_length=1, max_length=MAX_PROMPTS)]
    max_tokens: Annotated[int, Field(ge=1, le=65536)] | None = 16
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None
    echo: Literal[False] = False


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | Annotated[list[TextPart], Field(max_length=256)]
    name: Text | None = None

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions body."""

    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=1024)]
    max_tokens: Annotated[int, Field(ge=1, le=65536)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1, le=65536)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=5)] | None = None


def render_chat(messages: Sequence[ChatMessage]) -> str:
    """The plain chat template (module docstring): system text, then User:/Assistant: turns, then "Assistant:"."""
    parts = []
    for m in messages:
        if m.role in ("system", "developer"):
            parts.append(f"{m.text}\n\n")
        else:
            parts.append(f"{'User' if m.role == 'user' else 'Assistant'}: {m.text}\n\n")
    return "".join(parts) + "Assistant:"


def openai_error(
    status: int, message: str, type_: str, param: str | None = None, code: str | None = None
) -> JSONResponse:
    """An error response in OpenAI's shape."""
    headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if status == 503 else None
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def is_openai_path(path: str) -> bool:
    return path in ROUTES


def invalid_body(errors: Sequence[dict[str, Any]]) -> JSONResponse:
    """400 invalid_request_error for a body that failed validation; `param` names the first bad field."""
    param = first_field(errors)
    msg = "; ".join(f"{'.'.join(str(p) for p in e['loc'] if p != 'body')}: {e['msg']}" for e in errors[:5])
    return openai_error(400, msg or "invalid request body", "invalid_request_error", param, None)


async def _guard(coro: Any, param: str) -> Any:
    try:
        result = await coro
        return JSONResponse(result) if isinstance(result, dict) else result  # skips jsonable_encoder
    except PromptTooLong as err:
        return openai_error(400, str(err), "invalid_request_error", param, "context_length_exceeded")
    except QueueFull as err:
        return openai_error(503, f"{err}; retry after {RETRY_AFTER_SECONDS} s", "overloaded_error")
    except ClientGone:
        log.info("client disconnected; request dropped")
        return openai_error(CLIENT_CLOSED, "client closed the request", "client_closed")
    except ServerError as err:
        return openai_error(500, str(err), "server_error")


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def create_router(server: InferenceServer) -> APIRouter:
    """The OpenAI-compatible routes over `server`; the served model's id is its run id."""
    router = APIRouter()
    model_id = server.run.spec.run_id
    created = int(server.started_at)
    decode = server.tokenizer.decode

    def unknown_model(name: str) -> JSONResponse | None:
        if name == model_id:
            return None
        return openai_error(
            404, f"model {name!r} does not exist; this server serves {model_id!r}", "invalid_request_error",
            "model", "model_not_found",
        )  # fmt: skip

    def covered(c: Completion) -> StreamDelta | None:
        """The tokens of a finished choice that its (possibly stop-cut) text covers, with logprobs."""
        if c.logprobs is None or c.top is None:
            return None
        offs = TokenOffsets(decode)
        k = offs.covered(c.tokens, c.text, final=True)
        return StreamDelta(0, c.text, None, c.tokens[:k], offs.offsets[:k], c.logprobs[:k], c.top[:k])

    def completion_logprobs(d: StreamDelta | None) -> dict[str, Any] | None:
        """OpenAI's completions `logprobs` object for the tokens of `d` (a whole choice or a streamed delta)."""
        if d is None or d.logprobs is None or d.top is None:
            return None
        return {
            "tokens": [decode([t]) for t in d.tokens],
            "token_logprobs": d.logprobs,
            "top_logprobs": [{decode([i]): lp for i, lp in alts} for alts in d.top],
            "text_offset": d.offsets,
        }

    def chat_logprobs(d: StreamDelta | None) -> dict[str, Any] | None:
        """OpenAI's chat `logprobs` object ({"content": [...]}) for the tokens of `d`."""
        if d is None or d.logprobs is None or d.top is None:
            return None

        def entry(token: int, lp: float) -> dict[str, Any]:
            s = decode([token])
            return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}

        return {
            "content": [
                {**entry(t, lp), "top_logprobs": [entry(i, a) for i, a in alts]}
                for t, lp, alts in zip(d.tokens, d.logprobs, d.top, strict=True)
            ]
        }

    def stream_response(
        requests: list[tuple[str, SamplingParams]],
        stops: list[str],
        body: Any,
        chat: bool,
        top_logprobs: int | None,
    ) -> StreamingResponse:
        # raises before any byte is sent
        stream = server.stream(requests, stop=stops, top_logprobs=top_logprobs)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{secrets.token_hex(12)}"
        head = {
            "id": rid,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()),
            "model": model_id,
        }
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(
            i: int, text: str | None, finish: str | None, role: bool = False, d: StreamDelta | None = None
        ) -> dict[str, Any]:
            if chat:
                delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
                if text:
                    delta["content"] = text
                choice: dict[str, Any] = {"index": i, "delta": delta, "logprobs": chat_logprobs(d)}
            else:
                choice = {"index": i, "text": text or "", "logprobs": completion_logprobs(d)}
            choice["finish_reason"] = finish
            return {**head, "choices": [choice], **({"usage": None} if include_usage else {})}

        async def events() -> AsyncIterator[str]:
            try:
                if chat:
                    for i in range(len(requests)):
                        yield _sse(chunk(i, None, None, role=True))
                async for d in stream.events():
                    yield _sse(chunk(d.index, d.text, d.finish, d=d))
                if include_usage:
                    usage = _usage(stream.prompt_tokens // body.n, stream.completion_tokens)
                    yield _sse({**head, "choices": [], "usage": usage})
            except ServerError as err:
                yield _sse(
                    {"error": {"message": str(err), "type": "server_error", "param": None, "code": None}}
                )
            finally:
                stream.close()
            yield "data: [DONE]\n\n"

        return StreamingResponse(
            events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    @router.get("/v1/models")
    async def models() -> Any:
        return {
            "object": "list",
            "data": [{"id": model_id, "object": "model", "created": created, "owned_by": "scalelab"}],
        }

    @router.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        if (err := unknown_model(body.model)) is not None:
            return err
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        params = body.sampling(body.max_tokens or 16)
        if body.stream:
            reqs = [(p, choice_params(params, j)) for p in prompts for j in range(body.n)]
            return await _guard(
                _call(stream_response, reqs, body.stops, body, chat=False, top_logprobs=body.logprobs),
                "prompt",
            )

        async def run() -> Any:
            gone = until_disconnected(request)
            per_prompt = await asyncio.gather(
                *(
                    server.complete(
                        p,
                        params,
                        stop=body.stops,
                        top_logprobs=body.logprobs,
                        n=body.n,
                        until_disconnected=gone,
                    )
                    for p in prompts
                )
            )  # all prompts at once, so they share batches
            choices = [c for cs in per_prompt for c in cs]
            return {
                "id": f"cmpl-{secrets.token_hex(12)}",
                "object": "text_completion",
                "created": int(time.time()),
                "model": model_id,
                "choices": [
                    {
                        "index": i,
                        "text": c.text,
                        "logprobs": completion_logprobs(covered(c)),
                        "finish_reason": c.finish_reason,
                    }
                    for i, c in enumerate(choices)
                ],
                "usage": _usage(
                    sum(cs[0].prompt_tokens for cs in per_prompt), sum(len(c.tokens) for c in choices)
                ),
            }

        return await _guard(run(), "prompt")

    @router.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        if (err := unknown_model(body.model)) is not None:
            return err
        prompt = render_chat(body.messages)
        max_tokens = body.max_completion_tokens or body.max_tokens or server.context_tokens
        params = body.sampling(max_tokens)
        stops = [*body.stops, CHAT_STOP]
        top = (body.top_logprobs or 0) if body.logprobs else None
        if body.stream:
            reqs = [(prompt, choice_params(params, j)) for j in range(body.n)]
            return await _guard(
                _call(stream_response, reqs, stops, body, chat=True, top_logprobs=top), "messages"
            )

        async def run() -> Any:
            choices = await server.complete(
                prompt,
                params,
                stop=stops,
                top_logprobs=top,
                n=body.n,
                until_disconnected=until_disconnected(request),
            )
            return {
                "id": f"chatcmpl-{secrets.token_hex(12)}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model_id,
                "choices": [
                    {
                        "index": i,
                        "message": {"role": "assistant", "content": c.text},
                        "logprobs": chat_logprobs(covered(c)),
                        "finish_reason": c.finish_reason,
                    }
                    for i, c in enumerate(choices)
                ],
                "usage": _usage(choices[0].prompt_tokens, sum(len(c.tokens) for c in choices)),
            }

        return await _guard(run(), "messages")

    return router


async def _call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """`fn(*args, **kwargs)` as an awaitable, so its synchronous failures go through `_guard` too."""
    return fn(*args, **kwargs)
