"""Held-out loss of a model on a run's token store — shared by the quantization report and distillation.

The held-out set is built like the trainer's (train/build.py): ceil(tokens / context) sequences of
context+1 tokens from the store's held-out split, in the loader's seeded order, so numbers here are
comparable with a run's `eval_loss`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from scalelab.train.build import default_loader_factory
from scalelab.train.build import heldout_batches as train_heldout_batches


def heldout_batches(
    store: Any, context_tokens: int, tokens: int, *, batch_size: int = 16, seed: int = 0
) -> list[torch.Tensor]:
    """ceil(tokens / context_tokens) held-out sequences (LongTensor batches of context_tokens + 1)."""
    return train_heldout_batches(default_loader_factory, store, context_tokens, tokens, batch_size, seed)


@torch.no_grad()
def heldout_loss(model: nn.Module, batches: list[torch.Tensor], device: torch.device | str = "cpu") -> float:
    """Mean next-token cross-entropy (nats/token) of `model` over `batches`."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        batch = batch.to(device)
        loss = model(batch[:, :-1], batch[:, 1:])
        n = batch[:, 1:].numel()
        total += float(loss) * n
        count += n
    model.train(was_training)
    return total / max(1, count)
