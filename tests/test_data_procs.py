"""ordered_map: this process plus a pool, results in input order, errors and early stops handled."""

from __future__ import annotations

import math
import time

import pytest

from proc_helpers import worker_processes
from scalelab.data.procs import ordered_map


def test_results_in_order_computed_here_and_in_the_pool():
    here_calls = []

    def here(x: int) -> int:
        here_calls.append(x)
        time.sleep(0.005)
        return math.isqrt(x)

    items = list(range(0, 40_000, 97))
    assert list(ordered_map(here, math.isqrt, items, 3)) == [math.isqrt(x) for x in items]
    assert 0 < len(here_calls) < len(items)  # both sides worked
    assert list(ordered_map(here, math.isqrt, [], 2)) == []


def slow_abs_isqrt(x: int) -> int:
    time.sleep(0.2)  # slow here, so the pool takes items as soon as it is up
    return math.isqrt(abs(x))


@pytest.mark.parametrize("where", ["here", "there"])
def test_an_error_propagates_and_the_pool_stops(where):
    before = worker_processes()
    here, there = (math.isqrt, abs) if where == "here" else (slow_abs_isqrt, math.isqrt)
    with pytest.raises(ValueError, match="nonnegative"):  # isqrt(-1)
        list(ordered_map(here, there, [4] + [-1] * 30, 2))
    _wait_until(lambda: worker_processes() <= before)


def test_early_stop_terminates_the_pool():
    before = worker_processes()
    it = ordered_map(math.isqrt, math.isqrt, range(10**6), 2)
    assert [next(it) for _ in range(5)] == [0, 1, 1, 1, 2]
    it.close()
    _wait_until(lambda: worker_processes() <= before)


def _wait_until(cond, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not cond():
        assert time.monotonic() < deadline, "pool processes still running"
        time.sleep(0.05)
