"""One GPU: the trainer under DDP and FSDP (world of one, NCCL) against the same trainer unwrapped.

Prints harness JSON lines: tokens per wall second and per CPU second of each strategy (value) against
the single-process trainer on the same model, data and settings (baseline), so the ratio is what the
wrapper costs on one device (1.0 = nothing), and the MFU of each. The baseline is the fair one because
it is the same trainer doing the same arithmetic on the same batches, built as `scalelab train` builds a
single-process run (compiled whole), with only the wrapper taken away. Every variant is built as a run
builds it: μP/SP groups, `parallelize` and `compile_for_training` (``--compile-scope blocks`` compiles
only the blocks, for comparison), the trainer with clipping, the divergence guard and the cross-rank
metrics callback.

Each variant lives in its own process (variants compiled in one process were seen to slow each other:
the same unwrapped baseline measured 25 % apart), built and warmed up once (compilation is not what the
ratio claims) and then asked for one round at a time (`harness.ServedSide`); a round is `--steps`
trainer steps, device synchronised around, and the process's CPU time over them. The baseline process
lives throughout; each strategy's process in turn runs beside it (at most two on the device), the sides
alternating (A B, B A, …) for `--rounds` rounds after one untimed round each (`harness.compare`):
min/median/max of wall and CPU rates, and the machine load. Needs CUDA; prints a note and exits 0
without it (``--device cpu`` smoke-tests the script with gloo).

  python benchmarks/bench_train_strategies.py [--width 768] [--depth 12] [--context 1024] [--batch 16]
      [--vocab 50304] [--precision bf16] [--no-compile] [--steps 20] [--rounds 3]
      [--compile-scope whole|blocks]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from statistics import median

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train_throughput import step_timer  # noqa: E402


def build_variant(strategy: str, args: argparse.Namespace, mesh) -> Callable[[], float]:  # noqa: ANN001
    """A function running `args.steps` trainer steps of `strategy` and returning tokens/s."""
    from scalelab.models.gpt import build_model
    from scalelab.models.parametrization import apply_parametrization
    from scalelab.spec import ModelSpec, TrainSpec
    from scalelab.train.distributed import (
        CrossRankMetrics,
        compile_blocks,
        compile_for_training,
        grad_sync,
        param_group_index,
        regroup,
    )
    from scalelab.train.parallel import parallelize
    from scalelab.train.parallel.gradnorm import local_grad_norm_source
    from scalelab.train.trainer import DivergenceGuard, Trainer

    device = torch.device(args.device)
    train = TrainSpec(
        strategy=strategy,
        global_batch_size=args.batch,
        tokens=10**12,
        lr=3e-4,
        schedule="constant",
        warmup_fraction=0.0,
        device=args.device,
        threads=1 if args.device == "cpu" else None,
        precision=args.precision,
        compile=not args.no_compile,
        fsdp_reshard_after_forward=not args.fsdp_keep_params,
    )
    mspec = ModelSpec(
        width=args.width, depth=args.depth, n_heads=args.width // 64, context_tokens=args.context
    )
    torch.manual_seed(0)
    raw = build_model(mspec, args.vocab)
    groups = apply_parametrization(raw, mspec)
    raw.to(device)
    callbacks: list = [DivergenceGuard(10.0)]
    kwargs: dict = {}
    if strategy == "none":
        model = torch.compile(raw) if train.compile else raw
    else:
        index = param_group_index(raw, groups)
        wrapped = parallelize(raw, mesh, train)
        groups = regroup(wrapped, groups, index)
        if args.compile_scope == "blocks" and train.compile:
            compile_blocks(wrapped)
            model = wrapped
        else:
            model = compile_for_training(wrapped, train)
        callbacks.insert(0, CrossRankMetrics(grad_norm_source=local_grad_norm_source(wrapped)))
        kwargs = {"world_size": 1, "grad_sync": lambda enabled: grad_sync(wrapped, enabled)}
    gen = torch.Generator().manual_seed(0)
    data = torch.randint(0, args.vocab, (8, args.batch, args.context + 1), generator=gen)

    def batches():
        while True:
            yield from data

    trainer = Trainer(
        model,
        groups,
        train,
        train_loader=batches(),
        total_steps=10**9,
        context_tokens=args.context,
        device=device,
        callbacks=callbacks,
        raw_model=raw,
        **kwargs,
    )
    run_steps = step_timer(trainer)

    def one_round() -> float:
        return args.steps * args.batch * args.context / run_steps(args.steps)

    return one_round


def world_of_one_mesh(strategy: str, device: str, batch: int):  # noqa: ANN201
    """The device mesh of a one-rank process group for `strategy` (None for "none")."""
    if strategy == "none":
        return None
    from scalelab.spec import TrainSpec
    from scalelab.train.distributed import DistEnv, init_distributed

    train = TrainSpec(strategy=strategy, device=device, global_batch_size=batch)
    return init_distributed(train, DistEnv(rank=0, world_size=1, local_rank=0, local_world_size=1)).mesh


def serve_variant(args: argparse.Namespace) -> None:
    """This process is `args.variant`: built and warmed up once, then one timed round per request."""
    from harness import Sample, serve_rounds

    torch.backends.cuda.matmul.allow_tf32 = True
    run = build_variant(args.variant, args, world_of_one_mesh(args.variant, args.device, args.batch))
    run()  # warm-up: compilation, allocator, cuBLAS heuristics
    tokens = args.steps * args.batch * args.context

    def one_round() -> Sample:
        c0 = time.process_time()
        rate = run()
        return Sample(tokens, tokens / rate, time.process_time() - c0)

    serve_rounds(one_round)


def add_shape_args(ap: argparse.ArgumentParser, steps: int) -> None:
    """The model shape and step options both GPU training benchmarks take (GPT-2 small by default)."""
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--depth", type=int, default=12)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=50304)
    ap.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--steps", type=int, default=steps)


def main() -> None:
    ap = argparse.ArgumentParser()
    add_shape_args(ap, steps=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--strategies", default="ddp,fsdp")
    ap.add_argument(
        "--compile-scope",
        default="whole",
        choices=["blocks", "whole"],
        help="ddp/fsdp: compile the whole wrapped model (what a run does) or only each block",
    )
    ap.add_argument(
        "--fsdp-keep-params",
        action="store_true",
        help="fsdp: keep gathered parameters from forward to backward (train.fsdp_reshard_after_forward=false)",
    )
    ap.add_argument("--device", default="cuda", help="cpu only to smoke-test the script (gloo)")
    ap.add_argument("--variant", default=None, help=argparse.SUPPRESS)  # internal: one variant, this process
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        from harness import emit, skip

        emit(skip("train_strategies_world1_vs_single", "needs a CUDA device"))
        return
    if args.variant:
        serve_variant(args)
        return
    from harness import Sample, ServedSide, compare, emit, measured

    from scalelab.hw import peak_flops, step_gemms
    from scalelab.models.flops import ModelShape
    from scalelab.spec import ModelSpec

    shape = ModelShape.from_spec(
        ModelSpec(width=args.width, depth=args.depth, n_heads=args.width // 64, context_tokens=args.context),
        args.vocab,
    )
    peak, source = peak_flops(torch.device(args.device), args.precision, step_gemms(shape, args.batch))
    fpt = shape.training_flops_per_token
    tag = f"{args.precision}{'' if args.no_compile else '_compiled'}_w{args.width}_d{args.depth}"
    tag += f"_t{args.context}_b{args.batch}_v{args.vocab}"
    tag += "_blocks" if args.compile_scope == "blocks" and not args.no_compile else ""
    tag += "_keepparams" if args.fsdp_keep_params else ""
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    common = {"params": shape.total_params, "device": device_name, "peak_flops": peak, "peak_source": source}

    def served(variant: str) -> ServedSide:
        return ServedSide([sys.executable, __file__, *sys.argv[1:], "--variant", variant])

    base_samples: list[Sample] = []
    single = served("none")

    def baseline() -> Sample:
        base_samples.append(single())
        return base_samples[-1]

    try:
        for s in args.strategies.split(","):
            wrapped = served(s)
            try:
                result = compare(
                    f"train_{s}_world1_vs_single_tokens_per_second_{tag}",
                    wrapped,
                    baseline,
                    "tokens/s",
                    rounds=args.rounds,
                    warmup=True,
                    baseline_name="the same trainer unwrapped, compiled whole, in its own process",
                    **common,
                )
            finally:
                wrapped.close()
            result["mfu_median"] = fpt * result["value"] / peak
            result["baseline_mfu_median"] = fpt * result["baseline"] / peak
            emit(result)
    finally:
        single.close()
    mfu = [fpt * b.work / b.wall / peak for b in base_samples]
    emit(
        measured(
            f"train_mfu_single_{tag}", median(mfu), 1.0, "fraction of peak FLOP/s", rounds_mfu=mfu, **common
        )
    )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
