"""Anonymous memory of `BlockLoader` while it streams a whole token store once; prints JSON lines
``{name, value, baseline, ratio, unit}``.

A synthetic store is written with the store's own ingest (byte tokenizer, built-in corpus repeated)
into a temp directory and deleted afterwards. Then one full shuffled epoch is iterated and the
process's ``RssAnon`` (``/proc/self/status``: resident memory not backed by a file — what the
loader really costs; memmapped shard pages are ``RssFile``, reclaimable page cache) is sampled
every `--sample-every` batches. With workers, the workers' ``RssAnon`` is added. The baseline is
``RssAnon`` just before the loader is built (interpreter + numpy + torch) — the fair baseline, since
it is the same process with everything but the loader — so ``value - baseline`` is the loader's own share. Workers count with what they have written themselves
(``Private_Dirty``), not the pages they share copy-on-write with this process.

    .venv/bin/python benchmarks/bench_data_memory.py                  # 256 MB store, quick
    .venv/bin/python benchmarks/bench_data_memory.py --size-gb 2.2    # > 2 GB (the issue's case)
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_data_loader import RepeatedCorpus  # noqa: E402
from harness import emit_value  # noqa: E402

from scalelab.data.ingest import ingest  # noqa: E402
from scalelab.data.store import TokenStore  # noqa: E402
from scalelab.data.tokenize import ByteTokenizer  # noqa: E402

LIMIT_BYTES = 300 << 20


def status_kb(pid: int | str, field: str) -> int:
    """A ``kB`` field of /proc/<pid>/status, in bytes."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def private_dirty_bytes(pid: int) -> int:
    """Private_Dirty of /proc/<pid>/smaps_rollup: pages only this process has written."""
    with open(f"/proc/{pid}/smaps_rollup") as fh:
        for line in fh:
            if line.startswith("Private_Dirty:"):
                return int(line.split()[1]) * 1024
    return 0


def anon_bytes(include_children: bool) -> int:
    """This process's RssAnon, plus each descendant's Private_Dirty when asked.

    Forked workers share the parent's anonymous pages copy-on-write, and RssAnon would count those
    shared pages once per process; a worker's own cost is what it has written (Private_Dirty).
    """
    total = status_kb("self", "RssAnon")
    if include_children:
        import psutil

        for child in psutil.Process().children(recursive=True):
            try:
                total += private_dirty_bytes(child.pid)
            except (FileNotFoundError, ProcessLookupError, PermissionError):
                pass
    return total


def build(target: Path, size_bytes: int) -> None:
    ingest([RepeatedCorpus(size_bytes // 2)], target, ByteTokenizer(), shard_tokens=1 << 24)


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--build":
        build(Path(sys.argv[2]), int(sys.argv[3]))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=float, default=256, help="token store size (uint16 bytes)")
    ap.add_argument("--size-gb", type=float, default=None, help="overrides --size-mb")
    ap.add_argument("--block-tokens", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", type=int, nargs="+", default=[0])
    ap.add_argument("--sample-every", type=int, default=100, help="batches between RssAnon samples")
    ap.add_argument("--dir", type=Path, default=Path("/tmp"), help="where the temp store goes")
    ap.add_argument("--keep", type=Path, default=None, help="reuse/keep a store at this path")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    from scalelab.data.loader import BlockLoader

    size_bytes = int((args.size_gb * 1024 if args.size_gb else args.size_mb) * (1 << 20))
    tmp = None
    if args.keep is not None and (args.keep / "index.json").is_file():
        path = args.keep
    else:
        tmp = Path(tempfile.mkdtemp(prefix="scalelab-mem-", dir=args.dir)) if args.keep is None else None
        target = args.keep if args.keep is not None else tmp / "store"  # type: ignore[operator]
        # Built in a child process, so the ingest's own allocations never count against the loader.
        t0 = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--build", str(target), str(size_bytes)], check=True)
        build_s = time.perf_counter() - t0
        path = target
    try:
        store = TokenStore.open(path)
        nbytes = store.num_tokens("train") * store.dtype.itemsize
        for workers in args.workers:
            base = anon_bytes(workers > 0)
            loader = BlockLoader(
                store,
                block_tokens=args.block_tokens,
                global_batch_size=args.batch,
                seed=0,
                num_workers=workers,
            )
            n = loader.batches_per_epoch
            peak = peak_file = 0
            t0 = time.perf_counter()
            it = iter(loader)
            for k in range(n):
                next(it)
                if k % args.sample_every == 0 or k == n - 1:
                    peak = max(peak, anon_bytes(workers > 0))
                    peak_file = max(peak_file, status_kb("self", "RssFile"))
            secs = time.perf_counter() - t0
            it.close()  # type: ignore[attr-defined]
            emit_value(
                f"loader_peak_rss_anon_full_epoch_workers{workers}",
                peak / 2**20,
                base / 2**20,
                "MiB",
                baseline_name="RssAnon before the loader (python+numpy+torch)",
                loader_own_mib=(peak - base) / 2**20,
                limit_mib=LIMIT_BYTES / 2**20,
                under_limit=peak < LIMIT_BYTES,
                peak_rss_file_mib=peak_file / 2**20,
                store_bytes=nbytes,
                batches=n,
                tokens_per_second=n * args.batch * args.block_tokens / secs,
                epoch_seconds=secs,
                **({"store_build_seconds": build_s} if tmp is not None else {}),
            )
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
