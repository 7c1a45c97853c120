"""Benchmark `BlockLoader` against MosaicML `streaming` and `litdata`; prints harness JSON lines.

The same token blocks (every ``block_tokens``-token block of our store's train split, blocks never
crossing a shard) are written once in each library's own format — MDS (``ndarray:uint16:T`` column,
one block per sample) for `streaming`, ``optimize(..., item_loader=TokensLoader())`` chunks for
`litdata` — and read back shuffled, batch `--batch`, with 0 and 2 loader workers, in the same run.

Every throughput reading runs in a freshly spawned process (see `measure_in_fresh_process`), with
our shards' checksums verified before timing, as in any process that has been training a while.

Besides throughput it prints the order guarantees it observes: whether the first batches are the
same with 0 and 2 workers (ours and `streaming` promise it; `litdata` does not), and whether our
loader resumed from `state_dict()` continues with exactly the batches an uninterrupted one yields.

The baselines are the fair ones because each library reads the same blocks in its own recommended
format with its own loader, shuffled, at the same batch size and worker count, in the same kind of
fresh process; rounds interleave the libraries (min/median/max, tokens per wall and CPU second, load).

The libraries are the optional ``bench`` extra and are never needed by CI; without them the script
prints one skip line (``{"name", "skipped", "load"}``) per missing library and measures what it can.

    .venv/bin/python benchmarks/bench_data_compare.py                 # 160 MB store, 2,000 batches
    .venv/bin/python benchmarks/bench_data_compare.py --size-gb 1 --steps 1000   # the real one

Installing them: with torch pinned, ``pip install -c constraints.txt mosaicml-streaming litdata``
cannot resolve (both need boto3 → botocore, which requires python-dateutil<3 while the constraints
pin 4.0.0; mosaicml-streaming 0.13.0 also requires numpy<2.2 against the pinned 2.4.6). Measured
instead with the libraries beside the venv, its packages untouched::

    .venv/bin/pip install --target /tmp/benchdeps --no-deps mosaicml-streaming==0.13.0 \\
        litdata==0.2.76 xxhash zstd brotli python-snappy cramjam lightning-utilities catalogue \\
        boto3 botocore jmespath s3transfer obstore regex
    # + stub modules transformers (BatchFeature, BatchEncoding, AutoTokenizer) and torchvision
    #   (VisionDataset, CIFAR10, to_tensor): streaming imports them at module level for its
    #   text/vision datasets; real transformers 4.x rejects tokenizers 0.23.3 and the PyPI
    #   torchvision 0.28.0 wheel fails on the CPU torch ("operator torchvision::nms does not exist").
    PYTHONPATH=/tmp/benchdeps .venv/bin/python benchmarks/bench_data_compare.py --size-gb 1 --steps 1000

On a shared machine add ``--repeats 3`` (rounds interleave the libraries; medians and the paired
ratios of each round are printed) and ``--baselines litdata`` to skip the slow MDS write.
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from statistics import median
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_data_loader import RepeatedCorpus  # noqa: E402
from harness import CpuMeter, emit, emit_value, measured, report, skip  # noqa: E402

from scalelab.data.ingest import ingest  # noqa: E402
from scalelab.data.store import TokenStore  # noqa: E402
from scalelab.data.tokenize import ByteTokenizer  # noqa: E402

_STORE: TokenStore | None = None
_BLOCK = 0


def _blocks_of_shard(i: int) -> np.ndarray:
    """Shard `i` of the train split as a (blocks, T) uint16 view (the tail that is no block dropped)."""
    assert _STORE is not None
    a = np.asarray(_STORE.shard_array("train", i))
    n = a.size // _BLOCK
    return a[: n * _BLOCK].reshape(n, _BLOCK)


def _litdata_item(i: int) -> Iterator[np.ndarray]:
    # litdata's TokensLoader concatenates items and cuts blocks of block_size; a shard's blocks,
    # yielded as one block-aligned array, give exactly our blocks.
    yield np.ascontiguousarray(_blocks_of_shard(i).ravel())


def _litdata_init(path: str, block: int) -> None:
    global _STORE, _BLOCK
    _STORE, _BLOCK = TokenStore.open(path), block


class _LitdataFn:
    """Picklable `fn` for litdata.optimize (its workers are separate processes)."""

    def __init__(self, path: str, block: int) -> None:
        self.path, self.block = path, block

    def __call__(self, i: int) -> Iterator[np.ndarray]:
        if _STORE is None:
            _litdata_init(self.path, self.block)
        yield from _litdata_item(i)


# ------------------------------------------------------------------------------------------ writers
def write_mds(store: TokenStore, block: int, out: Path) -> int:
    from streaming import MDSWriter

    global _STORE, _BLOCK
    _STORE, _BLOCK = store, block
    n = 0
    with MDSWriter(
        out=str(out), columns={"tokens": f"ndarray:{store.dtype.name}:{block}"}, size_limit="64mb"
    ) as w:
        for i in range(len(store.shards("train"))):
            for row in _blocks_of_shard(i):
                w.write({"tokens": row})
                n += 1
    return n


def write_litdata(store: TokenStore, block: int, out: Path) -> None:
    from litdata import optimize
    from litdata.streaming.item_loader import TokensLoader

    optimize(
        fn=_LitdataFn(str(store.path), block),
        inputs=list(range(len(store.shards("train")))),
        output_dir=str(out),
        chunk_bytes="64MB",
        item_loader=TokensLoader(),
        num_workers=1,
        verbose=False,
    )


# ------------------------------------------------------------------------------------------ readers
def ours(store: TokenStore, block: int, batch: int, workers: int, seed: int) -> Iterator[np.ndarray]:
    from scalelab.data.loader import BlockLoader

    loader = BlockLoader(store, block_tokens=block, global_batch_size=batch, seed=seed, num_workers=workers)
    for b in loader:
        yield b.numpy()


def mosaic(path: Path, block: int, batch: int, workers: int, seed: int) -> Iterator[np.ndarray]:
    from streaming import StreamingDataLoader, StreamingDataset
    from streaming.base.util import clean_stale_shared_memory

    clean_stale_shared_memory()
    ds = StreamingDataset(local=str(path), shuffle=True, shuffle_seed=seed, batch_size=batch)
    dl = StreamingDataLoader(
        ds, batch_size=batch, num_workers=workers, collate_fn=_stack_tokens, persistent_workers=False
    )
    try:
        yield from dl
    finally:
        del dl, ds


def _stack_tokens(samples: list[dict[str, np.ndarray]]) -> np.ndarray:
    return np.stack([s["tokens"] for s in samples]).astype(np.int64)


def lit(path: Path, block: int, batch: int, workers: int, seed: int) -> Iterator[np.ndarray]:
    from litdata import StreamingDataLoader, StreamingDataset
    from litdata.streaming.item_loader import TokensLoader

    ds = StreamingDataset(
        input_dir=str(path),
        item_loader=TokensLoader(block_size=block),
        shuffle=True,
        seed=seed,
        drop_last=True,
    )
    dl = StreamingDataLoader(ds, batch_size=batch, num_workers=workers, drop_last=True)
    for b in dl:
        yield b.numpy().astype(np.int64)


def measure_in_fresh_process(
    name: str, root: Path, block: int, batch: int, workers: int, steps: int, warmup: int
) -> tuple[float, float]:
    """`throughput` of one library's loader in a newly spawned process. Isolation matters: after its
    iterator is dropped, `streaming` keeps preparing the epoch in threads of the process that ran
    it (at 1 GB this slowed every later measurement in that process, ours included, 3-5x)."""
    ctx = mp.get_context("spawn")  # not a Pool: its daemonic processes may not start loader workers
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_measure, args=(send, name, str(root), block, batch, workers, steps, warmup))
    proc.start()
    send.close()
    try:
        result = receive.recv()
    except EOFError:
        raise SystemExit(f"measuring {name} with {workers} workers failed (see above)") from None
    proc.join()
    return result


def _measure(
    out: Any, name: str, root: str, block: int, batch: int, workers: int, steps: int, warmup: int
) -> None:
    import torch

    torch.set_num_threads(1)
    store = TokenStore.open(Path(root) / "store")
    if name == "scalelab":
        # Shards are checksum-verified on first open in a process; a training process has done that
        # long before, so do it here, before timing (the other libraries verify nothing).
        for i in range(len(store.shards("train"))):
            store.shard_array("train", i)
        make: Callable[[], Iterator[np.ndarray]] = lambda: ours(store, block, batch, workers, 1)  # noqa: E731
    elif name == "streaming":
        make = lambda: mosaic(Path(root) / "mds", block, batch, workers, 1)  # noqa: E731
    else:
        make = lambda: lit(Path(root) / "litdata", block, batch, workers, 1)  # noqa: E731
    out.send(throughput(make, steps, warmup))


def throughput(make: Callable[[], Iterator[np.ndarray]], steps: int, warmup: int) -> tuple[float, float]:
    """(tokens/s, tokens per CPU-second of this process and its workers) over `steps` batches after
    `warmup`. The second is what a loader costs, whatever else shares the machine."""
    it = make()
    for _ in range(warmup):
        next(it)
    t0, meter = time.perf_counter(), CpuMeter()
    tokens = 0
    for _ in range(steps):
        tokens += next(it).size
    wall = time.perf_counter() - t0
    cpu = meter.stop()
    it.close()
    return tokens / wall, tokens / cpu if cpu > 0 else float("nan")  # under one clock tick: unmeasured


def digest(make: Callable[[], Iterator[np.ndarray]], k: int) -> list[str]:
    """Short hashes of the first `k` batches (each batch's rows sorted: order *within* a batch is free)."""
    it = make()
    out = []
    for _ in range(k):
        b = next(it)
        rows = sorted(hashlib.sha1(r.tobytes()).hexdigest() for r in np.ascontiguousarray(b, dtype=np.int64))
        out.append(hashlib.sha1("".join(rows).encode()).hexdigest()[:12])
    it.close()
    return out


def resume_exact(store: TokenStore, block: int, batch: int, k: int) -> bool:
    """Our loader: save state after k batches, resume in a fresh loader (2 workers); same next k?"""
    from scalelab.data.loader import BlockLoader

    a = BlockLoader(store, block_tokens=block, global_batch_size=batch, seed=3, prefetch=0)
    it = iter(a)
    for _ in range(k):
        next(it)
    state = a.state_dict()
    expect = [next(it).numpy().copy() for _ in range(k)]
    b = BlockLoader(store, block_tokens=block, global_batch_size=batch, seed=3, num_workers=2)
    b.load_state_dict(state)
    itb = iter(b)
    got = [next(itb).numpy().copy() for _ in range(k)]
    itb.close()  # type: ignore[attr-defined]
    return all(np.array_equal(x, y) for x, y in zip(expect, got, strict=True))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=float, default=160, help="token store size (uint16 bytes)")
    ap.add_argument("--size-gb", type=float, default=None, help="overrides --size-mb")
    ap.add_argument("--block-tokens", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument(
        "--steps",
        type=int,
        default=2000,
        help="timed batches per loader and worker count (within one epoch; CPU time has 10 ms ticks)",
    )
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--order-batches", type=int, default=8, help="batches compared for the order check")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="interleaved rounds of every (library, workers) measurement; medians are reported "
        "(3+ on a shared machine: a round of ours lasts about a second, so one burst of foreign load "
        "can halve a single reading)",
    )
    ap.add_argument(
        "--baselines", nargs="+", choices=("streaming", "litdata"), default=["streaming", "litdata"]
    )
    ap.add_argument("--dir", type=Path, default=None, help="work directory (default: a temp dir)")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    size_bytes = int((args.size_gb * 1024 if args.size_gb else args.size_mb) * (1 << 20))
    T, B = args.block_tokens, args.batch

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        path = ingest(
            [RepeatedCorpus(size_bytes // 2)], root / "store", ByteTokenizer(), shard_tokens=1 << 22
        )
        store = TokenStore.open(path)
        nbytes = store.num_tokens("train") * store.dtype.itemsize
        num_blocks = sum(s.tokens // T for s in store.shards("train"))
        common = {"store_bytes": nbytes, "blocks": num_blocks, "block_tokens": T, "batch": B}

        loaders: dict[str, Callable[[int, int], Iterator[np.ndarray]]] = {
            "scalelab": lambda w, seed: ours(store, T, B, w, seed)
        }
        versions: dict[str, str] = {}
        try:
            if "streaming" not in args.baselines:
                raise ImportError("not asked for (--baselines)")
            import streaming

            versions["streaming"] = streaming.__version__
            t0 = time.perf_counter()
            n = write_mds(store, T, root / "mds")
            assert n == num_blocks, (n, num_blocks)
            emit_value("write_mds_seconds", time.perf_counter() - t0, float("nan"), "seconds", **common)
            loaders["streaming"] = lambda w, seed: mosaic(root / "mds", T, B, w, seed)
        except ImportError as err:
            emit(skip("streaming", str(err)))
        try:
            if "litdata" not in args.baselines:
                raise ImportError("not asked for (--baselines)")
            import litdata

            versions["litdata"] = litdata.__version__
            t0 = time.perf_counter()
            write_litdata(store, T, root / "litdata")
            from litdata import StreamingDataset as LitDataset
            from litdata.streaming.item_loader import TokensLoader

            n = len(LitDataset(str(root / "litdata"), item_loader=TokensLoader(block_size=T)))
            assert n == num_blocks, (n, num_blocks)
            emit_value("write_litdata_seconds", time.perf_counter() - t0, float("nan"), "seconds", **common)
            loaders["litdata"] = lambda w, seed: lit(root / "litdata", T, B, w, seed)
        except ImportError as err:
            emit(skip("litdata", str(err)))

        # Order guarantee: first batches with 0 vs 2 workers (same seed).
        for name, make in loaders.items():
            d0 = digest(lambda make=make: make(0, 7), args.order_batches)
            d2 = digest(lambda make=make: make(2, 7), args.order_batches)
            same = d0 == d2
            emit(
                measured(
                    f"{name}_order_independent_of_workers",
                    float(same),
                    1.0,
                    "1 = the same first batches with 0 and 2 workers",
                    batches_compared=args.order_batches,
                    first_batches_workers0=d0[:3],
                    first_batches_workers2=d2[:3],
                    version=versions.get(name, "this repo"),
                )
            )
        emit(
            measured(
                "scalelab_exact_resume_across_worker_counts",
                float(resume_exact(store, T, B, 5)),
                1.0,
                "1 = a resumed loader yields exactly the uninterrupted batches",
            )
        )

        # Throughput, same run, same blocks, each reading in its own fresh process; rounds
        # interleave the libraries so that each paired ratio compares readings taken seconds
        # apart, under about the same foreign load.
        rates: dict[tuple[str, int], list[float]] = {}
        per_cpu: dict[tuple[str, int], list[float]] = {}
        loads: list[float] = []
        for _round in range(args.repeats):
            for w in args.workers:
                for name in loaders:
                    r, c = measure_in_fresh_process(name, root, T, B, w, args.steps, args.warmup)
                    rates.setdefault((name, w), []).append(r)
                    per_cpu.setdefault((name, w), []).append(c)
            loads.append(os.getloadavg()[0])
        for w in args.workers:
            for other in ("litdata", "streaming"):
                if (other, w) in rates:
                    paired = [a / b for a, b in zip(rates["scalelab", w], rates[other, w], strict=True)]
                    emit(
                        report(
                            f"loader_vs_{other}_tokens_per_second_workers{w}",
                            rates["scalelab", w],
                            rates[other, w],
                            "tokens/s",
                            cpu_values=per_cpu["scalelab", w],
                            cpu_baselines=per_cpu[other, w],
                            loads=loads,
                            paired=paired,
                            baseline_name=f"{other} {versions[other]}",
                            **common,
                        )
                    )
        best = {name: max(median(v) for (n, _w), v in rates.items() if n == name) for name in loaders}
        for other in ("litdata", "streaming"):
            if other in best:
                emit_value(
                    f"loader_vs_{other}_tokens_per_second_best_workers",
                    best["scalelab"],
                    best[other],
                    "tokens/s",
                    baseline_name=f"{other} {versions[other]}",
                    **common,
                )
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
