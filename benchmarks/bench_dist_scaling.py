"""1 → W process scaling of DDP training on CPU gloo (strong scaling: the same global batch).

Prints JSON lines {name, value, baseline, ratio, unit}: tokens/s of the trainer with strategy "ddp" on
W processes (value) against W × the tokens/s of the same trainer on 1 process (baseline), so the ratio is
the scaling efficiency (1.0 = perfect). Both use `parallelize` + `Trainer` exactly as a run does (μP/SP
groups, AdamW, clipping, the cross-rank metrics callback), on random tokens, 1 thread per process. The
fastest of --rounds is reported. On a machine with fewer free cores than W, efficiency is bounded by the
cores, not by the communication. CUDA/NCCL is not measured here.

  .venv/bin/python benchmarks/bench_dist_scaling.py [--world 2] [--width 128] [--steps 8] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch
import torch.multiprocessing as mp


def _worker(rank: int, world: int, store_path: str, args: argparse.Namespace, q) -> None:
    import torch.distributed as dist

    from scalelab.models.gpt import build_model
    from scalelab.models.parametrization import apply_parametrization
    from scalelab.spec import ModelSpec, TrainSpec
    from scalelab.train.distributed import (
        CrossRankMetrics,
        DistEnv,
        grad_sync,
        init_distributed,
        param_group_index,
        regroup,
    )
    from scalelab.train.parallel import parallelize
    from scalelab.train.parallel.gradnorm import local_grad_norm_source
    from scalelab.train.trainer import Callback, Trainer

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world)
    train = TrainSpec(
        strategy="ddp", global_batch_size=args.batch, tokens=10**9, lr=1e-3, device="cpu", threads=1
    )
    ctx = init_distributed(
        train, DistEnv(rank=rank, world_size=world, local_rank=rank, local_world_size=world)
    )
    mspec = ModelSpec(width=args.width, depth=args.depth, n_heads=4, context_tokens=args.context)
    torch.manual_seed(0)
    model = build_model(mspec, 257)
    groups = apply_parametrization(model, mspec)
    index = param_group_index(model, groups)
    wrapped = parallelize(model, ctx.mesh, train)
    groups = regroup(wrapped, groups, index)
    gen = torch.Generator().manual_seed(rank)
    local = args.batch // world

    def batches():
        while True:
            yield torch.randint(0, 257, (local, args.context + 1), generator=gen)

    class Clock(Callback):
        marks: list[float] = []

        def on_step_end(self, state) -> None:
            self.marks.append(time.perf_counter())

    clock = Clock()
    best = float("inf")
    for _ in range(args.rounds):
        clock.marks.clear()
        trainer = Trainer(
            wrapped,
            groups,
            train,
            train_loader=batches(),
            total_steps=args.steps + 1,
            context_tokens=args.context,
            callbacks=[CrossRankMetrics(grad_norm_source=local_grad_norm_source(wrapped)), clock],
            world_size=world,
            grad_sync=lambda enabled: grad_sync(wrapped, enabled),
        )
        trainer.fit()
        best = min(best, clock.marks[-1] - clock.marks[0])  # the first step is warm-up
    if rank == 0:
        q.put(args.steps * args.batch * args.context / best)
    dist.barrier()
    dist.destroy_process_group()


def _tokens_per_second(world: int, args: argparse.Namespace) -> float:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    store = os.path.join(tempfile.mkdtemp(prefix="scalelab-bench-"), "store")
    procs = [ctx.Process(target=_worker, args=(r, world, store, args, q)) for r in range(world)]
    for p in procs:
        p.start()
    value = q.get(timeout=900)
    for p in procs:
        p.join()
    return value


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    one = _tokens_per_second(1, args)
    many = _tokens_per_second(args.world, args)
    print(
        json.dumps(
            {
                "name": f"ddp_scaling_efficiency_1to{args.world}_width{args.width}",
                "value": round(many, 1),
                "baseline": round(args.world * one, 1),
                "ratio": round(many / (args.world * one), 4),
                "unit": "tokens/s",
            }
        )
    )


if __name__ == "__main__":
    main()
