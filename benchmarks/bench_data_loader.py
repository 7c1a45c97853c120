"""Loader throughput against a plain memmap reader of the same store, with the same readers; prints
harness JSON lines (tokens per wall second and per CPU second, min/median/max of interleaved rounds).

Candidate: `BlockLoader` (shuffled blocks, global batch 32×1024 tokens, one rank) with ``num_workers=0``
(one prefetch thread feeding this thread) and ``num_workers=2`` (two forked worker processes writing into
a shared-memory ring that this process widens into int64 tensors).

Baseline — the fairest plain reader of the same token store, with the same budget of readers:
- the same shard files opened with ``numpy.memmap`` and sliced through ``.view(np.ndarray)`` (slicing
  the memmap subclass itself costs ~10× more Python overhead per row: that baseline would flatter);
- the same blocks in the same order: the loader's documented global order (blocks never cross a shard,
  a permutation per epoch from ``PCG64([seed, epoch])``), re-derived here with numpy alone and checked
  batch for batch against the loader before timing;
- each batch gathered a row at a time into a fresh int64 array wrapped as a torch tensor, as the loader
  hands out;
- one reading thread against ``num_workers=0``; ``W`` forked processes, each reading every W-th batch,
  against ``num_workers=W``.
The baseline keeps no position, checks nothing, and its processes deliver their batches nowhere (the
loader's workers hand every batch to this process, which copies it once more). So it is an upper bound
of what that budget of readers can read: a ratio ≥ 1 cannot come from a handicapped baseline.

Each round builds a fresh loader (or reader), reads `--steps` batches from batch 0 and stops it (worker
start and join included on both sides); the sides alternate (A B, B A, …) after one untimed warm-up each
(the store is then in the page cache), ≥ `--rounds` rounds and on until the paired ratios' spread is
≤ 15 %. CPU seconds are the whole process tree's (this process and its joined workers,
`harness.cpu_seconds`). Also: `store.verify()` against hashing the same files with ``hashlib``.

The store is the built-in corpus (Python stdlib sources) repeated to `--size-mb`, byte tokenizer
(uint16 ids). Goal (issue 21): ≥ 1.0× per CPU-second with 2 workers.

    .venv/bin/python benchmarks/bench_data_loader.py               # 64 MB store
    .venv/bin/python benchmarks/bench_data_loader.py --size-gb 1   # 1 GB store
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing as mp
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from harness import compare, emit, timed

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


class PlainReader:
    """Batches of a token store's split read with numpy alone: memmaps viewed as plain ndarrays, the
    loader's documented block order (see the module docstring), one int64 array per batch."""

    def __init__(self, store: TokenStore, block: int, batch: int, seed: int, split: str = "train") -> None:
        self.views = [
            np.memmap(store.path / s.file, dtype=store.dtype, mode="r").view(np.ndarray)
            for s in store.shards(split)
        ]
        per = np.array([v.size // block for v in self.views], dtype=np.int64)
        self.ends = np.cumsum(per)
        self.starts = self.ends - per
        self.block, self.batch, self.seed = block, batch, seed
        self.per_epoch = int(self.ends[-1]) // batch
        self._perm: tuple[int, np.ndarray] | None = None

    def rows(self, position: int) -> np.ndarray:
        epoch, k = divmod(position, self.per_epoch)
        if self._perm is None or self._perm[0] != epoch:
            rng = np.random.Generator(np.random.PCG64([self.seed, epoch]))
            self._perm = (epoch, rng.permutation(int(self.ends[-1])))
        return self._perm[1][k * self.batch : (k + 1) * self.batch]

    def read(self, position: int) -> np.ndarray:
        ids = self.rows(position)
        shard = np.searchsorted(self.ends, ids, side="right")
        offset = (ids - self.starts[shard]) * self.block
        out = np.empty((self.batch, self.block), dtype=np.int64)
        T, views = self.block, self.views
        for i, (s, o) in enumerate(zip(shard.tolist(), offset.tolist(), strict=True)):
            out[i] = views[s][o : o + T]
        return out


def plain_reader_side(store: TokenStore, block: int, batch: int, steps: int, readers: int):
    """The baseline side: `steps` batches read by one thread (readers=0 or 1) or by `readers` forked
    processes, each taking every readers-th batch."""
    import torch

    def read_share(first: int, stride: int) -> None:
        reader = PlainReader(store, block, batch, seed=1)
        for k in range(first, steps, stride):
            torch.from_numpy(reader.read(k))

    def run() -> float:
        if readers <= 1:
            read_share(0, 1)
        else:
            ctx = mp.get_context("fork")
            procs = [ctx.Process(target=read_share, args=(w, readers)) for w in range(readers)]
            for p in procs:
                p.start()
            for p in procs:
                p.join()
                if p.exitcode:
                    raise SystemExit(f"plain reader process exited with {p.exitcode}")
        return steps * batch * block

    return lambda: timed(run)


def loader_side(store: TokenStore, block: int, batch: int, steps: int, workers: int):
    """The candidate side: a fresh `BlockLoader` with `workers`, `steps` batches from batch 0, closed."""
    from scalelab.data.loader import BlockLoader

    def run() -> float:
        loader = BlockLoader(store, block_tokens=block, global_batch_size=batch, seed=1, num_workers=workers)
        it = iter(loader)
        for _ in range(steps):
            next(it)
        it.close()  # stops the prefetch thread / joins the workers inside the timed window
        return steps * batch * block

    return lambda: timed(run)


def same_order(store: TokenStore, block: int, batch: int, steps: int) -> bool:
    """Whether the plain reader's batches are the loader's (first, middle and last timed batch)."""
    from scalelab.data.loader import BlockLoader

    loader = BlockLoader(store, block_tokens=block, global_batch_size=batch, seed=1)
    reader = PlainReader(store, block, batch, seed=1)
    return all(
        np.array_equal(reader.read(k), loader.make_array(k)) for k in sorted({0, steps // 2, steps - 1})
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=float, default=64, help="token store size (uint16 bytes)")
    ap.add_argument("--size-gb", type=float, default=None, help="overrides --size-mb")
    ap.add_argument("--block-tokens", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=1000, help="batches per round")
    ap.add_argument("--workers", default="0,2", help="comma-separated loader worker counts")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dir", type=Path, default=None, help="work directory (default: a temp dir)")
    args = ap.parse_args()
    import torch  # here, not at the top: other benchmarks import this module's helpers

    torch.set_num_threads(1)
    size_bytes = int((args.size_gb * 1024 if args.size_gb else args.size_mb) * (1 << 20))
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = ingest(
            [RepeatedCorpus(size_bytes // 2)], Path(tmp) / "store", ByteTokenizer(), shard_tokens=1 << 22
        )
        bench_store(args, TokenStore.open(path))


def bench_store(args: argparse.Namespace, store: TokenStore) -> None:
    T, B, steps = args.block_tokens, args.batch, args.steps
    nbytes = store.num_tokens("train") * store.dtype.itemsize
    order = same_order(store, T, B, steps)
    if not order:
        raise SystemExit("the plain reader's block order differs from the loader's: fix the baseline")
    for workers in (int(w) for w in args.workers.split(",")):
        emit(
            compare(
                f"loader_tokens_per_second_workers{workers}",
                loader_side(store, T, B, steps, workers),
                plain_reader_side(store, T, B, steps, workers),
                "tokens/s",
                rounds=args.rounds,
                spread_target=0.15,
                max_rounds=2 * args.rounds + 1,
                warmup=True,
                baseline_name=(
                    f"plain memmap .view(ndarray) reader, same order, "
                    f"{'1 thread' if workers == 0 else f'{workers} forked processes'}"
                ),
                goal_cpu_ratio=1.0 if workers == 2 else None,
                same_order=order,
                store_bytes=nbytes,
                block_tokens=T,
                batch=B,
                steps=steps,
            )
        )

    files = [store.path / s.file for split in ("train", "heldout") for s in store.shards(split)]

    def hash_files() -> float:
        for f in files:
            with open(f, "rb") as fh:
                hashlib.file_digest(fh, "sha256")
        return sum(f.stat().st_size for f in files) / 1e6

    def verify() -> float:
        problems = store.verify()
        assert not problems, problems
        return sum(f.stat().st_size for f in files) / 1e6

    emit(
        compare(
            "store_verify",
            lambda: timed(verify),
            lambda: timed(hash_files),
            "MB/s",
            rounds=3,
            warmup=True,
            baseline_name="hashlib.file_digest(sha256) of the same shard files",
        )
    )


if __name__ == "__main__":
    main()
