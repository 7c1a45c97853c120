"""Tensor parallelism (Megatron-style, on DTensor) for any model with a `tp_plan`, applied from outside.

A model family states per block which linear layers are column-parallel (each rank computes a slice of
the outputs: q, k, v of its heads, its share of the MLP's hidden units) and which are row-parallel
(partial outputs summed by an all-reduce), e.g. the GPT's
``{"attn.qkv": "colwise:3", "attn.proj": "rowwise", "mlp.fc": "colwise", "mlp.proj": "rowwise"}``.
Embeddings, norms and the readout stay replicated, so every block's input and output — and the loss — are
the same on every tensor-parallel rank. Blocks take their local head count from the tensors they get
(models/protocol.py), so no class is swapped and no forward is forked.

"colwise:K" is a fused weight of K stacked equal parts ([q; k; v]): a contiguous column shard would give
rank 0 all of q and part of k, so its rows are regrouped rank-major before sharding — rank r's rows become
[part 1 of r; …; part K of r]. Parameter names do not change (optimizer groups and checkpoints are keyed
as before); a checkpoint of a tensor-parallel run stores the regrouped order, which `plain_order` undoes
for serving and export (a run resumes with the same `tensor_parallel`, which is part of its config).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from scalelab.errors import DistributedError
from scalelab.spec import TrainSpec
from scalelab.train.parallel.base import Strategy, blocks_of

STYLES = ("colwise", "rowwise")


def parse_style(path: str, style: str) -> tuple[str, int]:
    """("colwise" | "rowwise", number of fused parts) of a plan entry; DistributedError when malformed."""
    kind, _, parts = style.partition(":")
    if kind not in STYLES or (parts and (kind != "colwise" or not parts.isdigit() or int(parts) < 1)):
        raise DistributedError(
            f"tp_plan[{path!r}] = {style!r}: expected 'colwise', 'rowwise' or 'colwise:K' (K fused parts)"
        )
    return kind, int(parts or 1)


def fused_row_order(rows: int, parts: int, tp: int) -> torch.Tensor:
    """Row permutation of a weight of `parts` stacked equal parts that makes rank r's contiguous shard
    [part 1 of r; …; part K of r]."""
    size = rows // parts
    per_rank = size // tp
    return torch.cat(
        [
            torch.arange(part * size + r * per_rank, part * size + (r + 1) * per_rank)
            for r in range(tp)
            for part in range(parts)
        ]
    )


def tp_plan_of(model: nn.Module) -> Mapping[str, str]:
    """The model's per-block plan; DistributedError naming the family when it has none."""
    plan = getattr(model, "tp_plan", None)
    if not plan:
        family = getattr(getattr(model, "shape", None), "family", type(model).__name__)
        raise DistributedError(
            f"train.tensor_parallel: model family {family!r} states no tp_plan "
            "(see scalelab.models.protocol); use tensor_parallel = 1"
        )
    return plan


def plain_order(state: dict[str, torch.Tensor], plan: Mapping[str, str], tp: int) -> dict[str, torch.Tensor]:
    """A full state dict saved by a tensor-parallel run, with every fused weight back in its plain row order."""
    out = dict(state)
    for path, style in plan.items():
        _, parts = parse_style(path, style)
        if parts == 1:
            continue
        suffix = f".{path}.weight"
        for name, weight in state.items():
            if name.startswith("blocks.") and name.endswith(suffix):
                order = fused_row_order(weight.shape[0], parts, tp)
                out[name] = weight[torch.argsort(order)]
    return out


def _check_divisible(model: nn.Module, block: nn.Module, plan: Mapping[str, str], tp: int) -> None:
    shape = getattr(model, "shape", None)
    for what in ("n_heads", "kv_heads"):
        value = getattr(shape, what, None)
        if value is not None and value % tp:
            raise DistributedError(f"train.tensor_parallel={tp} must divide model.{what}={value}")
    for path, style in plan.items():
        kind, parts = parse_style(path, style)
        layer = block.get_submodule(path)
        if not isinstance(layer, nn.Linear):
            raise DistributedError(f"tp_plan[{path!r}]: {type(layer).__name__} is not an nn.Linear")
        dim = layer.out_features if kind == "colwise" else layer.in_features
        if dim % (parts * tp):
            raise DistributedError(
                f"train.tensor_parallel={tp} must divide {path} ({dim} {'outputs' if kind == 'colwise' else 'inputs'}"
                f"{f' in {parts} parts' if parts > 1 else ''})"
            )


class TensorStrategy(Strategy):
    name = "tensor"
    mesh_dim = "tp"
    degree_field = "tensor_parallel"

    def active(self, train: TrainSpec) -> bool:
        return train.tensor_parallel > 1

    @torch.no_grad()
    def apply(self, model: nn.Module, mesh: Any, train: TrainSpec) -> nn.Module:
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        tp_mesh = mesh["tp"]
        tp = int(tp_mesh.size())
        plan = tp_plan_of(model)
        styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
        for block in blocks_of(model):
            _check_divisible(model, block, plan, tp)
            for path, style in plan.items():
                kind, parts = parse_style(path, style)
                if parts > 1:
                    weight = block.get_submodule(path).weight
                    weight.copy_(weight[fused_row_order(weight.shape[0], parts, tp).to(weight.device)])
            parallelize_module(
                block, tp_mesh, {path: styles[parse_style(path, style)[0]]() for path, style in plan.items()}
            )
        return model


STRATEGY = TensorStrategy()
