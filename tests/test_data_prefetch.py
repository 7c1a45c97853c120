"""WorkerRing: ordered batches from forked workers through shared slots; errors, deaths, clean shutdown."""

from __future__ import annotations

import gc
import os
import signal
import threading
import time

import numpy as np
import psutil
import pytest

from scalelab.data.prefetch import PrefetchThread, WorkerRing
from scalelab.errors import DataError

SHAPE = (3, 5)


def fill(position: int, out: np.ndarray) -> None:
    out[...] = position * 100 + np.arange(out.size, dtype=out.dtype).reshape(out.shape)


def expected(position: int) -> np.ndarray:
    out = np.empty(SHAPE, dtype=np.int64)
    fill(position, out)
    return out


def children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


def shm_maps(pid: int | str = "self") -> list[str]:
    with open(f"/proc/{pid}/maps") as fh:
        return [line for line in fh if "/dev/shm" in line]


def gone(pids: list[int]) -> bool:
    """True when none of `pids` exists any more (exited and reaped: no zombies either)."""
    return not any(psutil.pid_exists(p) for p in pids)


def ring(start: int = 0, workers: int = 2, depth: int = 2, fn=fill) -> WorkerRing[np.ndarray]:
    return WorkerRing(fn, np.array, SHAPE, np.uint16, start, workers, depth)


@pytest.mark.parametrize(("workers", "depth"), [(1, 1), (2, 2), (3, 1)])
def test_order_and_content_for_any_workers_and_depth(workers, depth):
    with ring(start=7, workers=workers, depth=depth) as r:
        got = [next(r) for _ in range(20)]
    for k, batch in enumerate(got):
        np.testing.assert_array_equal(batch, expected(7 + k))
        assert batch.dtype == np.uint16 and not np.shares_memory(batch, got[k - 1])


def test_close_reaps_workers_and_maps_no_shm_segment():
    before = children()
    r = ring()
    next(r)
    pids = r.pids
    assert len(pids) == 2 and set(pids) <= children() - before
    assert shm_maps() == [] and all(shm_maps(p) == [] for p in pids)  # anonymous mapping only
    r.close()
    r.close()  # idempotent
    assert gone(pids) and children() <= before and shm_maps() == []
    with pytest.raises(StopIteration):
        next(r)


def test_dropped_ring_is_stopped_by_its_finalizer():
    r = ring()
    next(r)
    pids = r.pids
    del r
    gc.collect()
    assert gone(pids)


def fail_at_5(position: int, out: np.ndarray) -> None:
    if position == 5:
        raise ValueError("bad block at 5")
    fill(position, out)


def test_worker_error_is_raised_in_order_with_its_traceback():
    r = ring(fn=fail_at_5)
    pids = r.pids
    got = [next(r) for _ in range(5)]  # positions 0..4, from both workers, all delivered first
    np.testing.assert_array_equal(got[4], expected(4))
    with pytest.raises(ValueError, match="bad block at 5") as info:
        next(r)
    assert any("in loader worker pid" in n and "fail_at_5" in n for n in info.value.__notes__)
    assert gone(pids)


def test_killed_worker_is_reported_not_waited_for():
    r = ring()
    next(r)
    pids = r.pids
    os.kill(pids[1], signal.SIGKILL)
    t0 = time.monotonic()
    with pytest.raises(DataError, match=r"loader worker 1 \(pid \d+\) exited unexpectedly with code -9"):
        for _ in range(10):
            next(r)
    assert time.monotonic() - t0 < 10 and gone(pids)


def test_bad_arguments():
    with pytest.raises(DataError, match="num_workers >= 1"):
        ring(workers=0)


def test_prefetch_thread_order_and_error():
    def make(k: int) -> int:
        if k == 4:
            raise KeyError(k)
        return k

    t = PrefetchThread(make, 1, 2)
    assert [next(t) for _ in range(3)] == [1, 2, 3]
    with pytest.raises(KeyError):
        next(t)


def test_dropped_prefetch_thread_stops_its_thread():
    def prefetching() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name == "scalelab-prefetch"]

    before = prefetching()
    t = PrefetchThread(lambda k: k, 0, 2)
    assert next(t) == 0
    (started,) = [x for x in prefetching() if x not in before]
    del t
    gc.collect()
    started.join(timeout=5)
    assert not started.is_alive()
