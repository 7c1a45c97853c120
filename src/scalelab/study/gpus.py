"""GPUs for concurrent local runs: each run slot gets its own devices through CUDA_VISIBLE_DEVICES.

With G visible GPUs, `--parallel K` and `--nproc-per-run P`, slot k (0 ≤ k < K) gets GPUs
k·P … k·P+P−1 (modulo G): when K·P ≤ G every concurrent run has GPUs of its own; beyond that slots share
GPUs round-robin (a warning says so). A run's ranks see only their slot's GPUs, as cuda:0 … cuda:P−1.
On a machine without CUDA devices nothing is set and runs use the CPU.
"""

from __future__ import annotations

import logging
import os
import queue
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager

log = logging.getLogger(__name__)


def visible_gpus(
    env: Mapping[str, str] | None = None, device_count: Callable[[], int] | None = None
) -> list[str]:
    """The GPU ids this process may hand out: CUDA_VISIBLE_DEVICES' entries when it is set (empty: none),
    else 0 … n−1 for the n devices torch sees (`device_count`, default torch.cuda.device_count)."""
    env = os.environ if env is None else env
    listed = env.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [d.strip() for d in listed.split(",") if d.strip() and d.strip() != "-1"]
    if device_count is None:
        import torch  # lazy: the driver needs torch only here

        device_count = torch.cuda.device_count
    return [str(i) for i in range(device_count())]


def slot_gpus(gpus: Sequence[str], slots: int, per_run: int) -> list[list[str]]:
    """The GPU ids of each of `slots` concurrent runs of `per_run` GPUs each ([] per slot without GPUs)."""
    if not gpus:
        return [[] for _ in range(slots)]
    if slots * per_run > len(gpus):
        log.warning(
            "%d concurrent runs × %d GPUs each > %d GPUs: runs share GPUs round-robin",
            slots,
            per_run,
            len(gpus),
        )
    return [[gpus[(k * per_run + i) % len(gpus)] for i in range(per_run)] for k in range(slots)]


class GpuSlots:
    """Thread-safe pool of run slots; `with slots.take() as env:` gives the environment additions of a free
    slot ({} without GPUs) and returns the slot afterwards."""

    def __init__(self, assignment: Sequence[Sequence[str]]) -> None:
        self.assignment = [list(a) for a in assignment]
        self._free: queue.SimpleQueue[int] = queue.SimpleQueue()
        for k in range(len(self.assignment)):
            self._free.put(k)

    @contextmanager
    def take(self) -> Iterator[dict[str, str]]:
        slot = self._free.get()
        try:
            gpus = self.assignment[slot]
            yield {"CUDA_VISIBLE_DEVICES": ",".join(gpus)} if gpus else {}
        finally:
            self._free.put(slot)
