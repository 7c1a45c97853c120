"""What scalelab needs from a model: the protocol every family (built-in or your own) follows.

A family is a factory `build(shape: ModelShape) -> nn.Module`; the module it returns has
  * `shape`             — the `ModelShape` it was built from;
  * `embedding`         — the token `nn.Embedding` (input weights);
  * `blocks`            — `nn.ModuleList` of the residual blocks, in order (depth = len(blocks));
  * `head`              — the `nn.Linear` readout to the vocabulary (its weight may be the embedding's);
  * `output_multiplier` — a float the logits are multiplied by (the parametrization sets it);
  * `forward(idx, targets=None)` — logits (B, T, V), or the mean cross-entropy when targets are given.
That is enough to train it (one process, DDP, FSDP), parametrize it (SP/μP/depth-μP), count and export it.

Two optional capabilities open the model-parallel layouts (`scalelab.train.parallel`), applied from
outside without touching the model's class:
  * **pipeline parallelism** needs the forward cut into three public steps — `embed(idx) -> x` (B, T, D),
    every block called as `block(x) -> x`, and `readout(x) -> logits` (final norm, head, multiplier) —
    with `forward` their composition (`decoder_forward` writes it for you). A stage keeps the blocks it
    owns plus the sub-modules `embed` (first stage) or `readout` (last stage) use.
  * **tensor parallelism** needs `tp_plan`: {path inside a block: "colwise" | "rowwise" | "colwise:K"}
    (Megatron-style: column-parallel inputs of attention/MLP, row-parallel outputs; "colwise:K" for a
    fused weight of K stacked equal parts, such as [q; k; v], sharded part by part). A block's forward must
    then infer its local head count from the tensors it gets (`view(b, t, -1, d_head)`), never from a
    stored head count.
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
from typing import Any, Protocol, runtime_checkable

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


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of (B, T, V) logits against (B, T) targets, in fp32."""
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))


def readout_logits(model: CausalLM, x: torch.Tensor) -> torch.Tensor:
    """The head applied to the final hidden states, times the parametrization's `output_multiplier`."""
    logits = model.head(x)
    return logits * model.output_multiplier if model.output_multiplier != 1.0 else logits


def decoder_forward(model: Any, idx: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor:
    """`forward` of a model with the pipeline capability: readout(blocks(embed(idx))), then the loss if
    targets are given. Checks the sequence fits the context."""
    if idx.shape[1] > model.shape.context_tokens:
        raise ValueError(
            f"sequence of {idx.shape[1]} tokens exceeds context_tokens={model.shape.context_tokens}"
        )
    x = model.embed(idx)
    for block in model.blocks:
        x = block(x)
    logits = model.readout(x)
    return logits if targets is None else lm_loss(logits, targets)


def stage_capable(model: nn.Module) -> bool:
    """True when `model` can be cut into pipeline stages (has `embed` and `readout`)."""
    return callable(getattr(model, "embed", None)) and callable(getattr(model, "readout", None))
