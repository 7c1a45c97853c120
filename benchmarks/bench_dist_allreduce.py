"""All-reduce bandwidth on CPU gloo between local processes, against a memory copy of the same size.

Prints JSON lines {name, value, baseline, ratio, unit}: for each message size, the bus bandwidth of a
sum all-reduce over W processes (busbw = 2(W-1)/W · bytes / seconds, the NCCL-tests convention, so it is
comparable across W) and, as the baseline measured in the same run, the bandwidth of `dst.copy_(src)` of
that size in one process, min/median/max over --rounds timings of each (`harness.report`; medians as
value and baseline). The copy is the fair floor: an all-reduce must at least read and write its buffer.
CUDA/NCCL is not measured here.

  .venv/bin/python benchmarks/bench_dist_allreduce.py [--world 2] [--sizes-mib 1,8,32] [--iters 10]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from harness import emit, report


def _worker(rank: int, world: int, store_path: str, sizes: list[int], iters: int, rounds: int, q) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world)
    results = {}
    for size in sizes:
        t = torch.ones(size // 4, dtype=torch.float32)
        dist.all_reduce(t)  # warm up the connections
        results[size] = []
        for _ in range(rounds):
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(iters):
                dist.all_reduce(t)
            results[size].append((time.perf_counter() - t0) / iters)
    if rank == 0:
        q.put(results)
    dist.barrier()
    dist.destroy_process_group()


def _copy_seconds(size: int, iters: int, rounds: int) -> list[float]:
    src, dst = torch.ones(size // 4), torch.empty(size // 4)
    dst.copy_(src)
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(iters):
            dst.copy_(src)
        out.append((time.perf_counter() - t0) / iters)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--sizes-mib", default="1,8,32")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    sizes = [int(float(s) * 2**20) for s in args.sizes_mib.split(",")]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    store = os.path.join(tempfile.mkdtemp(prefix="scalelab-bench-"), "store")
    procs = [
        ctx.Process(target=_worker, args=(r, args.world, store, sizes, args.iters, args.rounds, q))
        for r in range(args.world)
    ]
    for p in procs:
        p.start()
    seconds = q.get(timeout=600)
    for p in procs:
        p.join()
    w = args.world
    for size in sizes:
        busbw = [2 * (w - 1) / w * size / t / 1e9 for t in seconds[size]]
        copy_bw = [size / t / 1e9 for t in _copy_seconds(size, args.iters, args.rounds)]
        emit(
            report(
                f"gloo_allreduce_busbw_{size >> 20}MiB_world{w}",
                busbw,
                copy_bw,
                "GB/s",
                baseline_name="dst.copy_(src) of the same size, one process",
            )
        )


if __name__ == "__main__":
    main()
