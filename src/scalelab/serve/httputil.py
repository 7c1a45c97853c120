"""Small HTTP helpers shared by the native routes (`serve/app.py`) and the OpenAI routes (`serve/openai.py`):
the client-disconnect signal, the Retry-After value, and the route-template label of a request."""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.requests import Request

from scalelab.serve.metrics import UNMATCHED_ROUTE
from scalelab.serve.server import Disconnect

#: seconds a client should wait after a 503 (queue full)
RETRY_AFTER_SECONDS = 1
#: status logged (never sent: the client is gone) when a client disconnects mid-request
CLIENT_CLOSED = 499


def until_disconnected(request: Request) -> Disconnect:
    """An awaitable factory that completes when the client of `request` disconnects.

    It waits on the ASGI `receive` channel (the body has been read; the next message is the disconnect),
    so a waiting request costs one suspended task — not a poll every few milliseconds. Every call
    shares that one reader (several generations of one request may wait at once); it ends by itself
    when the response is complete.
    """
    reader: asyncio.Future[None] | None = None

    async def read() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    async def wait() -> None:
        nonlocal reader
        if reader is None:
            reader = asyncio.ensure_future(read())
        await asyncio.shield(reader)

    return wait


def route_label(scope: dict[str, Any]) -> str:
    """The matched route's path template (`/v1/completions`), or UNMATCHED_ROUTE: never the raw URL."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else UNMATCHED_ROUTE
