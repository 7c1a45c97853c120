"""Background batch producers for the loader: one thread, or worker processes sharing a slot ring.

Both produce batch ``start``, ``start+1``, … strictly in that order, whatever runs them, so the
consumer sees the same sequence with any number of workers. Neither knows what a batch is: the
caller passes the function that fills one.

`PrefetchThread` calls ``make(position)`` in a daemon thread and keeps up to `depth` results ready.

`WorkerRing` runs ``fill(position, out)`` in `num_workers` forked processes that write straight
into a ring of preallocated slots in one anonymous shared mapping; only slot-ready and slot-free
notices (9 and 1 bytes) cross plain pipes, so no batch is ever pickled. Worker ``w`` produces
positions ``start + w + j*num_workers`` into its own `depth` slots, slot ``j % depth``, and may refill
a slot only after the consumer has copied it out, so the consumer reads batch ``k`` from a slot it
can compute itself. Credits for copied slots go back half a worker's slots at a time, so a worker
refills several slots per wake-up, and the consumer reads every notice already in a pipe at once. Why these choices:

- ``fork``, like torch's DataLoader on Linux: workers share the parent's open memmaps, its verified
  shard checksums and the anonymous mapping, and start in milliseconds (no re-import, nothing
  pickled). The workers run only numpy and ``os`` code, never torch or CUDA, so forking a parent
  that has threads or a CUDA context is safe for them.
- An anonymous ``MAP_SHARED`` mapping has no name: nothing appears in ``/dev/shm`` and nothing can
  leak, even when every process is killed.
- A worker blocked on a credit sees EOF when the consumer's end closes or its process dies, and
  the consumer sees EOF when a worker dies, so neither waits forever on the other. `close()` also
  sends an explicit stop, joins, and terminates stragglers; it runs on `close()`, on garbage
  collection and at interpreter exit.
- A worker's exception is pickled (only then) with its traceback attached as a note and re-raised
  by the consumer at the position where it happened.
"""

from __future__ import annotations

import contextlib
import logging
import math
import mmap
import multiprocessing as mp
import os
import pickle
import queue
import signal
import struct
import threading
import traceback
import weakref
from collections.abc import Callable
from multiprocessing.process import BaseProcess
from typing import Any, Generic, TypeVar

import numpy as np

from scalelab.errors import DataError

log = logging.getLogger(__name__)

T = TypeVar("T")

_HEAD = struct.Struct("<cQ")  # worker → consumer notice: tag, then a position or a payload length
_READY = b"R"  # the slot for this position is full
_ERROR = b"E"  # a pickled exception of this length follows; the worker has exited
_CREDIT = b"C"  # consumer → worker: one slot of yours is free again (sent several at a time)
_STOP = b"S"  # consumer → worker: exit now
JOIN_SECONDS = 5.0


# ------------------------------------------------------------------------------------------ thread
class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error


class PrefetchThread(Generic[T]):
    """Produces ``make(start)``, ``make(start+1)``, … in a daemon thread, keeping up to `depth` ready.

    Batches go one way and slot credits the other through two C-level ``queue.SimpleQueue``s: a
    hand-off costs two uncontended C calls, not `queue.Queue`'s Python conditions (which doubled
    the loader's CPU per batch when the consumer waited on every batch). The thread holds no
    reference to this object, so dropping it stops the thread.
    """

    def __init__(self, make: Callable[[int], T], start: int, depth: int) -> None:
        self._items: queue.SimpleQueue = queue.SimpleQueue()
        self._credits: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(max(1, depth)):
            self._credits.put(None)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=_produce,
            args=(make, start, self._items, self._credits, self._stop),
            daemon=True,
            name="scalelab-prefetch",
        )
        self._thread.start()

    def __iter__(self) -> PrefetchThread[T]:
        return self

    def __next__(self) -> T:
        item = self._items.get()
        if isinstance(item, _Failure):
            self.close()
            raise item.error
        self._credits.put(None)
        return item

    def close(self) -> None:
        self._halt()
        self._thread.join(timeout=5)
        with contextlib.suppress(queue.Empty):
            while True:
                self._items.get_nowait()

    def _halt(self) -> None:
        self._stop.set()
        self._credits.put(None)  # wakes a thread waiting for a free slot; it sees the stop

    def __del__(self) -> None:
        self._halt()


def _produce(
    make: Callable[[int], Any],
    k: int,
    items: queue.SimpleQueue,
    credits: queue.SimpleQueue,
    stop: threading.Event,
) -> None:
    """`PrefetchThread`'s loop: one credit (a free slot) per item, until stopped or `make` fails."""
    while True:
        credits.get()
        if stop.is_set():
            return
        try:
            item: Any = make(k)
        except BaseException as err:  # handed to the consumer, re-raised there
            items.put(_Failure(err))
            return
        items.put(item)
        k += 1


# ------------------------------------------------------------------------------------ worker ring
def fork_available() -> bool:
    """Whether `WorkerRing` can run here (it needs the ``fork`` start method)."""
    return "fork" in mp.get_all_start_methods()


class WorkerRing(Generic[T]):
    """Ordered batches ``take(slot)`` for positions ``start, start+1, …`` filled by worker processes.

    `fill(position, out)` writes batch `position` into `out` (an array of `shape` and `dtype`) in a
    worker; `take(view)` runs in this process on the filled slot and must return something that
    does not alias it (the slot is refilled afterwards). `init`, if given, runs once in each worker
    before its first batch (e.g. to renew locks a parent thread might have held at fork time).
    """

    def __init__(
        self,
        fill: Callable[[int, np.ndarray], object],
        take: Callable[[np.ndarray], T],
        shape: tuple[int, ...],
        dtype: np.dtype | type,
        start: int,
        num_workers: int,
        depth: int,
        init: Callable[[], object] | None = None,
    ) -> None:
        if num_workers < 1 or depth < 1:
            raise DataError(f"WorkerRing needs num_workers >= 1 and depth >= 1, got {num_workers}, {depth}")
        if not fork_available():
            raise DataError("loader worker processes need the 'fork' start method; use num_workers=0 here")
        self._take = take
        self._start = start
        self._workers = num_workers
        self._depth = depth
        self._k = 0  # batches handed out
        self._owed = [0] * num_workers  # slots taken out but not yet handed back to their worker
        # Credits go back in batches of half a worker's slots: the worker then refills several
        # slots per wake-up, while the other half keeps this process fed.
        self._credit_batch = max(1, depth // 2)
        dtype = np.dtype(dtype)
        count = num_workers * depth * math.prod(shape)
        self._map = mmap.mmap(-1, max(1, count * dtype.itemsize))  # anonymous, MAP_SHARED
        slots = np.frombuffer(self._map, dtype=dtype, count=count).reshape(num_workers, depth, *shape)
        self._slots: np.ndarray | None = slots
        ctx = mp.get_context("fork")
        self._notices: list[int] = []  # read ends: worker w -> us
        self._unread: list[bytearray] = [bytearray() for _ in range(num_workers)]  # read, not yet used
        self._credits: list[int] = []  # write ends: us -> worker w
        self._procs: list[BaseProcess] = []
        try:
            for w in range(num_workers):
                notice_r, notice_w = os.pipe()
                credit_r, credit_w = os.pipe()
                self._notices.append(notice_r)
                self._credits.append(credit_w)
                ours = [*self._notices, *self._credits]  # a worker holding these would hide EOFs
                proc = ctx.Process(
                    target=_serve,
                    args=(notice_w, credit_r, ours, fill, slots[w], start + w, num_workers, depth, init),
                    name=f"scalelab-loader-{w}",
                    daemon=True,
                )
                try:
                    proc.start()
                finally:
                    os.close(notice_w)  # only the worker holds its ends: EOF on ours means it is gone
                    os.close(credit_r)
                self._procs.append(proc)
        finally:
            self._finalizer = weakref.finalize(
                self, _shutdown, os.getpid(), self._procs, self._notices, self._credits, self._map
            )

    @property
    def pids(self) -> list[int]:
        """Process ids of the workers (for tests and monitoring)."""
        return [p.pid for p in self._procs if p.pid is not None]

    def __iter__(self) -> WorkerRing[T]:
        return self

    def __next__(self) -> T:
        slots = self._slots
        if slots is None or not self._finalizer.alive:
            raise StopIteration
        w, j = self._k % self._workers, self._k // self._workers
        position = self._start + self._k
        head = self._read(w, _HEAD.size)
        if not head:
            proc = self._procs[w]
            proc.join(timeout=1.0)
            self.close()
            raise DataError(
                f"loader worker {w} (pid {proc.pid}) exited unexpectedly with code {proc.exitcode} "
                f"before batch {position} (killed, or out of memory?)"
            )
        tag, value = _HEAD.unpack(head)
        if tag == _ERROR:
            payload = self._read(w, value)
            self.close()
            raise _unpickled_error(payload, w)
        if tag != _READY or value != position:  # cannot happen unless the protocol is broken
            self.close()
            raise DataError(f"loader worker {w} sent {head!r} where batch {position} was expected")
        out = self._take(slots[w, j % self._depth])
        self._owed[w] += 1
        if self._owed[w] >= self._credit_batch:  # one wake-up per credit batch, not per batch
            with contextlib.suppress(OSError):  # a worker that died shows as EOF next time
                os.write(self._credits[w], _CREDIT * self._owed[w])
            self._owed[w] = 0
        self._k += 1
        return out

    def _read(self, w: int, n: int) -> bytes:
        """`n` bytes from worker `w`'s notices, or b"" at end of file. One read takes every notice
        already there, so a worker that is ahead costs one system call per several batches."""
        buf = self._unread[w]
        while len(buf) < n:
            chunk = os.read(self._notices[w], max(n, _HEAD.size * self._depth))
            if not chunk:
                return b""
            buf += chunk
        data = bytes(buf[:n])
        del buf[:n]
        return data

    def close(self) -> None:
        """Stop and reap the workers and release the ring (idempotent)."""
        self._slots = None  # drop our view of the mapping so it can be unmapped
        self._finalizer()

    def __enter__(self) -> WorkerRing[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _serve(
    notices: int,
    credits_fd: int,
    parent_fds: list[int],
    fill: Callable[[int, np.ndarray], object],
    slots: np.ndarray,
    first: int,
    step: int,
    depth: int,
    init: Callable[[], object] | None,
) -> None:
    """Worker main: fill positions first, first+step, … into slots[j % depth], one credit each."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the consumer's to handle; it stops us
    for fd in parent_fds:
        os.close(fd)
    j, credits = 0, depth
    try:
        if init is not None:
            init()
        while True:
            if credits == 0:
                got = os.read(credits_fd, depth)
                if not got or _STOP in got:  # the consumer is gone, or stops us
                    return
                credits = len(got)
            position = first + j * step
            fill(position, slots[j % depth])
            os.write(notices, _HEAD.pack(_READY, position))  # < PIPE_BUF: one atomic write
            credits -= 1
            j += 1
    except BrokenPipeError:
        return  # the consumer closed or died
    except BaseException as err:
        payload = _pickled_error(err)
        with contextlib.suppress(OSError):
            _write_all(notices, _HEAD.pack(_ERROR, len(payload)) + payload)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _pickled_error(err: BaseException) -> bytes:
    """The exception with the worker's traceback as a note; a `DataError` when it does not pickle."""
    note = f"in loader worker pid {os.getpid()}:\n" + "".join(traceback.format_exception(err))
    try:
        err.add_note(note)
        return pickle.dumps(err)
    except Exception:
        return pickle.dumps(DataError(f"loader worker failed: {type(err).__name__}: {err}\n{note}"))


def _unpickled_error(data: bytes, worker: int) -> BaseException:
    try:
        return pickle.loads(data)
    except Exception as err:
        return DataError(f"loader worker {worker} failed, and its exception could not be unpickled ({err})")


def _shutdown(
    owner: int, procs: list[BaseProcess], notices: list[int], credits: list[int], shared: mmap.mmap
) -> None:
    """Stop, join (then terminate, then kill) the workers, close our pipe ends, unmap the ring."""
    if os.getpid() != owner:  # a forked child collecting an inherited ring: not ours to stop
        return
    for fd in credits:  # a stop wakes a worker waiting for a free slot
        with contextlib.suppress(OSError):
            os.write(fd, _STOP)
    for fd in [*notices, *credits]:
        with contextlib.suppress(OSError):
            os.close(fd)
    for p in procs:
        p.join(timeout=JOIN_SECONDS)
    for p in procs:
        if p.is_alive():
            log.warning("loader worker pid %s did not stop within %ss; terminating it", p.pid, JOIN_SECONDS)
            p.terminate()
            p.join(timeout=1.0)
        if p.is_alive():
            p.kill()
            p.join()
    with contextlib.suppress(BufferError):  # a view still alive somewhere: unmapped when it dies
        shared.close()
