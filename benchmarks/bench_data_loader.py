"""Benchmark the data layer; prints JSON lines ``{name, value, baseline, ratio, unit}``.

Loader throughput: `BlockLoader` (shuffled blocks, global batch 32, one rank; 0 and 2 workers)
against the simplest possible baseline measured in the same run on the same files — random block
reads from ``numpy.memmap`` into an int64 array, with no order bookkeeping, prefetch or checksums.
Also the store's build and verify speed. (Parallel ingest: ``bench_data_ingest.py``.)

The store is built from the built-in corpus (Python stdlib sources), repeated to the requested size.
Defaults are small so `make bench` stays quick; ``--size-gb 1`` is the real measurement.

    .venv/bin/python benchmarks/bench_data_loader.py               # 64 MB store
    .venv/bin/python benchmarks/bench_data_loader.py --size-gb 1   # 1 GB store
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from scalelab.data.corpus import BuiltinCorpus, Document, Source
from scalelab.data.ingest import ingest
from scalelab.data.store import TokenStore
from scalelab.data.tokenize import ByteTokenizer


class RepeatedCorpus(Source):
    """The built-in corpus, cycled (with fresh doc ids) until `size_bytes` of text."""

    kind = "bench"

    def __init__(self, size_bytes: int) -> None:
        super().__init__()
        self.size_bytes = size_bytes
        self._docs: list[Document] | None = None

    def documents(self) -> Iterator[Document]:
        if self._docs is None:
            self._docs = list(BuiltinCorpus().documents())
        docs = self._docs
        seen, rep = 0, 0
        while True:
            for d in docs:
                yield Document(f"{rep}/{d.doc_id}", d.text)
                seen += len(d.text)
                if seen >= self.size_bytes:
                    return
            rep += 1

    def describe(self) -> dict[str, Any]:
        return {"kind": "bench", "path": None, "field": None, "size_bytes": self.size_bytes}


def emit(name: str, value: float, baseline: float, unit: str, **extra: Any) -> None:
    """One JSON line; the 1-minute load average goes with it (this machine may be shared)."""
    ratio = value / baseline if baseline else float("nan")
    extra.setdefault("loadavg_1m", os.getloadavg()[0])
    print(
        json.dumps(
            {"name": name, "value": value, "baseline": baseline, "ratio": ratio, "unit": unit, **extra}
        ),
        flush=True,
    )


class CpuMeter:
    """CPU seconds (user + system) of this process and all its descendants while running.

    Pool workers are grandchildren (forkserver), which ``RUSAGE_CHILDREN`` never sees, so a thread
    polls psutil every `interval` seconds and keeps each process's last reading.
    """

    def __init__(self, interval: float = 0.1) -> None:
        import threading

        import psutil

        self._me = psutil.Process()
        self._interval = interval
        self._seen: dict[int, float] = {}
        self._t0 = self._total(self._me)
        self._start: dict[int, float] = {}  # children already running count from now on
        for child in self._me.children(recursive=True):
            try:
                self._start[child.pid] = self._seen[child.pid] = self._total(child)
            except psutil.Error:
                pass
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    @staticmethod
    def _total(p: Any) -> float:
        t = p.cpu_times()
        return t.user + t.system

    def _poll(self) -> None:
        import psutil

        while not self._stop.wait(self._interval):
            for child in self._me.children(recursive=True):
                try:
                    self._seen[child.pid] = self._total(child)
                except psutil.Error:
                    pass

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        own = self._total(self._me) - self._t0
        return own + sum(t - self._start.get(pid, 0.0) for pid, t in self._seen.items())


def raw_memmap_reads(store: TokenStore, block: int, batch: int, steps: int, seed: int) -> float:
    """Tokens/s of random block reads straight from numpy.memmap (the baseline)."""
    import torch

    maps = [np.memmap(store.path / s.file, dtype=store.dtype, mode="r") for s in store.shards("train")]
    per = np.array([m.size // block for m in maps])
    ends = np.cumsum(per)
    rng = np.random.default_rng(seed)
    out = np.empty((batch, block), dtype=np.int64)
    t0 = time.perf_counter()
    for _ in range(steps):
        ids = rng.integers(0, ends[-1], size=batch)
        shard = np.searchsorted(ends, ids, side="right")
        off = (ids - (ends - per)[shard]) * block
        for i in range(batch):
            out[i] = maps[shard[i]][off[i] : off[i] + block]
        torch.from_numpy(out)
    return steps * batch * block / (time.perf_counter() - t0)


def loader_throughput(store: TokenStore, block: int, batch: int, steps: int, workers: int) -> float:
    from scalelab.data.loader import BlockLoader

    loader = BlockLoader(store, block_tokens=block, global_batch_size=batch, seed=1, num_workers=workers)
    it = iter(loader)
    for _ in range(min(50, steps)):  # warm-up: first opens verify shard checksums, workers start
        next(it)
    t0 = time.perf_counter()
    for _ in range(steps):
        next(it)
    rate = steps * batch * block / (time.perf_counter() - t0)
    it.close()
    return rate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=float, default=64, help="token store size (uint16 bytes)")
    ap.add_argument("--size-gb", type=float, default=None, help="overrides --size-mb")
    ap.add_argument("--block-tokens", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--dir", type=Path, default=None, help="work directory (default: a temp dir)")
    args = ap.parse_args()
    import torch  # here, not at the top: other benchmarks import this module's helpers

    torch.set_num_threads(1)
    size_bytes = int((args.size_gb * 1024 if args.size_gb else args.size_mb) * (1 << 20))

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        bench_loader(args, Path(tmp), size_bytes)


def bench_loader(args: argparse.Namespace, root: Path, size_bytes: int) -> None:
    t0 = time.perf_counter()
    path = ingest([RepeatedCorpus(size_bytes // 2)], root / "store", ByteTokenizer(), shard_tokens=1 << 22)
    build_s = time.perf_counter() - t0
    store = TokenStore.open(path)
    nbytes = store.num_tokens("train") * store.dtype.itemsize
    emit(
        "store_build_byte_tokenizer",
        nbytes / build_s / 1e6,
        nbytes / build_s / 1e6,
        "MB/s",
        size_bytes=nbytes,
    )

    steps = args.steps
    base = raw_memmap_reads(store, args.block_tokens, args.batch, steps, seed=0)
    for workers in (0, 2):
        rate = loader_throughput(store, args.block_tokens, args.batch, steps, workers)
        emit(
            f"loader_tokens_per_second_workers{workers}",
            rate,
            base,
            "tokens/s",
            baseline_name="random numpy.memmap block reads",
            store_bytes=nbytes,
            block_tokens=args.block_tokens,
            batch=args.batch,
        )

    t0 = time.perf_counter()
    problems = store.verify()
    verify_s = time.perf_counter() - t0
    assert not problems, problems
    emit("store_verify", nbytes / verify_s / 1e6, nbytes / verify_s / 1e6, "MB/s")


if __name__ == "__main__":
    main()
