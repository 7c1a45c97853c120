"""Batch size and learning rate at the target scale, from the gradient noise scale.

McCandlish et al. (2018) model the steps S and examples E needed to reach a loss at batch size B as
S = S_min·(1 + B_noise/B) and E = E_min·(1 + B/B_noise): below B_noise doubling the batch nearly halves
the steps (perfect scaling), above it extra examples are mostly wasted. The **critical batch size** is
B_crit ≈ B_noise, estimated here by B_simple = tr(Σ)/|G|² (exact when the Hessian is a multiple of the
identity; otherwise an approximation the paper found within a small factor). B_noise grows as the loss
falls, so use the value measured late in training (or at the target's loss).

LR rules when the batch changes from B0 to B1 (with B_noise when known):
  * SGD — linear: lr ∝ B (Goyal et al. 2017), from the optimal step ε(B) = ε_max/(1 + B_noise/B);
    trusted while both batches are ≤ B_noise; beyond it the optimal LR saturates at ε_max. With B_noise
    given, the full form is used.
  * Adam — square root: lr ∝ sqrt(B) (Malladi et al. 2022, the SDE scaling rule; Hoffer et al. 2017);
    trusted while both batches are ≤ B_noise; beyond it we use the saturating interpolation
    lr ∝ sqrt(B/(B + B_noise)) (a heuristic with the right limits: sqrt(B) below B_noise, flat above).
Any rule is flagged untrusted when the batch changes by more than `MAX_TRUSTED_RATIO` (×8): measure then.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from scalelab.errors import SpecError

#: a batch-size change larger than this factor is never called trusted (re-tune or check instead)
MAX_TRUSTED_RATIO = 8.0

Optimizer = Literal["adam", "sgd"]


@dataclass
class LRScaling:
    """The LR for a new batch size and how far to trust it."""

    lr: float
    rule: str
    factor: float
    trusted: bool
    note: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _gain(batch: float, optimizer: Optimizer, b_noise: float | None) -> float:
    if optimizer == "sgd":
        return batch / (1.0 + batch / b_noise) if b_noise else batch
    return math.sqrt(batch / (1.0 + batch / b_noise)) if b_noise else math.sqrt(batch)


def scale_lr(
    lr: float,
    batch_from: float,
    batch_to: float,
    *,
    optimizer: Optimizer = "adam",
    b_noise: float | None = None,
) -> LRScaling:
    """The LR at `batch_to` given the tuned `lr` at `batch_from` (same unit for batches and `b_noise`)."""
    if lr <= 0 or batch_from <= 0 or batch_to <= 0:
        raise SpecError("scale_lr: lr and batch sizes must be positive")
    if optimizer not in ("adam", "sgd"):
        raise SpecError(f"scale_lr: optimizer must be 'adam' or 'sgd', got {optimizer!r}")
    if b_noise is not None and not b_noise > 0:
        b_noise = None
    factor = _gain(batch_to, optimizer, b_noise) / _gain(batch_from, optimizer, b_noise)
    base = "linear" if optimizer == "sgd" else "square-root"
    rule = f"{base}, saturating at B_noise={b_noise:.4g}" if b_noise else base
    ratio = max(batch_to, batch_from) / min(batch_to, batch_from)
    notes = []
    trusted = True
    if ratio > MAX_TRUSTED_RATIO:
        trusted = False
        notes.append(f"batch changes ×{ratio:.3g} (> ×{MAX_TRUSTED_RATIO:g}): check the LR at the new batch")
    if b_noise is None:
        notes.append("B_noise unknown: the rule assumes both batches are below the critical batch size")
    elif max(batch_from, batch_to) > b_noise:
        trusted = False
        notes.append(
            f"batch above B_noise={b_noise:.4g}: the {base} rule no longer holds there; the saturating "
            "form used is a heuristic — measure"
        )
    return LRScaling(lr * factor, rule, factor, trusted, "; ".join(notes) or "within the rule's range")


@dataclass
class BatchRecommendation:
    """A global batch (sequences and tokens) and LR for a target run, with the reasoning."""

    batch_sequences: int
    batch_tokens: int
    steps: int
    lr: float
    lr_scaling: LRScaling
    b_noise_tokens: float
    steps_overhead: float  # S/S_min − 1 = B_noise/B: extra steps over infinitely large batches
    examples_overhead: float  # E/E_min − 1 = B/B_noise: extra data over tiny batches
    reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["lr_scaling"] = self.lr_scaling.to_dict()
        return d


def recommend_batch(
    b_noise_tokens: float,
    *,
    target_tokens: int,
    context_tokens: int,
    tuned_lr: float,
    tuned_batch_sequences: int,
    optimizer: Optimizer = "adam",
    min_steps: int = 1000,
    power_of_two: bool = True,
) -> BatchRecommendation:
    """Batch ≈ B_noise (each 2× over the minimal steps and data), capped so the run keeps `min_steps` steps.

    The LR follows `scale_lr` from the tuned (batch, LR) pair. All batch quantities in tokens unless named
    `_sequences`.
    """
    if not b_noise_tokens > 0 or not math.isfinite(b_noise_tokens):
        raise SpecError(f"recommend_batch: B_noise must be a positive number of tokens, got {b_noise_tokens}")
    if target_tokens <= 0 or context_tokens <= 0 or tuned_batch_sequences <= 0:
        raise SpecError("recommend_batch: token budget, context and tuned batch must be positive")
    reasons = [f"critical batch ≈ B_noise = {b_noise_tokens:.4g} tokens"]
    seqs = b_noise_tokens / context_tokens
    cap = target_tokens / (min_steps * context_tokens)
    if seqs > cap:
        reasons.append(f"capped at {cap:.4g} sequences to keep ≥ {min_steps} optimizer steps")
        seqs = cap
    seqs = max(1.0, seqs)
    if power_of_two:
        seqs = float(2 ** math.floor(math.log2(seqs)))
        reasons.append("rounded down to a power of two")
    batch = int(seqs)
    tokens = batch * context_tokens
    scaling = scale_lr(
        tuned_lr,
        tuned_batch_sequences * context_tokens,
        tokens,
        optimizer=optimizer,
        b_noise=b_noise_tokens,
    )
    reasons.append(
        f"LR from the tuned {tuned_lr:.4g} at {tuned_batch_sequences} sequences by the {scaling.rule} rule"
    )
    return BatchRecommendation(
        batch_sequences=batch,
        batch_tokens=tokens,
        steps=max(1, target_tokens // tokens),
        lr=scaling.lr,
        lr_scaling=scaling,
        b_noise_tokens=float(b_noise_tokens),
        steps_overhead=b_noise_tokens / tokens,
        examples_overhead=tokens / b_noise_tokens,
        reasons=reasons,
    )
