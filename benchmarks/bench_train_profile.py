"""Where a training step's time goes on a GPU: the MFU gap, kernel category by category.

Runs the trainer as `bench_train_strategies` builds it (unwrapped, or ``--strategy ddp|fsdp`` on a
world of one; compiled, bf16 by default, a GPT-2-small shape) under `torch.profiler`, sorts every CUDA
kernel into a category by its name, and prints harness JSON lines (`harness.measured`): each category's
share of the step's wall time (its kernel time per step in ``ms_per_step``), the GPU's idle share (wall
time no kernel covers), and the FLOP rate inside the matrix-multiply and attention kernels as a fraction
of the device peak — so MFU = Σ (share × rate) over the categories that do the model's FLOPs, and the
rest of the gap is idle time, memory-bound kernels and the optimizer. A breakdown has no competing
implementation: each figure's baseline is the whole it is a part of (1.0 = the step's wall time, or the
peak FLOP/s measured at the model's own GEMM shapes, `hw.peak_flops`), the one fair yardstick, which
cannot flatter it. One profiled window of `--steps` steps after 5 warm-up steps (rounds = 1). Needs CUDA;
prints a skip line and exits 0 without it.

  python benchmarks/bench_train_profile.py [--width 768] [--depth 12] [--context 1024] [--batch 16]
      [--vocab 50304] [--precision bf16] [--no-compile] [--steps 10] [--strategy none|ddp|fsdp]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train_strategies import add_shape_args, build_variant, world_of_one_mesh  # noqa: E402
from harness import emit, measured, skip  # noqa: E402

# first match wins; names are lower-cased kernel names
CATEGORIES: list[tuple[str, tuple[str, ...]]] = [
    ("attention", ("flash", "fmha", "attention", "sdpa", "cudnn")),
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "sm90_", "sm80_")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("communication", ("nccl",)),
    ("copy", ("memcpy", "memset")),
    ("fused_triton", ("triton",)),
]


def category(kernel: str) -> str:
    name = kernel.lower()
    for cat, keys in CATEGORIES:
        if any(k in name for k in keys):
            return cat
    return "other_elementwise"


def busy_us(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals (kernels on several streams may overlap)."""
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if s > end:
            total += e - s
            end = e
        elif e > end:
            total += e - end
            end = e
    return total


def main() -> None:
    ap = argparse.ArgumentParser()
    add_shape_args(ap, steps=10)
    ap.add_argument(
        "--strategy", default="none", choices=["none", "ddp", "fsdp"], help="ddp/fsdp: a world of one"
    )
    args = ap.parse_args()
    if not torch.cuda.is_available():
        emit(skip("train_profile", "needs a CUDA device"))
        return
    from torch.profiler import ProfilerActivity, profile

    from scalelab.hw import peak_flops, step_gemms
    from scalelab.models.flops import ModelShape
    from scalelab.spec import ModelSpec

    torch.backends.cuda.matmul.allow_tf32 = True
    args.device = "cuda"
    steps = args.steps
    mesh = world_of_one_mesh(args.strategy, "cuda", args.batch)
    one_step = argparse.Namespace(
        **{**vars(args), "steps": 1, "compile_scope": "whole", "fsdp_keep_params": False}
    )
    run = build_variant(args.strategy, one_step, mesh)
    for _ in range(5):  # compilation and warm-up
        run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            run()
        torch.cuda.synchronize()
        wall_us = (time.perf_counter() - t0) * 1e6
    per_cat: dict[str, float] = defaultdict(float)
    per_kernel: dict[str, float] = defaultdict(float)
    intervals = []
    for evt in prof.events():
        if evt.device_type != torch.autograd.DeviceType.CUDA or getattr(evt, "is_user_annotation", False):
            continue  # kernels only: GPU-side annotations (e.g. "Optimizer.step#AdamW.step") span kernels
        if "#" in evt.name or evt.name.startswith("ProfilerStep"):
            continue
        start, end = evt.time_range.start, evt.time_range.end
        per_cat[category(evt.name)] += end - start
        per_kernel[evt.name] += end - start
        intervals.append((start, end))
    idle = max(0.0, wall_us - busy_us(intervals))

    mspec = ModelSpec(
        width=args.width, depth=args.depth, n_heads=args.width // 64, context_tokens=args.context
    )
    shape = ModelShape.from_spec(mspec, args.vocab)
    tokens = steps * args.batch * args.context
    d, L, T, V = shape.width, shape.depth, shape.context_tokens, shape.vocab_size
    flops = {
        "matmul": 6.0 * (shape.block_matmul_params + V * d) * tokens,
        "attention": 12.0 * L * T * d * tokens,  # the MFU convention: full (not causal-halved) attention
    }
    gemms = step_gemms(shape, args.batch)
    peak, source = peak_flops(torch.device("cuda"), args.precision, gemms)
    mfu = shape.training_flops_per_token * tokens / (wall_us * 1e-6) / peak
    tag = f"{args.strategy}_{args.precision}{'' if args.no_compile else '_compiled'}_w{args.width}_d{args.depth}"
    tag += f"_t{args.context}_b{args.batch}_v{args.vocab}"
    common = {"device": torch.cuda.get_device_name(), "steps": steps}

    def emit_share(name: str, value: float, unit: str, **extra) -> None:
        emit(measured(f"train_profile_{name}_{tag}", value, 1.0, unit, **common, **extra))

    emit_share("mfu", mfu, f"fraction of {peak:.3g} FLOP/s ({source})", step_ms=wall_us / steps / 1e3)
    for cat, us in sorted(per_cat.items(), key=lambda kv: -kv[1]):
        emit_share(f"share_{cat}", us / wall_us, "fraction of wall time", ms_per_step=us / steps / 1e3)
    emit_share("share_gpu_idle", idle / wall_us, "fraction of wall time", ms_per_step=idle / steps / 1e3)
    for cat, f in flops.items():
        if per_cat.get(cat):
            rate = f / (per_cat[cat] * 1e-6)
            emit_share(f"{cat}_flop_rate", rate / peak, "fraction of peak FLOP/s", tflops=rate / 1e12)
    from torch._dynamo.utils import counters

    compiled = {"graph_breaks": sum(counters["graph_break"].values()), **dict(counters["stats"])}
    emit(
        measured(
            f"train_profile_dynamo_graph_breaks_{tag}",
            compiled["graph_breaks"],
            0,
            "graph breaks",
            **compiled,
        )
    )
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1])[:15]
    ms = {f"{category(k)}: {k[:80]}": round(v / steps / 1e3, 3) for k, v in top}
    emit_share(
        "top15_kernels", sum(v for _, v in top) / wall_us, "fraction of wall time", kernels_ms_per_step=ms
    )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
