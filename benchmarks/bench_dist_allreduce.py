"""All-reduce bandwidth on CPU gloo between local processes, against a memory copy of the same size.

Prints a harness JSON line per message size: the bus bandwidth of a sum all-reduce over W processes
(busbw = 2(W-1)/W · bytes / seconds, the NCCL-tests convention, so it is comparable across W) against
the bandwidth of ``dst.copy_(src)`` of that size in one process (this one, one thread), the baseline
measured in the same run. The copy is the fair floor: an all-reduce must at least read and write its buffer once, and
a copy does nothing else. The ratio says how close the all-reduce comes to that floor.

The W ranks start once and keep their process group (connection set-up is not what the figure claims;
`harness.SpawnedGroup`) and wait between rounds; a round of the all-reduce is `--iters` all-reduces
after a barrier, timed by rank 0 (wall) and by every rank (CPU, summed); a round of the copy is
`--iters` copies here. After one untimed round each, the sides alternate (A B, B A, …) for `--rounds`
rounds (`harness.compare`): min/median/max of GB/s per wall second and per CPU second, and the machine
load. With fewer free cores than W the all-reduce is bounded by the cores. CUDA/NCCL is not measured.

  .venv/bin/python benchmarks/bench_dist_allreduce.py [--world 2] [--sizes-mib 1,8,32] [--iters 10]
"""

from __future__ import annotations

import argparse
import time

import torch
from harness import Sample, SpawnedGroup, compare, emit


def _worker(rank: int, world: int, store_path: str, go, replies, iters: int) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world)
    buffers: dict[int, torch.Tensor] = {}
    while (size := go.get()) is not None:  # one round of `iters` all-reduces of `size` bytes a message
        if size not in buffers:
            buffers[size] = torch.ones(size // 4, dtype=torch.float32)
            dist.all_reduce(buffers[size])  # warm up the connections at this size
        t = buffers[size]
        dist.barrier()
        w0, c0 = time.perf_counter(), time.process_time()
        for _ in range(iters):
            dist.all_reduce(t)
        replies.put((rank, time.perf_counter() - w0, time.process_time() - c0))
    dist.barrier()
    dist.destroy_process_group()


def allreduce_side(group: SpawnedGroup, world: int, size: int, iters: int):
    """A round of the all-reduce: bus bytes (GB) in rank 0's wall time and all ranks' CPU time."""

    def run() -> Sample:
        got = group(size)
        return Sample(2 * (world - 1) / world * size * iters / 1e9, got[0][1], sum(c for _, _, c in got))

    return run


def copy_side(size: int, iters: int):
    """A round of the baseline: `iters` copies of `size` bytes in this process (GB copied; this process's
    CPU time alone, as the idle ranks' clock ticks would swamp a millisecond copy)."""
    src, dst = torch.ones(size // 4), torch.empty(size // 4)

    def run() -> Sample:
        w0, c0 = time.perf_counter(), time.process_time()
        for _ in range(iters):
            dst.copy_(src)
        return Sample(size * iters / 1e9, time.perf_counter() - w0, time.process_time() - c0)

    return run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--sizes-mib", default="1,8,32")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    sizes = [int(float(s) * 2**20) for s in args.sizes_mib.split(",")]
    w = args.world
    group = SpawnedGroup(_worker, w, args.iters)
    try:
        for size in sizes:
            emit(
                compare(
                    f"gloo_allreduce_busbw_{size >> 20}MiB_world{w}",
                    allreduce_side(group, w, size, args.iters),
                    copy_side(size, args.iters),
                    "GB/s",
                    rounds=args.rounds,
                    warmup=True,
                    baseline_name="dst.copy_(src) of the same size, one process, one thread",
                    world=w,
                    message_bytes=size,
                )
            )
    finally:
        group.close()


if __name__ == "__main__":
    main()
