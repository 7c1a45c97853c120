"""1 → W process scaling of DDP training on CPU gloo (strong scaling: the same global batch).

Prints a harness JSON line: tokens/s of the trainer with strategy "ddp" on W processes (value) against
W × the tokens/s of the same trainer on 1 process (baseline), so the ratio is the scaling efficiency
(1.0 = perfect), and tokens per CPU-second of both (cpu_ratio: the CPU efficiency, communication and
waiting included). The baseline is the fair one because it is the same trainer, model, data and thread
count, with only the process group's size changed. Both use `parallelize` + `Trainer` exactly as a run
does (μP/SP groups, AdamW, clipping, the cross-rank metrics callback), on random tokens, 1 thread per
process. Both sides' processes start once and wait between rounds; a round is a fresh `Trainer.fit` of
`--steps` timed steps after one warm-up step (rank 0's wall clock; every rank's CPU time over the same
steps, summed); after one untimed round each, the sides alternate (W 1, 1 W, …) for `--rounds` rounds:
min/median/max of both. On a machine with fewer free cores than W, efficiency
is bounded by the cores, not by the communication. CUDA/NCCL is not measured here.

  .venv/bin/python benchmarks/bench_dist_scaling.py [--world 2] [--width 128] [--steps 8] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from harness import Sample, SpawnedGroup, compare, emit


def _worker(rank: int, world: int, store_path: str, go, q, args: argparse.Namespace) -> None:
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
        marks: list[tuple[float, float]] = []

        def on_step_end(self, state) -> None:
            self.marks.append((time.perf_counter(), time.process_time()))

    clock = Clock()
    while go.get() is not None:  # one round per message: the processes live across rounds
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
        (w0, c0), (w1, c1) = clock.marks[0], clock.marks[-1]  # the first step is warm-up
        q.put((rank, w1 - w0, c1 - c0))
    dist.barrier()
    dist.destroy_process_group()


def round_sample(group: SpawnedGroup, args: argparse.Namespace) -> Sample:
    """One round of `group`: rank 0's wall time and all ranks' CPU time over the timed steps."""
    got = group()
    return Sample(args.steps * args.batch * args.context, got[0][1], sum(c for _, _, c in got))


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
    many, one = SpawnedGroup(_worker, args.world, args), SpawnedGroup(_worker, 1, args)
    try:
        result = compare(
            f"ddp_scaling_efficiency_1to{args.world}_width{args.width}",
            lambda: round_sample(many, args),
            lambda: round_sample(one, args),
            "tokens/s",
            rounds=args.rounds,
            warmup=True,
            baseline_scale=args.world,
            baseline_name=f"{args.world} × the same trainer on 1 process",
            world=args.world,
        )
    finally:
        many.close()
        one.close()
    emit(result)


if __name__ == "__main__":
    main()
