"""The shape of a parallel layout: when it applies, how it transforms a model, what the trainer needs."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from scalelab.spec import TrainSpec


class Strategy:
    """One layout (data, tensor, pipeline, …). `apply` returns the transformed model (in place or wrapped).

    A model-parallel layout owns a dimension of the device mesh: `mesh_dim` (its name), `degree_field`
    (the TrainSpec field giving its size) and `outer` (placed before the data-parallel dimension, as
    pipeline stages are, or after it, innermost, as tensor shards are — their collectives are the most
    frequent, so their ranks should be neighbours on one node).
    """

    name: ClassVar[str]
    mesh_dim: ClassVar[str | None] = None
    degree_field: ClassVar[str | None] = None
    outer: ClassVar[bool] = False

    def active(self, train: TrainSpec) -> bool:
        raise NotImplementedError

    def apply(self, model: nn.Module, mesh: Any, train: TrainSpec) -> nn.Module:
        raise NotImplementedError

    def trainer_hooks(
        self, model: nn.Module, mesh: Any, train: TrainSpec, device: torch.device
    ) -> dict[str, Any]:
        """Trainer keyword arguments this layout needs; none by default."""
        return {}


def blocks_of(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks (a ModuleList, or a pipeline stage's ModuleDict keyed by index)."""
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        return []
    return list(blocks.values()) if isinstance(blocks, nn.ModuleDict) else list(blocks)
