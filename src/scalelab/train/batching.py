"""Batch sizing: the largest micro-batch that fits, token-budget packing, and a batch-size controller.

* `find_micro_batch` keeps the global batch fixed and picks how many sequences go through one forward
  (the rest is gradient accumulation): on CUDA by trying forward+backward passes and backing off on
  out-of-memory, on CPU from a memory estimate (`estimate_train_bytes`) against a budget.
* `pack_documents` groups documents into bins of at most `token_budget` tokens (first-fit decreasing),
  for variable-length batches with little padding.
* `BatchSizeController` grows the global batch during training by a schedule (tokens seen → multiple of
  the base batch) and `NoiseScaleBatchController` grows and shrinks it from the gradient noise scale
  (train/noise_scale.py; single process, DDP or FSDP), each logging every change and its reason. The LR schedule keeps following the tokens seen, and the token
  budget stays the same (fewer, larger steps).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from scalelab.models.flops import ModelShape
from scalelab.train.trainer import Callback, TrainState

log = logging.getLogger(__name__)

#: bytes per parameter for fp32 weights + gradients + two AdamW moments
OPTIMIZER_BYTES_PER_PARAM = 16


def divisors_desc(n: int) -> list[int]:
    """Divisors of n, largest first."""
    return [d for d in range(n, 0, -1) if n % d == 0]


def estimate_train_bytes(shape: ModelShape, micro_batch_size: int, precision: str = "fp32") -> int:
    """Rough peak memory of one training micro-step: weights, gradients and AdamW state, plus activations.

    Activations saved for backward, per layer per token: ~8·d (norm outputs, q/k/v, attention output,
    residual) + 2·h (MLP pre/post GELU) + n_heads·T (attention probabilities of the non-fused path), plus
    3·V per token for the logits and the loss's softmax. Element size 4 bytes (fp32) or 2 (bf16/fp16,
    though autocast keeps some tensors in fp32, so this is a lower bound there).
    """
    elem = 4 if precision == "fp32" else 2
    d, h, t = shape.width, shape.mlp_hidden, shape.context_tokens
    per_token = shape.depth * (8 * d + 2 * h + shape.n_heads * t) + 3 * shape.vocab_size
    activations = micro_batch_size * t * per_token * elem
    return shape.total_params * OPTIMIZER_BYTES_PER_PARAM + activations


def memory_budget(device: torch.device) -> int:
    """Default budget for the estimate: 80 % of the GPU's free memory on CUDA, half the available RAM on CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.8)
    import psutil

    return int(psutil.virtual_memory().available * 0.5)


def find_micro_batch(
    shape: ModelShape,
    global_batch_size: int,
    *,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    memory_budget_bytes: int | None = None,
    model: nn.Module | None = None,
    try_step: Callable[[int], None] | None = None,
) -> int:
    """The largest divisor of `global_batch_size` whose micro-step fits in memory.

    CPU (or no `model`/`try_step` given): the estimate of `estimate_train_bytes` against
    `memory_budget_bytes` (default: `memory_budget(device)`). CUDA with a `model`: a real forward+backward
    on random tokens per candidate, largest first, backing off on `torch.cuda.OutOfMemoryError`
    (`try_step(micro_batch_size)` replaces that probe, e.g. in tests). Returns at least 1.
    """
    device = torch.device(device)
    candidates = divisors_desc(global_batch_size)
    if try_step is None and device.type == "cuda" and model is not None:
        try_step = _cuda_probe(model, shape, device, precision)
    if try_step is None:
        budget = memory_budget_bytes if memory_budget_bytes is not None else memory_budget(device)
        for mb in candidates:
            if estimate_train_bytes(shape, mb, precision) <= budget:
                log.info("micro batch %d fits the %d-byte budget (estimate)", mb, budget)
                return mb
        log.warning("even micro batch 1 exceeds the memory budget of %d bytes (estimate)", budget)
        return 1
    for mb in candidates:
        try:
            try_step(mb)
        except torch.cuda.OutOfMemoryError:
            log.info("micro batch %d: out of memory, backing off", mb)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            continue
        log.info("micro batch %d fits", mb)
        return mb
    raise torch.cuda.OutOfMemoryError(f"even micro batch 1 does not fit on {device}")


def _cuda_probe(
    model: nn.Module, shape: ModelShape, device: torch.device, precision: str
) -> Callable[[int], None]:
    from scalelab.train.precision import autocast

    def probe(mb: int) -> None:
        idx = torch.randint(0, shape.vocab_size, (mb, shape.context_tokens + 1), device=device)
        try:
            with autocast(device.type, precision):
                loss = model(idx[:, :-1], idx[:, 1:])
            loss.backward()
        finally:
            model.zero_grad(set_to_none=True)

    return probe


def pack_documents(lengths: Sequence[int], token_budget: int) -> list[list[int]]:
    """Indices of documents grouped into bins of at most `token_budget` tokens (first-fit decreasing).

    A document longer than the budget gets a bin of its own (the caller truncates or splits it).
    Bins come out in order of their first (longest) document; indices within a bin are ascending.
    """
    if token_budget < 1:
        raise ValueError(f"token_budget must be positive, got {token_budget}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[int] = []
    for i in order:
        n = lengths[i]
        for b, room in enumerate(free):
            if n <= room:
                bins[b].append(i)
                free[b] -= n
                break
        else:
            bins.append([i])
            free.append(max(0, token_budget - n))
    return [sorted(b) for b in bins]


class _BatchGrowth(Callback):
    """Base of the batch-size controllers: applies a new multiplier of the base batch and keeps the log of
    changes (step, tokens, from, to, reason), which is saved with checkpoints and goes into record.json."""

    def __init__(self) -> None:
        self.changes: list[dict[str, Any]] = []

    def _set(self, state: TrainState, multiplier: int, reason: str) -> None:
        trainer = self.trainer
        assert trainer is not None
        base = trainer.train.global_batch_size
        change = {
            "step": state.step,
            "tokens": state.tokens,
            "from": base * trainer.batch_multiplier,
            "to": base * multiplier,
            "reason": reason,
        }
        log.info(
            "global batch %d → %d sequences at step %d (%s)", change["from"], change["to"], state.step, reason
        )
        trainer.set_batch_multiplier(multiplier)
        self.changes.append(change)
        state.extra.setdefault("metrics", {})["batch_change"] = reason

    def state_dict(self) -> dict[str, Any]:
        return {"changes": list(self.changes)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.changes = list(state.get("changes", []))


class BatchSizeController(_BatchGrowth):
    """Grows the global batch by a schedule: `[(tokens_seen, multiplier), ...]`, multiplier of the base batch.

    After each step the largest entry with `tokens_seen ≤ state.tokens` applies.
    """

    def __init__(self, schedule: Sequence[tuple[int, int]]) -> None:
        super().__init__()
        self.schedule = sorted((int(t), int(m)) for t, m in schedule)
        if any(m < 1 for _, m in self.schedule):
            raise ValueError("batch multipliers must be ≥ 1")

    def target(self, tokens: int) -> tuple[int, int | None]:
        mult, at = 1, None
        for threshold, m in self.schedule:
            if tokens >= threshold:
                mult, at = m, threshold
        return mult, at

    def on_step_end(self, state: TrainState) -> None:
        trainer = self.trainer
        if trainer is None or state.stop:
            return
        mult, at = self.target(state.tokens)
        if mult != trainer.batch_multiplier:
            self._set(state, mult, f"schedule: tokens seen {state.tokens} ≥ {at}")


class NoiseScaleBatchController(_BatchGrowth):
    """Doubles the global batch while the gradient noise scale says a larger batch is still efficient, and
    halves it (optionally) when the noise scale falls well below it.

    McCandlish et al. (2018): the critical batch size B_crit ≈ B_simple; below it, doubling the batch
    nearly halves the steps needed, above it the extra examples are mostly wasted. So when the running
    estimate `estimator.estimate().b_simple` (tokens) is at least `headroom` × the current batch in tokens,
    the batch doubles, up to `max_multiplier` × the base; when `shrink_below` is set and B_simple is below
    `shrink_below` × the batch, it halves, down to the base (`train.global_batch_size`). Either only after
    `min_measurements` estimates and at least `min_steps` steps since the last change, so a noisy early
    estimate does not trigger it. `shrink_below ≤ headroom / 2` keeps a doubling from being undone at
    once. The decision depends only on the estimate and the batch, so runs whose estimates agree (one
    process with `shards=N`, N data-parallel ranks) decide alike. The learning rate keeps following the
    schedule over tokens.
    """

    def __init__(
        self,
        estimator: Any,
        max_multiplier: int,
        *,
        headroom: float = 2.0,
        shrink_below: float | None = None,
        min_measurements: int = 20,
        min_steps: int = 10,
    ) -> None:
        super().__init__()
        if max_multiplier < 1 or headroom <= 0:
            raise ValueError("max_multiplier must be ≥ 1 and headroom positive")
        if shrink_below is not None and not 0 < shrink_below <= headroom / 2:
            raise ValueError(
                f"shrink_below must be in (0, headroom / 2 = {headroom / 2:g}], got {shrink_below}"
            )
        self.estimator = estimator
        self.max_multiplier = max_multiplier
        self.headroom = headroom
        self.shrink_below = shrink_below
        self.min_measurements = min_measurements
        self.min_steps = min_steps

    def decide(self, b_simple: float, batch_tokens: int, multiplier: int) -> tuple[int, str] | None:
        """The new multiplier and the reason, or None to keep `multiplier` (B_simple and batch in tokens)."""
        if not b_simple > 0:
            return None
        if b_simple >= self.headroom * batch_tokens and 2 * multiplier <= self.max_multiplier:
            why = f"≥ {self.headroom:g} × batch {batch_tokens} tokens: grow"
            return 2 * multiplier, f"noise scale B_simple = {b_simple:.4g} tokens {why}"
        if self.shrink_below is not None and multiplier > 1 and b_simple < self.shrink_below * batch_tokens:
            why = f"< {self.shrink_below:g} × batch {batch_tokens} tokens: shrink"
            return max(1, multiplier // 2), f"noise scale B_simple = {b_simple:.4g} tokens {why}"
        return None

    def on_step_end(self, state: TrainState) -> None:
        trainer = self.trainer
        if trainer is None or state.stop:
            return
        last = self.changes[-1]["step"] if self.changes else 0
        est = self.estimator.estimate()
        if est.n < self.min_measurements or state.step - last < self.min_steps:
            return
        decision = self.decide(est.b_simple, trainer.step_tokens, trainer.batch_multiplier)
        if decision is not None:
            self._set(state, *decision)
