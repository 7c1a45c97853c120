"""Process pools for the data layer's parallel passes (ingest, statistics).

Workers come from a *forkserver* with the data modules preloaded: the server is a fresh,
single-threaded process, so forking workers from it is safe (unlike forking a parent that runs
torch or tokenizer threads), and workers start in milliseconds because imports — including the
caller's ``__main__`` module — happen once in the server instead of once per worker (spawn).
As with any non-fork start method, a script that starts workers must guard its entry point with
``if __name__ == "__main__":``.

`ordered_map` runs a pass over items with this process as one of the workers (see there);
`BackgroundCall` runs one call in a worker while this process goes on.
"""

from __future__ import annotations

import collections
import multiprocessing as mp
import pickle
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from multiprocessing.connection import Connection
from multiprocessing.context import BaseContext
from multiprocessing.pool import ExceptionWithTraceback  # type: ignore[attr-defined]
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


_PIPE_BYTES = 1 << 20  # a result this size fits in the pipe: the worker goes on without waiting


def _enlarge_pipe(fd: int) -> None:
    """Make a pipe hold `_PIPE_BYTES` where the OS allows (Linux), so writing a result does not
    wait for the reader (64 KiB by default: a large result would take many round trips)."""
    try:
        import fcntl

        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, _PIPE_BYTES)  # type: ignore[attr-defined]
    except (ImportError, AttributeError, OSError):  # not Linux, or above the allowed size
        pass


def _serve(
    tasks: Connection, results: Connection, initializer: Callable[..., object] | None, initargs: tuple
) -> None:
    """A worker process: ``(function, item)`` in, ``(True, result)`` or ``(False, error)`` out, in order."""
    failed: BaseException | None = None
    if initializer is not None:
        try:
            initializer(*initargs)
        except BaseException as err:  # every task gets this error: the caller sees it in order
            failed = err
    while True:
        try:
            task = tasks.recv()
        except EOFError:
            return
        except BaseException as err:  # a task that does not unpickle: its reply is the error
            _reply(results, False, err)
            continue
        if task is None:
            return
        try:
            if failed is not None:
                raise failed
            fn, item = task
            result = fn(item)
        except BaseException as err:
            _reply(results, False, err)
        else:
            _reply(results, True, result)


def _reply(results: Connection, ok: bool, value: Any) -> None:
    if not ok:
        value = ExceptionWithTraceback(value, value.__traceback__)
    try:
        results.send((ok, value))
    except (pickle.PicklingError, TypeError, AttributeError) as err:  # a result that does not pickle
        results.send((False, ExceptionWithTraceback(err, err.__traceback__)))


class _Worker:
    """One pool process with two one-way pipes: items down one, results up the other.

    Results are read by the caller's thread when it looks for them (no handler threads in this
    process competing for the GIL), and the result pipe is enlarged so a worker writes a result
    and goes on to its next item without waiting for that.
    """

    def __init__(self, ctx: BaseContext, initializer: Callable[..., object] | None, initargs: tuple) -> None:
        task_reader, self.tasks = ctx.Pipe(duplex=False)
        self.results, result_writer = ctx.Pipe(duplex=False)
        _enlarge_pipe(result_writer.fileno())
        self.assigned: collections.deque[_Item[Any]] = collections.deque()  # in the order sent
        self.dead = False  # the process is gone: its items failed, it gets no more
        self.proc = ctx.Process(  # type: ignore[attr-defined]
            target=_serve,
            args=(task_reader, result_writer, initializer, initargs),
            daemon=True,
            name="scalelab-worker",
        )
        try:
            self.proc.start()
        finally:
            task_reader.close()
            result_writer.close()

    def send(self, fn: Callable[[Any], Any], item: _Item[Any]) -> None:
        """Queue `item` here (an item that does not pickle raises, and is not queued)."""
        try:
            self.tasks.send((fn, item.item))
        except OSError:  # the process is gone (EPIPE): the item fails with the others queued here
            item.worker = self
            self.assigned.append(item)
            self._died()
            return
        item.worker = self
        self.assigned.append(item)

    def receive(self, block: bool) -> bool:
        """Take the oldest assigned item's result if it is here (or, with `block`, once it is)."""
        if not self.assigned or not (block or self.results.poll()):
            return False
        try:
            ok, value = self.results.recv()
        except (EOFError, OSError):
            self._died()
            return True
        item = self.assigned.popleft()
        item.result, item.failed, item.done = value, not ok, True
        return True

    def _died(self) -> None:
        self.dead = True
        while self.assigned:
            item = self.assigned.popleft()
            item.result = RuntimeError(f"a scalelab worker process (pid {self.proc.pid}) died")
            item.failed = item.done = True

    def stop(self) -> None:
        if self.proc.is_alive():
            self.proc.terminate()
        self.proc.join()
        self.tasks.close()
        self.results.close()


class _Item(Generic[R]):
    """One item of `ordered_map`: not yet assigned, sent to a worker, or computed (here or there)."""

    __slots__ = ("item", "worker", "done", "failed", "result")

    def __init__(self, item: Any) -> None:
        self.item = item
        self.worker: _Worker | None = None
        self.done = False
        self.failed = False
        self.result: Any = None

    @property
    def unassigned(self) -> bool:
        return self.worker is None and not self.done

    def value(self) -> R:
        if self.failed:
            raise self.result
        return self.result


def _start_workers(
    n: int, initializer: Callable[..., object] | None, initargs: tuple[Any, ...]
) -> list[_Worker]:
    ctx = worker_context()
    workers: list[_Worker] = []
    try:
        for _ in range(n):
            workers.append(_Worker(ctx, initializer, initargs))
    except BaseException:
        for w in workers:
            w.stop()
        raise
    return workers


def ordered_map(
    here: Callable[[Any], R],
    there: Callable[[Any], R],
    items: Iterable[Any],
    workers: int,
    initializer: Callable[..., object] | None = None,
    initargs: tuple[Any, ...] = (),
) -> Iterator[R]:
    """Results for `items`, in their order, computed by this process and ``workers - 1`` pool processes.

    ``there(item)`` runs in a pool process (it, the items and the results must pickle), ``here(item)``
    in this one; both must give the same result. The pool starts in a background thread while this
    process computes items itself; from then on at most two items per pool process are queued
    there, and whenever the oldest result is not ready this process computes the next unassigned
    item instead of waiting. So start-up is hidden, this process does a worker's share, at most
    ``4 * workers`` items are held at once, and which process computed an item never changes the
    order of results. Results are read from the workers' pipes by this thread as they arrive (a
    `multiprocessing.Pool` reads them in handler threads, which fought the busy caller for the GIL
    and left large results — token arrays — stuck in the pipe, their worker idle). A pool process's
    error is raised where its item's result would be, one from ``here`` at once; the pool processes
    are stopped when the iterator ends (or is closed).
    """
    helpers = workers - 1
    started: Future[list[_Worker]] = Future()

    def start() -> None:
        try:
            started.set_result(_start_workers(helpers, initializer, initargs))
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
            if started.done():
                for w in started.result():  # collect what arrived; keep two items per process queued
                    while w.receive(block=False):
                        pass
                    for x in window:
                        if w.dead or len(w.assigned) >= 2:
                            break
                        if x.unassigned:
                            w.send(there, x)
            head = window[0]
            if head.done:
                yield window.popleft().value()
                continue
            todo = next((x for x in window if x.unassigned), None)
            if todo is not None:
                todo.result, todo.done = here(todo.item), True
            else:  # the head is queued in a worker (every item is assigned or done)
                assert head.worker is not None
                head.worker.receive(block=True)
    finally:
        starter.join()
        if started.done() and started.exception() is None:
            for w in started.result():
                w.stop()


class BackgroundCall(Generic[R]):
    """``fn(arg)`` in one worker process while this one goes on (`fn` and `arg` must pickle).

    The process starts in a background thread, as `ordered_map`'s pool does, so creating this
    never waits. `ready` tells without waiting whether `result` would; `result` returns the value
    or raises the call's error; `close` (always call it) stops the process.
    """

    def __init__(self, fn: Callable[[Any], R], arg: Any) -> None:
        self._item: _Item[R] = _Item(arg)
        self._started: Future[_Worker] = Future()
        self._thread = threading.Thread(
            target=self._start, args=(fn,), daemon=True, name="scalelab-background-start"
        )
        self._thread.start()

    def _start(self, fn: Callable[[Any], R]) -> None:
        try:
            worker = _start_workers(1, None, ())[0]
        except BaseException as err:
            self._started.set_exception(err)
            return
        try:
            worker.send(fn, self._item)
        except BaseException as err:  # `fn` or `arg` does not pickle
            worker.stop()
            self._started.set_exception(err)
            return
        self._started.set_result(worker)

    def ready(self) -> bool:
        if not self._started.done():
            return False
        if self._started.exception() is not None or self._item.done:
            return True
        self._started.result().receive(block=False)
        return self._item.done

    def result(self) -> R:
        worker = self._started.result()  # raises when the process could not start
        if not self._item.done:
            worker.receive(block=True)
        return self._item.value()

    def close(self) -> None:
        self._thread.join()
        if self._started.done() and self._started.exception() is None:
            self._started.result().stop()
