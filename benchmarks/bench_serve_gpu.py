"""Serving on a GPU: int8 (torchao) and group-wise int4 weight-only decode against bf16, and their loss
check on the device.

Prints harness JSON lines:
  1. decode tokens/s of the engine (in process, no HTTP) for a GPT-2-small-shaped model in bf16 (random
     weights: speed does not depend on them), at batch 1 and 16: int8 and int4 weight-only
     (`quantize_model` on CUDA) against the bf16 model, interleaved rounds, min/median/max; weight bytes
     of each.
  2. the held-out loss of a small trained run, int8 and int4 on CUDA against fp32 on CUDA
     (`quantization_report`).
The bf16 model in the same engine is the fair baseline for speed and size: same engine, batch, prompts
and decode length, only the weights' format differs, so the ratio is what quantizing buys on its own;
fp32 on the same device is the fair baseline for the loss, the reference a quantized model must stay
near. Needs CUDA; prints a skip line and exits 0 without it.

  python benchmarks/bench_serve_gpu.py [--width 768] [--depth 12] [--vocab 50304] [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
from harness import Sample, Side, compare, cpu_seconds, emit, emit_value, skip


def decode_side(model, batch: int, new_tokens: int) -> Side:  # noqa: ANN001
    """A side: `batch` concurrent greedy requests of `new_tokens` decoded by the engine (generated tokens)."""
    from scalelab.serve.engine import Engine, Job
    from scalelab.serve.sampling import SamplingParams

    def run() -> Sample:
        engine = Engine(model, max_batch=batch, device="cuda")
        jobs = [
            Job(
                "generate", [1 + i % 50, 40, 41, 42, 43, 44, 45, 46], SamplingParams(new_tokens, 0.0, None, i)
            )
            for i in range(batch)
        ]
        torch.cuda.synchronize()
        c0, t0 = cpu_seconds(), time.perf_counter()
        with torch.inference_mode():
            engine.admit(jobs)
            while engine.active:
                engine.decode()
        torch.cuda.synchronize()
        return Sample(sum(len(j.generated) for j in jobs), time.perf_counter() - t0, cpu_seconds() - c0)

    return run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--depth", type=int, default=12)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=50304)
    ap.add_argument("--new-tokens", type=int, default=64)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        emit(skip("serve_gpu", "needs a CUDA device"))
        return
    from scalelab.models.gpt import build_model
    from scalelab.models.parametrization import apply_parametrization
    from scalelab.serve.quantize import model_size_bytes, quantization_report, quantize_model
    from scalelab.spec import ModelSpec

    mspec = ModelSpec(
        width=args.width, depth=args.depth, n_heads=args.width // 64, context_tokens=args.context
    )
    torch.manual_seed(0)
    model = build_model(mspec, args.vocab)
    apply_parametrization(model, mspec)
    bf16 = model.to("cuda", torch.bfloat16).eval()
    quantized = {mode: quantize_model(bf16, mode, "cuda") for mode in ("int8", "int4")}
    tag = f"w{args.width}_d{args.depth}_v{args.vocab}"
    common = {"device": torch.cuda.get_device_name(), "new_tokens": args.new_tokens}
    for mode, qmodel in quantized.items():
        for batch in (1, 16):
            emit(
                compare(
                    f"serve_gpu_{mode}_decode_vs_bf16_batch{batch}_{tag}",
                    decode_side(qmodel, batch, args.new_tokens),
                    decode_side(bf16, batch, args.new_tokens),
                    "tokens/s",
                    rounds=3,
                    warmup=True,
                    baseline_name="the same engine on the bf16 model",
                    **common,
                )
            )
        emit_value(
            f"serve_gpu_{mode}_weight_bytes_vs_bf16_{tag}",
            model_size_bytes(qmodel),
            model_size_bytes(bf16),
            "bytes",
        )

    root = Path(tempfile.mkdtemp(prefix="scalelab-bench-serve-gpu-"))
    os.environ["SCALELAB_CACHE_DIR"] = str(root / "cache")
    from scalelab.serve._testing import train_tiny_run

    run_dir = train_tiny_run(
        root, **{"model.width": 128, "train.tokens": 8 * 64 * 150, "train.eval_tokens": 8192}
    )
    for mode in ("int8", "int4"):
        rep = quantization_report(run_dir, mode, device="cuda")  # type: ignore[arg-type]
        emit_value(
            f"serve_gpu_{mode}_heldout_loss_vs_fp32",
            rep["quantized_heldout_loss"],
            rep["fp32_heldout_loss"],
            "nats/token",
            within_tolerance=rep["within_tolerance"],
            **common,
        )


if __name__ == "__main__":
    main()
