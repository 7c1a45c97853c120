"""Bring your own model: a factory scalelab builds, parametrizes (SP/μP), counts and trains like its own.

This one is a "parallel-block" transformer (GPT-J/PaLM style): each block reads one RMSNorm of the
residual stream and adds attention and a ReLU² MLP to it side by side, with learned positions and a tied
readout. A spec names the factory as

    [study.model]
    family = "python:custom_model:build"     # module custom_model, function build

and the module must be importable where runs train, e.g.

    PYTHONPATH=examples scalelab study run examples/custom_model.toml --out runs/custom

What scalelab needs from the module `build` returns (scalelab.models.protocol): `shape`, `embedding`,
`blocks`, `head`, `output_multiplier` and `forward(idx, targets=None)`; the hooks below (`scale` and
`d_head` on attention, `residual_multiplier` on blocks, `residual_out` on the layers that write into the
residual stream) let μP and depth-μP reach inside. Parameters and FLOPs are counted from what it builds.
Two optional pieces open the model-parallel layouts: `embed` / `readout` with blocks called as `block(x)`
(pipeline stages), and `tp_plan` with head counts taken from the tensors (tensor parallelism).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from scalelab.models.flops import ModelShape
from scalelab.models.protocol import decoder_forward, readout_logits


class ParallelBlock(nn.Module):
    """x + m·(attn(n(x)) + mlp(n(x))) with n one RMSNorm: attention and MLP read the same input."""

    def __init__(self, shape: ModelShape) -> None:
        super().__init__()
        d, self.n_heads, self.d_head = shape.width, shape.n_heads, shape.d_head
        self.norm = nn.RMSNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.attn_out = nn.Linear(d, d, bias=False)
        self.up = nn.Linear(d, shape.mlp_hidden, bias=False)
        self.down = nn.Linear(shape.mlp_hidden, d, bias=False)
        self.attn_out.residual_out = self.down.residual_out = True
        self.scale: float | None = None  # attention temperature; None → 1/sqrt(d_head)
        self.residual_multiplier = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        h = self.norm(x)
        # -1: all heads, or this rank's share of them under tensor parallelism
        q, k, v = (z.view(b, t, -1, self.d_head).transpose(1, 2) for z in self.qkv(h).chunk(3, -1))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        attn = self.attn_out(a.transpose(1, 2).reshape(b, t, -1))
        mlp = self.down(F.relu(self.up(h)).square())
        return x + self.residual_multiplier * (attn + mlp)


class ParallelLM(nn.Module):
    """Token + learned position embedding → parallel blocks → RMSNorm → tied readout."""

    #: tensor parallelism: the fused [q; k; v] and the MLP input column-parallel, both outputs row-parallel
    tp_plan = {"qkv": "colwise:3", "attn_out": "rowwise", "up": "colwise", "down": "rowwise"}

    def __init__(self, shape: ModelShape) -> None:
        super().__init__()
        self.shape = shape
        self.tok_emb = nn.Embedding(shape.vocab_size, shape.width)
        self.pos_emb = nn.Embedding(shape.context_tokens, shape.width)
        self.blocks = nn.ModuleList(ParallelBlock(shape) for _ in range(shape.depth))
        self.norm = nn.RMSNorm(shape.width)
        self.head = nn.Linear(shape.width, shape.vocab_size, bias=False)
        self.head.weight = self.tok_emb.weight
        self.output_multiplier = 1.0

    @property
    def embedding(self) -> nn.Embedding:
        return self.tok_emb

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        return self.tok_emb(idx) + self.pos_emb(torch.arange(idx.shape[1], device=idx.device))

    def readout(self, x: torch.Tensor) -> torch.Tensor:
        return readout_logits(self, self.norm(x))

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        return decoder_forward(self, idx, targets)  # readout(blocks(embed(idx))), + the loss


def build(shape: ModelShape) -> ParallelLM:
    """The factory `model.family = "python:custom_model:build"` names."""
    return ParallelLM(shape)
