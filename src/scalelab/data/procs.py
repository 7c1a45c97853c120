"""Process pools for the data layer's parallel passes (ingest, statistics).

Workers come from a *forkserver* with the data modules preloaded: the server is a fresh,
single-threaded process, so forking workers from it is safe (unlike forking a parent that runs
torch or tokenizer threads), and workers start in milliseconds because imports — including the
caller's ``__main__`` module — happen once in the server instead of once per worker (spawn).
As with any non-fork start method, a script that starts workers must guard its entry point with
``if __name__ == "__main__":``.

`ordered_map` runs a pass over items with this process as one of the workers (see there).
"""

from __future__ import annotations

import collections
import multiprocessing as mp
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from multiprocessing.context import BaseContext
from multiprocessing.pool import AsyncResult, Pool
from typing import Any, Generic, TypeVar

R = TypeVar("R")

_PRELOAD = ["scalelab.data.ingest", "scalelab.data.stats"]


def worker_context() -> BaseContext:
    """The multiprocessing context data-layer pools use (forkserver where available, else spawn)."""
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(_PRELOAD)
        return ctx
    return mp.get_context("spawn")


class _Item(Generic[R]):
    """One item of `ordered_map`: not yet assigned, queued in the pool, or computed here."""

    __slots__ = ("item", "queued", "done", "result")

    def __init__(self, item: Any) -> None:
        self.item = item
        self.queued: AsyncResult | None = None
        self.done = False
        self.result: Any = None

    @property
    def unassigned(self) -> bool:
        return self.queued is None and not self.done

    def ready(self) -> bool:
        return self.done or (self.queued is not None and self.queued.ready())

    def value(self) -> R:
        return self.result if self.done else self.queued.get()  # type: ignore[union-attr]


def ordered_map(
    here: Callable[[Any], R],
    there: Callable[[Any], R],
    items: Iterable[Any],
    workers: int,
    initializer: Callable[..., object] | None = None,
    initargs: tuple[Any, ...] = (),
) -> Iterator[R]:
    """Results for `items`, in their order, computed by this process and ``workers - 1`` pool processes.

    ``there(item)`` runs in a pool process (it and the items must pickle), ``here(item)`` in this one;
    both must give the same result. The pool starts in a background thread while this process
    computes items itself; from then on at most two items per pool process are queued there, and
    whenever the oldest result is not ready this process computes the next unassigned item instead
    of waiting. So start-up is hidden, this process does a worker's share, at most ``4 * workers``
    items are held at once, and which process computed an item never changes the order of results.
    """
    helpers = workers - 1
    started: Future[Pool] = Future()

    def start() -> None:
        try:
            started.set_result(worker_context().Pool(helpers, initializer=initializer, initargs=initargs))
        except BaseException as err:
            started.set_exception(err)

    starter = threading.Thread(target=start, daemon=True, name="scalelab-pool-start")
    starter.start()
    window: collections.deque[_Item[R]] = collections.deque()
    source = iter(items)
    exhausted = False
    try:
        while True:
            while not exhausted and len(window) < 4 * workers:
                try:
                    window.append(_Item(next(source)))
                except StopIteration:
                    exhausted = True
            if not window:
                return
            if started.done():  # keep the pool busy, two items per process
                queued = sum(1 for x in window if x.queued is not None and not x.queued.ready())
                for x in window:
                    if queued >= 2 * helpers:
                        break
                    if x.unassigned:
                        x.queued = started.result().apply_async(there, (x.item,))
                        queued += 1
            if window[0].ready():
                yield window.popleft().value()
                continue
            todo = next((x for x in window if x.unassigned), None)
            if todo is not None:
                todo.result, todo.done = here(todo.item), True
            elif window[0].queued is not None:
                window[0].queued.wait()
    finally:
        starter.join()
        if started.done() and started.exception() is None:
            started.result().terminate()
