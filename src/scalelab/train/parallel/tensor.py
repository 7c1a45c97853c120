"""Tensor parallelism (Megatron-style, on DTensor) for the GPT, applied from outside the model.

Per block, on the ``tp`` mesh dimension of size T:
  * attention: `qkv` column-parallel (each rank computes the q, k, v of H/T heads), `proj` row-parallel
    (partial outputs summed by an all-reduce);
  * MLP: `fc` column-parallel, `proj` row-parallel (GELU acts on the local shard);
  * embeddings, LayerNorms and the output layer stay replicated (inputs and outputs of every block are
    replicated, so the loss is the same on every tensor-parallel rank).

`qkv`'s weight is stored as [q; k; v], each head-major; a contiguous column shard would give rank 0 all of
q and part of k. Before sharding, its rows are regrouped rank-major — rank r's rows become
[q of its heads; k of its heads; v of its heads] — so the contiguous shard is exactly what rank r needs.
The attention module's class is swapped for `TensorParallelAttention`, whose forward works on the local
heads (the model file itself stays free of `torch.distributed`). Parameter names do not change, so
optimizer groups and checkpoints are keyed as before; a checkpoint of a tensor-parallel run stores `qkv`
in the regrouped row order (a run resumes with the same `tensor_parallel`, which is part of its config).

Everything here runs on gloo: the collectives are all-reduce / all-gather (and reduce-scatter for FSDP).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from scalelab.errors import DistributedError
from scalelab.models.gpt import GPT, CausalSelfAttention


class TensorParallelAttention(CausalSelfAttention):
    """Causal self-attention on this rank's `n_local_heads` heads (q, k, v column shards of `qkv`)."""

    n_local_heads: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        qkv = self.qkv(x)  # (B, T, 3 · local width): [q_r | k_r | v_r]
        local = qkv.shape[-1] // 3
        q, k, v = qkv.split(local, dim=2)
        h = local // self.d_head
        q, k, v = (z.view(b, t, h, self.d_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        return self.proj(y.transpose(1, 2).reshape(b, t, local))


def qkv_row_order(width: int, n_heads: int, tp: int) -> torch.Tensor:
    """Row permutation of the [q; k; v] weight that makes rank r's contiguous shard [q_r; k_r; v_r]."""
    d_head = width // n_heads
    per_rank = n_heads // tp * d_head
    rows = []
    for r in range(tp):
        for part in range(3):  # q, k, v
            start = part * width + r * per_rank
            rows.append(torch.arange(start, start + per_rank))
    return torch.cat(rows)


@torch.no_grad()
def apply_tensor_parallel(model: nn.Module, tp_mesh: object) -> nn.Module:
    """Shard every block of `model` (a GPT) over `tp_mesh` in place; returns the model."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    if not isinstance(model, GPT):
        raise DistributedError(
            f"train.tensor_parallel: supported for the GPT only, got {type(model).__name__}"
        )
    tp = int(tp_mesh.size())  # type: ignore[attr-defined]
    n_heads, width = model.shape.n_heads, model.shape.width
    hidden = model.shape.mlp_hidden
    if n_heads % tp or hidden % tp:
        raise DistributedError(
            f"train.tensor_parallel={tp} must divide model.n_heads={n_heads} and the MLP width {hidden}"
        )
    order = qkv_row_order(width, n_heads, tp)
    from scalelab.train.distributed import _blocks

    for block in _blocks(model):
        attn = block.attn
        attn.qkv.weight.copy_(attn.qkv.weight[order.to(attn.qkv.weight.device)])
        attn.__class__ = TensorParallelAttention
        attn.n_local_heads = n_heads // tp
        parallelize_module(
            block,
            tp_mesh,
            {
                "attn.qkv": ColwiseParallel(),
                "attn.proj": RowwiseParallel(),
                "mlp.fc": ColwiseParallel(),
                "mlp.proj": RowwiseParallel(),
            },
        )
    return model
