"""What scalelab needs from a model: the protocol every family (built-in or your own) follows.

A family is a factory `build(shape: ModelShape) -> nn.Module`; the module it returns has
  * `shape`             — the `ModelShape` it was built from;
  * `embedding`         — the token `nn.Embedding` (input weights);
  * `blocks`            — `nn.ModuleList` of the residual blocks, in order (depth = len(blocks));
  * `head`              — the `nn.Linear` readout to the vocabulary (its weight may be the embedding's);
  * `output_multiplier` — a float the logits are multiplied by (the parametrization sets it);
  * `forward(idx, targets=None)` — logits (B, T, V), or the mean cross-entropy when targets are given
    (`lm_output` does this last step for you).
Optional hooks a parametrization uses when present: a block's `residual_multiplier` (depth-μP), an
attention module's `scale` and `d_head` (μP's 1/d_head), and `residual_out = True` on the linear layers
that write into the residual stream (their init shrinks with depth). Parameters are classified by which
of their dimensions grow with width (`models/parametrization.py`), never by their names.

Counting: the built-in families state their counts as formulas (`models/flops.py`); any other model is
counted from what it builds (`models/registry.counts`). Name yours in a spec as
`model.family = "python:pkg.module:build"` (see examples/custom_model.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from scalelab.models.flops import ModelShape


@runtime_checkable
class CausalLM(Protocol):
    """A decoder-only language model scalelab can train, parametrize, count and export."""

    shape: ModelShape
    blocks: nn.ModuleList
    head: nn.Linear
    output_multiplier: float

    @property
    def embedding(self) -> nn.Embedding: ...

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor: ...


#: a family: builds the model of a shape (weights at torch's default init; the parametrization re-inits).
Factory = Callable[[ModelShape], nn.Module]


def lm_output(model: CausalLM, x: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor:
    """The last step of every family's forward: readout × output_multiplier, then the loss if asked."""
    logits = model.head(x)
    if model.output_multiplier != 1.0:
        logits = logits * model.output_multiplier
    if targets is None:
        return logits
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
