"""Trainer throughput vs a bare PyTorch loop on the same model and data (CPU by default).

Prints JSON lines {name, value, baseline, ratio, unit}. The trainer runs with everything it does in a
real run (parametrization groups, AdamW, LR schedule, clipping, divergence guard, metrics.jsonl with MFU and
memory); the baseline is the loop a person would write by hand: forward, backward, clip, fused AdamW
(same groups and constant LR) step, zero_grad, loss.item(). Both are timed in alternating rounds and the fastest round of each is
reported — the one least disturbed by other processes (on a shared machine rounds vary by ±20 %).
Goal: ratio ≥ 0.95. Use more --rounds where the machine is busy.

  .venv/bin/python benchmarks/bench_train_throughput.py [--steps 10] [--rounds 7] [--width 128] [--device cpu|cuda] [--precision bf16] [--compile]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from scalelab.hw import peak_flops
from scalelab.models.flops import ModelShape
from scalelab.models.gpt import build_model
from scalelab.models.parametrization import apply_parametrization
from scalelab.spec import ModelSpec, TrainSpec
from scalelab.train.observe import MetricsLogger
from scalelab.train.precision import autocast
from scalelab.train.trainer import DivergenceGuard, Trainer


def step_timer(trainer: Trainer) -> Callable[[int], float]:
    """Start `trainer`'s callbacks; returns ``run(n)``: n trainer steps, each followed by its callbacks'
    ``on_step_end`` as in `Trainer.fit`, and the seconds they took (the device synchronised around)."""
    device = trainer.device
    trainer._iterator = iter(trainer.train_loader)
    for cb in trainer.callbacks:
        cb.on_fit_start(trainer)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def run(n: int) -> float:
        sync()
        t0 = time.perf_counter()
        for _ in range(n):
            trainer._step()
            for cb in trainer.callbacks:
                cb.on_step_end(trainer.state)
        sync()
        return time.perf_counter() - t0

    return run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=257)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--compile", action="store_true")
    ap.add_argument(
        "--no-callbacks", action="store_true", help="trainer without divergence guard and metrics"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    os.environ.setdefault("SCALELAB_CACHE_DIR", tempfile.mkdtemp(prefix="scalelab-bench-"))

    mspec = ModelSpec(width=args.width, depth=args.depth, n_heads=4, context_tokens=args.context)
    shape = ModelShape.from_spec(mspec, args.vocab)
    gen = torch.Generator().manual_seed(0)
    data = torch.randint(0, args.vocab, (args.steps * 4, args.batch, args.context + 1), generator=gen)
    tokens_per_round = args.steps * args.batch * args.context
    train = TrainSpec(
        tokens=10**9,
        global_batch_size=args.batch,
        lr=1e-3,
        schedule="constant",
        warmup_fraction=0.0,
        threads=args.threads,
        precision=args.precision,
        compile=args.compile,
    )

    def batches():
        while True:
            yield from data

    def make_model():
        torch.manual_seed(0)
        model = build_model(mspec, args.vocab)
        groups = apply_parametrization(model, mspec)
        model = model.to(device)
        return (torch.compile(model) if args.compile else model), groups

    # ---- trainer
    t_model, t_groups = make_model()
    tmp = Path(tempfile.mkdtemp(prefix="scalelab-bench-"))
    metrics = MetricsLogger(
        tmp / "metrics.jsonl", flops_per_token=shape.training_flops_per_token, peak_flops=1e12, device=device
    )
    trainer = Trainer(
        t_model,
        t_groups,
        train,
        train_loader=batches(),
        total_steps=10**6,
        context_tokens=args.context,
        device=device,
        callbacks=[] if args.no_callbacks else [DivergenceGuard(10.0), metrics],
    )
    run_steps = step_timer(trainer)

    def trainer_round() -> float:
        return tokens_per_round / run_steps(args.steps)

    # ---- bare loop
    # Same groups, LR and decay as the trainer, so both models follow the same trajectory (CPU kernels'
    # speed can depend on the values they see).
    b_model, b_groups = make_model()
    opt = torch.optim.AdamW(
        [
            {
                "params": g["params"],
                "lr": train.lr * g["lr_mult"],
                "weight_decay": train.weight_decay * g["wd_mult"],
            }
            for g in b_groups
        ],
        betas=(train.beta1, train.beta2),
        fused=True,
    )
    it = batches()

    def bare_round() -> float:
        sync()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            b = next(it).to(device)
            with autocast(device.type, args.precision):
                loss = b_model(b[:, :-1], b[:, 1:])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(b_model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            loss.item()
        sync()
        return tokens_per_round / (time.perf_counter() - t0)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    trainer_round(), bare_round()  # warm-up
    t_rates, b_rates = [], []
    for r in range(args.rounds):
        if r % 2:
            b_rates.append(bare_round())
            t_rates.append(trainer_round())  # noqa: E702
        else:
            t_rates.append(trainer_round())
            b_rates.append(bare_round())  # noqa: E702
    metrics.close()
    value, baseline = max(t_rates), max(b_rates)
    tag = f"{device.type}_{args.precision}{'_compiled' if args.compile else ''}"
    tag += "_nocallbacks" if args.no_callbacks else ""
    tag += f"_w{args.width}_d{args.depth}_t{args.context}_b{args.batch}"
    ratio = round(value / baseline, 4)
    print(
        json.dumps(
            {
                "name": f"train_tokens_per_second_{tag}",
                "value": round(value, 1),
                "baseline": round(baseline, 1),
                "ratio": ratio,
                "unit": "tokens/s",
            }
        )
    )
    peak, source = peak_flops(device, args.precision)
    fpt = shape.training_flops_per_token
    print(
        json.dumps(
            {
                "name": f"train_mfu_{tag}",
                "value": round(fpt * value / peak, 4),
                "baseline": round(fpt * baseline / peak, 4),
                "ratio": ratio,
                "unit": f"fraction of {peak:.3g} FLOP/s ({source})",
            }
        )
    )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
