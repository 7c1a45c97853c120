"""Data parallelism with `DistributedDataParallel` over the ``dp`` mesh dimension, measuring each rank's
local gradient norm before the all-reduce (train/parallel/gradnorm.py)."""

from __future__ import annotations

from typing import Any

from torch import nn

from scalelab.spec import TrainSpec
from scalelab.train.parallel.base import Strategy
from scalelab.train.parallel.gradnorm import GradNormRecorder


class DDPStrategy(Strategy):
    name = "ddp"

    def active(self, train: TrainSpec) -> bool:
        return train.strategy == "ddp"

    def apply(self, model: nn.Module, mesh: Any, train: TrainSpec) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        dp = mesh["dp"]
        device = next(model.parameters()).device
        ddp = DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            process_group=dp.get_group(),
        )
        GradNormRecorder.install(ddp, dp.get_group())
        return ddp


STRATEGY = DDPStrategy()
