"""The data layer's passes over Ray tasks (`--executor ray`): results in item order, a bounded window.

`ray_ordered_map(fn, items)` is what `procs.ordered_map` is on one machine: `fn(item, *shared)` runs as a
Ray task wherever the cluster places it, results come back strictly in the items' order (so the merged
sketches and the written shards do not depend on which node computed what), and at most `window` tasks
are in flight, which bounds the driver's memory. `shared` is put in the object store once, not shipped
with every task. Items and results must pickle; a task's error is raised where its result would be.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from scalelab.raycluster import ray_connect, ray_cpus

R = TypeVar("R")


def _call(fn: Callable[..., Any], item: Any, *shared: Any) -> Any:
    return fn(item, *shared)


def ray_ordered_map(
    fn: Callable[..., R],
    items: Iterable[Any],
    *,
    shared: tuple[Any, ...] = (),
    window: int | None = None,
    address: str | None = None,
) -> Iterator[R]:
    """``fn(item, *shared)`` for each item as Ray tasks (1 CPU each), yielded in the items' order."""
    ray = ray_connect(address, what="--executor ray")
    task = ray.remote(num_cpus=1, max_retries=2)(_call)
    refs = tuple(ray.put(s) for s in shared)
    window = window or 2 * ray_cpus(ray)
    pending: collections.deque[Any] = collections.deque()

    def get(ref: Any) -> Any:
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as err:  # the task's own error, not Ray's wrapper of it
            cause = getattr(err, "cause", None)
            if isinstance(cause, Exception):
                raise cause from None
            raise

    try:
        for item in items:
            pending.append(task.remote(fn, item, *refs))
            if len(pending) >= window:
                yield get(pending.popleft())
        while pending:
            yield get(pending.popleft())
    finally:
        for ref in pending:  # stopped early (an error, a closed generator): drop the rest
            ray.cancel(ref)


def cluster_cpus(address: str | None = None) -> int:
    """CPUs of the Ray cluster the data passes run on (connecting to it if needed)."""
    return ray_cpus(ray_connect(address, what="--executor ray"))
