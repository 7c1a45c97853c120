"""Fully sharded data parallelism (FSDP2, `fully_shard`) over the ``dp`` mesh dimension: one unit per
block (of the whole model or of a pipeline stage) and one at the root, with a `MixedPrecisionPolicy` for
bf16/fp16 (parameters gathered in low precision, gradients reduced in fp32)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from scalelab.spec import TrainSpec
from scalelab.train.parallel.base import Strategy, blocks_of
from scalelab.train.parallel.gradnorm import install_fsdp_norm_recorder


def mixed_precision_policy(precision: str) -> Any:
    """FSDP2's policy for `train.precision`: low-precision parameters, fp32 gradient reduction."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is None:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)


class FSDPStrategy(Strategy):
    name = "fsdp"

    def active(self, train: TrainSpec) -> bool:
        return train.strategy == "fsdp"

    def apply(self, model: nn.Module, mesh: Any, train: TrainSpec) -> nn.Module:
        from torch.distributed.fsdp import fully_shard

        dp = mesh["dp"]
        mp = mixed_precision_policy(train.precision)
        reshard = train.fsdp_reshard_after_forward
        for block in blocks_of(model):
            fully_shard(block, mesh=dp, mp_policy=mp, reshard_after_forward=reshard)
        fully_shard(model, mesh=dp, mp_policy=mp, reshard_after_forward=reshard)
        install_fsdp_norm_recorder(model, dp.get_group())
        return model


STRATEGY = FSDPStrategy()
