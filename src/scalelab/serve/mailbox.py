"""Calls from the engine thread onto an asyncio event loop, with one wake-up of the loop per batch of calls.

`loop.call_soon_threadsafe` writes to the loop's self-pipe at every call, and each write wakes the loop
thread, which then competes for the GIL with the engine thread still finishing its step. When 32
requests finish in the same decode step that was 32 wake-ups; through a mailbox it is one (or a few),
and the loop runs the queued calls in order when it gets to them.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import weakref
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


class LoopMailbox:
    """`call(fn, *args)` from any thread runs `fn(*args)` on `loop`, in call order."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        # a weak reference: the registry below maps loops weakly, and a strong one here would keep every
        # loop that ever had a mailbox alive (each `asyncio.run` makes one)
        self._loop = weakref.ref(loop)
        self._calls: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []
        self._lock = threading.Lock()

    def call(self, fn: Callable[..., Any], *args: Any) -> None:
        with self._lock:
            self._calls.append((fn, args))
            if len(self._calls) > 1:
                return  # a drain is already scheduled and will run this call too
            try:
                loop = self._loop()
                if loop is None:
                    raise RuntimeError("the event loop of this mailbox is gone")
                loop.call_soon_threadsafe(self._drain)
            except BaseException:
                self._calls.clear()  # the loop is closed: nothing will drain, so schedule afresh next time
                raise

    def _drain(self) -> None:
        with self._lock:
            calls, self._calls = self._calls, []
        for fn, args in calls:
            try:
                fn(*args)
            except Exception:  # noqa: BLE001 — one failing call must not drop the ones after it
                log.exception("mailbox call %r failed", fn)


_mailboxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopMailbox] = weakref.WeakKeyDictionary()
_mailboxes_lock = threading.Lock()


def mailbox(loop: asyncio.AbstractEventLoop) -> LoopMailbox:
    """The one mailbox of `loop` (so all calls to a loop share its wake-ups)."""
    with _mailboxes_lock:
        box = _mailboxes.get(loop)
        if box is None:
            box = _mailboxes[loop] = LoopMailbox(loop)
        return box
