"""The gradient noise scale (McCandlish et al. 2018, "An Empirical Model of Large-Batch Training", App. A).

With per-example gradient covariance Σ and true gradient G, a batch of B examples has
E|G_B|² = |G|² + tr(Σ)/B. Two batch sizes B_small < B_big give unbiased estimates

    |G|²   ≈ (B_big·|G_big|² − B_small·|G_small|²) / (B_big − B_small)
    tr(Σ)  ≈ (|G_small|² − |G_big|²) / (1/B_small − 1/B_big)

and the "simple" noise scale B_simple = tr(Σ)/|G|² — the batch size at which the gradient's noise equals its
signal, an estimate of the critical batch size. Each step's estimates are noisy (|G|² can be negative), so
numerator and denominator are averaged separately (exponential moving averages, bias corrected) before
the ratio is taken, as the paper recommends.

Gradient accumulation gives both sizes for free: the micro-batch gradients are the small batches and their
mean, the optimizer-step gradient, is the big one. So does data parallelism: each rank's local gradient is
a small batch, the all-reduced one the big batch. `GradientNoiseCallback` reads them during training: in one
process, tensor hooks on every parameter add up the squared norm of each backward pass's incoming gradient
(one backward per micro-batch; one squared norm per parameter per micro-batch); under DDP/FSDP, the per-rank
local norms the data-parallel wrapper measures anyway. The trainer's pre-clipping `grad_norm` is |G_big|.
Batch sizes are counted in tokens (sequences × context), the unit the loss is averaged over.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from scalelab.errors import TrainingError
from scalelab.train.trainer import Callback, Trainer, TrainState

log = logging.getLogger(__name__)


def two_batch_estimate(sq_small: float, b_small: float, sq_big: float, b_big: float) -> tuple[float, float]:
    """Unbiased (|G|², tr Σ) from the mean squared norm of B_small-batch and B_big-batch gradients."""
    if not 0 < b_small < b_big:
        raise ValueError(f"need 0 < b_small < b_big, got {b_small}, {b_big}")
    g2 = (b_big * sq_big - b_small * sq_small) / (b_big - b_small)
    trace = (sq_small - sq_big) / (1.0 / b_small - 1.0 / b_big)
    return float(g2), float(trace)


@dataclass
class NoiseScaleEstimate:
    """Averaged |G|², tr(Σ) and B_simple = tr(Σ)/|G|² (in the batch unit of the inputs: tokens here)."""

    g2: float
    trace: float
    b_simple: float  # nan when |G|² is not positive yet (noise dominates: make the window longer)
    n: int  # measurements averaged
    b_small: float
    b_big: float

    def to_dict(self) -> dict[str, Any]:
        return {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()
        }


class NoiseScaleAccumulator:
    """Bias-corrected EMAs of |G|² and tr(Σ); `decay=None` averages every measurement equally."""

    def __init__(self, decay: float | None = 0.95) -> None:
        if decay is not None and not 0 < decay < 1:
            raise ValueError(f"decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.g2 = 0.0
        self.trace = 0.0
        self.weight = 0.0
        self.n = 0
        self.b_small = math.nan
        self.b_big = math.nan

    def add(self, sq_small: float, b_small: float, sq_big: float, b_big: float) -> None:
        g2, trace = two_batch_estimate(sq_small, b_small, sq_big, b_big)
        if not (math.isfinite(g2) and math.isfinite(trace)):
            return
        d = self.decay if self.decay is not None else self.n / (self.n + 1)
        self.g2 = d * self.g2 + (1 - d) * g2
        self.trace = d * self.trace + (1 - d) * trace
        self.weight = d * self.weight + (1 - d)
        self.n += 1
        self.b_small, self.b_big = float(b_small), float(b_big)

    def estimate(self) -> NoiseScaleEstimate:
        if self.n == 0 or self.weight <= 0:
            return NoiseScaleEstimate(math.nan, math.nan, math.nan, 0, self.b_small, self.b_big)
        g2, trace = self.g2 / self.weight, self.trace / self.weight
        b = trace / g2 if g2 > 0 and trace > 0 else math.nan
        return NoiseScaleEstimate(g2, trace, b, self.n, self.b_small, self.b_big)

    def state_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("g2", "trace", "weight", "n", "b_small", "b_big")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            setattr(self, k, int(v) if k == "n" else float(v if v is not None else math.nan))


class GradientNoiseCallback(Callback):
    """Estimates the gradient noise scale during training from small-batch and step gradients.

    The small batches are, by the trainer's data-parallel world size:

    * one process (`trainer.world_size == 1`): the micro-batches (`train.micro_batch_size` <
      `train.global_batch_size`), read by tensor hooks on every parameter — or, with `shards=N`, the N
      data-parallel shards the step would have under N ranks (rank r's rows of every loader batch, the
      `BlockLoader` split), so a single process decides exactly as an N-rank run on the same data would
      (costs N gradient copies);
    * N > 1 data-parallel ranks (DDP, FSDP): each rank's local gradient over its share of the step, whose
      norms `CrossRankMetrics` gathers into ``state.extra["local_grad_norms"]`` (measured where the
      gradient enters averaging, train/parallel/gradnorm.py); the big batch is the all-reduced step.

    After each step, `history` gets `{step, tokens, g2, trace, b_simple, ...}` (the running averages, B in
    tokens), also appended to `log_path` as JSONL when given, and the step's metrics.jsonl line gets
    noise_scale_tokens, noise_g2 and noise_trace (`train.noise_scale = true` adds this callback ahead of
    the metrics logger). `estimate()` is the current average. With fp16 loss scaling the hooks' gradients
    are divided by the scale.
    """

    def __init__(
        self,
        decay: float | None = 0.95,
        log_path: str | Path | None = None,
        skip_steps: int = 0,
        shards: int | None = None,
    ):
        if shards is not None and shards < 2:
            raise ValueError(f"shards must be at least 2, got {shards}")
        self.acc = NoiseScaleAccumulator(decay)
        self.log_path = Path(log_path) if log_path is not None else None
        self.skip_steps = skip_steps
        self.shards = shards
        self.mode = "micro"  # "micro", "shards" or "ranks", fixed at on_fit_start
        self.history: list[dict[str, Any]] = []
        self._handles: list[Any] = []
        self._sq: torch.Tensor | None = None
        self._backwards = 0
        self._first: torch.Tensor | None = None
        self._forwards = 0
        self._per_batch = 1  # micro-batches per loader batch (shards mode)
        self._shard_grads: list[list[torch.Tensor | None]] = []
        self._warned = False

    # --------------------------------------------------------------------------------- hooks
    def _hook_for(self, param: torch.Tensor) -> Any:
        def hook(grad: torch.Tensor) -> None:
            sq = grad.detach().float().pow(2).sum()
            self._sq = sq if self._sq is None else self._sq + sq
            if param is self._first:
                self._backwards += 1

        return hook

    def _shard_hook_for(self, index: int) -> Any:
        def hook(grad: torch.Tensor) -> None:
            micro = (self._forwards - 1) % self._per_batch  # index within its loader batch
            shard = micro // (self._per_batch // len(self._shard_grads))
            bufs = self._shard_grads[shard]
            g = grad.detach().float()
            bufs[index] = g.clone() if bufs[index] is None else bufs[index].add_(g)

        return hook

    def _count_forward(self, module: nn.Module, args: Any) -> None:
        if torch.is_grad_enabled() and module.training:
            self._forwards += 1

    def on_fit_start(self, trainer: Trainer) -> None:
        super().on_fit_start(trainer)
        if trainer.world_size > 1:
            self.mode = "ranks"
            return
        params = [p for g in trainer.optimizer.param_groups for p in g["params"] if p.requires_grad]
        if not params:
            raise TrainingError("GradientNoiseCallback: the optimizer has no trainable parameters")
        if self.shards is None:
            self._first = params[0]
            self._handles = [p.register_hook(self._hook_for(p)) for p in params]
            return
        self.mode = "shards"
        self._per_batch = trainer.local_batch_size // trainer.micro_batch_size
        if self._per_batch % self.shards:
            raise TrainingError(
                f"GradientNoiseCallback: shards={self.shards} must divide the {self._per_batch} "
                f"micro-batches of a batch (train.micro_batch_size must divide global_batch_size / shards)"
            )
        self._shard_grads = [[None] * len(params) for _ in range(self.shards)]
        self._handles = [p.register_hook(self._shard_hook_for(i)) for i, p in enumerate(params)]
        self._handles.append(trainer.model.register_forward_pre_hook(self._count_forward))

    def _small_batches(self, state: TrainState) -> tuple[float, float] | None:
        """(mean squared norm of the step's small-batch gradients, small batch in tokens), or None."""
        trainer = self.trainer
        assert trainer is not None
        if self.mode == "ranks":
            norms = state.extra.get("local_grad_norms")
            if not norms:
                return self._skip("no per-rank local gradient norms (needs strategy ddp or fsdp)")
            return sum(n * n for n in norms) / len(norms), trainer.step_tokens / len(norms)
        scale2 = state.loss_scale**2  # the hooks saw gradients scaled by the fp16 loss scale
        if self.mode == "shards":
            n, forwards = len(self._shard_grads), self._forwards
            sq = [sum(float(g.pow(2).sum()) for g in bufs if g is not None) for bufs in self._shard_grads]
            self._shard_grads = [[None] * len(bufs) for bufs in self._shard_grads]
            self._forwards = 0
            if forwards == 0:
                return None
            # each backward's gradient is g_i / n_micro, so shard r's mean gradient is n × its sum S_r:
            # the mean over shards of |n S_r|² is n Σ_r |S_r|²
            return n * sum(sq) / scale2, trainer.step_tokens / n
        sq_t, n_micro = self._sq, self._backwards
        self._sq, self._backwards = None, 0
        if sq_t is None:
            return None
        if n_micro < 2:
            return self._skip(
                "needs ≥ 2 micro-batches per step (set train.micro_batch_size below train.global_batch_size)"
            )
        # each backward's gradient is g_i / n_micro (the trainer scales the loss by 1/n_micro)
        return float(sq_t) * n_micro / scale2, trainer.step_tokens / n_micro

    def _skip(self, why: str) -> None:
        if not self._warned:
            log.warning("gradient noise scale %s; not estimated", why)
            self._warned = True
        return None

    def on_step_end(self, state: TrainState) -> None:
        if self.trainer is None:
            return
        small = self._small_batches(state)
        if small is None or state.step <= self.skip_steps:
            return
        sq_small, tokens_small = small
        sq_big = float(state.grad_norm) ** 2
        self.acc.add(sq_small, tokens_small, sq_big, self.trainer.step_tokens)
        est = self.acc.estimate()
        state.extra.setdefault("metrics", {}).update(
            {"noise_scale_tokens": est.b_simple, "noise_g2": est.g2, "noise_trace": est.trace}
        )
        entry = {"step": state.step, "tokens": state.tokens, **est.to_dict()}
        self.history.append(entry)
        if self.log_path is not None:
            with open(self.log_path, "a") as f:
                f.write(json.dumps(entry) + "\n")

    def on_fit_end(self, state: TrainState) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def estimate(self) -> NoiseScaleEstimate:
        return self.acc.estimate()

    def state_dict(self) -> dict[str, Any]:
        return {"acc": self.acc.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "acc" in state:
            self.acc.load_state_dict(state["acc"])


def measure_noise_scale(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    micro_batch_size: int,
    *,
    tokens_per_sequence: int | None = None,
) -> NoiseScaleEstimate:
    """A separate estimator: for each (B, T+1) batch, per-micro-batch and full-batch gradients of `model`.

    `model(x, y)` must return the mean loss. Averages the estimates of all batches equally; B is in tokens
    (sequences × T) unless `tokens_per_sequence=1`. The model's gradients are left zeroed.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    acc = NoiseScaleAccumulator(decay=None)
    for batch in batches:
        chunks = batch.split(micro_batch_size)
        if len(chunks) < 2 or any(c.shape[0] != micro_batch_size for c in chunks):
            raise TrainingError(
                f"measure_noise_scale: batch of {batch.shape[0]} must hold ≥ 2 whole micro-batches "
                f"of {micro_batch_size}"
            )
        total = [torch.zeros_like(p, dtype=torch.float32) for p in params]
        sq_small = 0.0
        for mb in chunks:
            model.zero_grad(set_to_none=True)
            loss = model(mb[:, :-1], mb[:, 1:])
            loss.backward()
            grads = [
                p.grad.float() if p.grad is not None else torch.zeros_like(t)
                for p, t in zip(params, total, strict=True)
            ]
            sq_small += float(sum(g.pow(2).sum() for g in grads))
            for t, g in zip(total, grads, strict=True):
                t.add_(g)
        sq_small /= len(chunks)
        sq_big = float(sum((t / len(chunks)).pow(2).sum() for t in total))
        per_seq = tokens_per_sequence if tokens_per_sequence is not None else batch.shape[1] - 1
        acc.add(sq_small, micro_batch_size * per_seq, sq_big, batch.shape[0] * per_seq)
    model.zero_grad(set_to_none=True)
    return acc.estimate()


def summarize_history(history: Sequence[dict[str, Any]], last_fraction: float = 0.25) -> dict[str, Any]:
    """B_simple at the start and over the last `last_fraction` of steps (it grows as the loss falls)."""
    vals = [(h["step"], h["b_simple"]) for h in history if h.get("b_simple") is not None]
    if not vals:
        return {"first": None, "last": None, "n": 0}
    k = max(1, int(len(vals) * last_fraction))
    tail = [v for _, v in vals[-k:]]
    return {"first": vals[0][1], "last": sum(tail) / len(tail), "n": len(vals), "last_step": vals[-1][0]}
