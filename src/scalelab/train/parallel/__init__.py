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


def active_strategies(train: TrainSpec) -> list[Strategy]:
    """The strategies `train` asks for, in application order."""
    found = []
    for name in STRATEGIES:
        strategy = importlib.import_module(f"{__name__}.{name}").STRATEGY
        if strategy.active(train):
            found.append(strategy)
    return found


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
