"""Parallelism applied from outside to any conforming model: `model = parallelize(model, mesh, train)`.

Each layout is one module of this package defining `STRATEGY` (a `base.Strategy`), named once in
`STRATEGIES` in the order layouts compose: pipeline stages are cut first, tensor parallelism then shards
each stage's blocks by the model's `tp_plan`, and one data-parallel wrapper (DDP, or FSDP2 per block)
goes around the result. The model's class is never swapped. A new layout (context parallelism, say) is one
new file here plus one name in `STRATEGIES`; `trainer_hooks` collects what a layout changes about how a
step runs (the pipeline schedule replaces the trainer's forward/backward).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

    from scalelab.spec import TrainSpec
    from scalelab.train.parallel.base import Strategy

#: the layouts, in the order they are applied (module names in this package)
STRATEGIES: tuple[str, ...] = ("pipeline", "tensor", "ddp", "fsdp")


def all_strategies() -> list[Strategy]:
    """Every registered layout, in application order."""
    return [importlib.import_module(f"{__name__}.{name}").STRATEGY for name in STRATEGIES]


def active_strategies(train: TrainSpec) -> list[Strategy]:
    """The strategies `train` asks for, in application order."""
    return [s for s in all_strategies() if s.active(train)]


def mesh_dims(train: TrainSpec) -> list[tuple[str, int, str | None]]:
    """The device mesh's dimensions as (name, size, spec field): the model-parallel layouts' own (size 1
    when off), the outer ones, then "dp" (size 0: whatever the world leaves), then the inner ones."""
    outer, inner = [], []
    for s in all_strategies():
        if s.mesh_dim is not None and s.degree_field is not None:
            (outer if s.outer else inner).append(
                (s.mesh_dim, int(getattr(train, s.degree_field)), s.degree_field)
            )
    return [*outer, ("dp", 0, None), *inner]


def parallelize(model: nn.Module, mesh: Any, train: TrainSpec) -> nn.Module:
    """`model` (built, parametrized, on its device) made parallel over `mesh` (dims pp, dp, tp) as `train`
    says; returns the module the trainer calls (it is `model` itself, or a stage / wrapper around it)."""
    for strategy in active_strategies(train):
        model = strategy.apply(model, mesh, train)
    return model


def trainer_hooks(model: nn.Module, mesh: Any, train: TrainSpec, device: torch.device) -> dict[str, Any]:
    """Keyword arguments for `Trainer` that the active layouts need (e.g. the pipeline schedule's step)."""
    hooks: dict[str, Any] = {}
    for strategy in active_strategies(train):
        hooks.update(strategy.trainer_hooks(model, mesh, train, device))
    return hooks


def unwrap(model: nn.Module) -> nn.Module:
    """The module under a DDP wrapper (others wrap in place): the parameters' owner, for saving and export."""
    return getattr(model, "module", model)
