"""Cost of logging the gradient noise scale during training; prints JSON lines
``{name, value, baseline, ratio, unit}``.

Trains the same tiny GPT (random tokens, gradient accumulation over 4 micro-batches) with and without
`GradientNoiseCallback`, alternating rounds, and reports the fastest round of each: the value is seconds
per optimizer step with the callback, the baseline without it.

    .venv/bin/python benchmarks/bench_transfer_noise.py [--width 128] [--steps 20] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from scalelab.models.gpt import build_model
from scalelab.models.parametrization import apply_parametrization
from scalelab.spec import ModelSpec, TrainSpec
from scalelab.train.noise_scale import GradientNoiseCallback
from scalelab.train.trainer import Trainer


def _loader(vocab: int, batch: int, block: int):
    gen = torch.Generator().manual_seed(0)
    while True:
        yield torch.randint(0, vocab, (batch, block), generator=gen)


def seconds_per_step(width: int, steps: int, with_callback: bool) -> float:
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
    t0 = time.perf_counter()
    tr.fit()
    return (time.perf_counter() - t0) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    with_cb, without = [], []
    for _ in range(args.rounds):
        without.append(seconds_per_step(args.width, args.steps, False))
        with_cb.append(seconds_per_step(args.width, args.steps, True))
    value, baseline = min(with_cb), min(without)
    print(
        json.dumps(
            {
                "name": f"gns_callback_step_seconds_w{args.width}",
                "value": value,
                "baseline": baseline,
                "ratio": value / baseline,
                "unit": "seconds/step",
            }
        )
    )


if __name__ == "__main__":
    main()
