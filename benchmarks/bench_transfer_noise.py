"""Cost of logging the gradient noise scale during training; prints a harness JSON line.

Trains the same tiny GPT (random tokens, gradient accumulation over 4 micro-batches) with and without
`GradientNoiseCallback` (the fair baseline: the same trainer and run minus the callback), in
interleaved rounds (`harness.compare`, only `fit` timed): optimizer steps per wall and per CPU second,
min/median/max; the ratio is the speed kept with the callback (1.0 = free).

    .venv/bin/python benchmarks/bench_transfer_noise.py [--width 128] [--steps 20] [--rounds 3]
"""

from __future__ import annotations

import argparse
import time

import torch
from harness import Sample, compare, cpu_seconds, emit

from scalelab.models.gpt import build_model
from scalelab.models.parametrization import apply_parametrization
from scalelab.spec import ModelSpec, TrainSpec
from scalelab.train.noise_scale import GradientNoiseCallback
from scalelab.train.trainer import Trainer


def _loader(vocab: int, batch: int, block: int):
    gen = torch.Generator().manual_seed(0)
    while True:
        yield torch.randint(0, vocab, (batch, block), generator=gen)


def train_steps(width: int, steps: int, with_callback: bool) -> Sample:
    torch.manual_seed(0)
    spec = ModelSpec(width=width, depth=2, n_heads=4, context_tokens=64, vocab_size=256)
    model = build_model(spec)
    groups = apply_parametrization(model, spec)
    train = TrainSpec(tokens=steps * 32 * 64, global_batch_size=32, micro_batch_size=8, device="cpu")
    cbs = [GradientNoiseCallback()] if with_callback else []
    tr = Trainer(
        model,
        groups,
        train,
        train_loader=_loader(256, 32, 65),
        total_steps=steps,
        context_tokens=64,
        callbacks=cbs,
    )
    c0, t0 = cpu_seconds(), time.perf_counter()
    tr.fit()
    return Sample(steps, time.perf_counter() - t0, cpu_seconds() - c0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    emit(
        compare(
            f"gns_callback_steps_per_second_w{args.width}",
            lambda: train_steps(args.width, args.steps, True),
            lambda: train_steps(args.width, args.steps, False),
            "steps/s",
            rounds=args.rounds,
            baseline_name="the same training without GradientNoiseCallback",
        )
    )


if __name__ == "__main__":
    main()
