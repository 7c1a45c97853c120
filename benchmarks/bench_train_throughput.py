"""Trainer throughput vs a bare PyTorch loop on the same model and data (CPU by default), for each model
family (`gpt2` and `llama` by default) in the same run; prints harness JSON lines.

The trainer runs with everything it does in a real run (parametrization groups, AdamW, LR schedule,
clipping, divergence guard, metrics.jsonl with MFU and memory); the baseline is the loop a person would
write by hand — forward, backward, clip, fused AdamW (same groups and constant LR) step, zero_grad,
loss.item() — on an identical copy of the model: the fair baseline, because it does the same arithmetic
with nothing of the trainer around it. Per family, after one untimed round each, trainer and loop rounds
alternate (T B, B T, …) for at least `--rounds` rounds and on until the paired ratios' spread is ≤ 10 %
(`harness.compare`): min/median/max of tokens per wall second and per CPU second. Goal (issue 17):
ratio ≥ 0.95 for every family. A second line per family reports the MFU of both against `peak_flops`
measured at the model's own GEMM shapes (`hw.step_gemms`); an MFU above 1.0 stops the benchmark.

  .venv/bin/python benchmarks/bench_train_throughput.py [--families gpt2,llama] [--steps 10] [--rounds 5]
      [--width 128] [--device cpu|cuda] [--precision bf16] [--compile]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from harness import compare, emit, measured, timed

from scalelab.hw import peak_flops, step_gemms
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
    ap.add_argument("--families", default="gpt2,llama", help="comma-separated model families")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=5)
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
    os.environ.setdefault("SCALELAB_CACHE_DIR", tempfile.mkdtemp(prefix="scalelab-bench-"))
    for family in args.families.split(","):
        bench_family(args, family.strip())


def bench_family(args: argparse.Namespace, family: str) -> None:
    """One family: trainer against bare loop, interleaved; the throughput line and the MFU line."""
    device = torch.device(args.device)
    mspec = ModelSpec(
        family=family, width=args.width, depth=args.depth, n_heads=4, context_tokens=args.context
    )
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

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    # ---- trainer
    t_model, t_groups = make_model()
    tmp = Path(tempfile.mkdtemp(prefix="scalelab-bench-"))
    gemms = step_gemms(shape, args.batch)
    peak, source = peak_flops(device, args.precision, gemms)
    metrics = MetricsLogger(
        tmp / "metrics.jsonl", flops_per_token=shape.training_flops_per_token, peak_flops=peak, device=device
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

    def bare_steps() -> float:
        sync()
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
        return tokens_per_round

    def trainer_steps() -> float:
        run_steps(args.steps)
        return tokens_per_round

    tag = f"{family}_{device.type}_{args.precision}{'_compiled' if args.compile else ''}"
    tag += "_nocallbacks" if args.no_callbacks else ""
    tag += f"_w{args.width}_d{args.depth}_t{args.context}_b{args.batch}"
    result = compare(
        f"train_tokens_per_second_{tag}",
        lambda: timed(trainer_steps),
        lambda: timed(bare_steps),
        "tokens/s",
        rounds=args.rounds,
        spread_target=0.10,
        max_rounds=args.rounds + 2,
        warmup=True,
        baseline_name="bare loop: forward, backward, clip, fused AdamW, zero_grad, loss.item()",
        family=family,
        goal_ratio=0.95,
        threads=args.threads,
    )
    metrics.close()
    emit(result)
    fpt = shape.training_flops_per_token
    mfu, mfu_bare = fpt * result["value"] / peak, fpt * result["baseline"] / peak
    if max(mfu, mfu_bare, fpt * result["value_max"] / peak) > 1.0:
        raise SystemExit(f"MFU above 1.0 ({mfu:.3f}) against a peak of {peak:.3g} FLOP/s ({source}): a bug")
    emit(
        measured(
            f"train_mfu_{tag}",
            mfu,
            mfu_bare,
            "fraction of peak FLOP/s",
            peak_flops=peak,
            peak_source=source,
            peak_gemms=gemms,
            family=family,
        )
    )


if __name__ == "__main__":
    main()
