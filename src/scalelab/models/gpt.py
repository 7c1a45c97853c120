"""A decoder-only transformer (GPT) that is small enough to read in one sitting.

The architecture is the one counted in `models/flops.py` — keep the two in step:
token + learned position embeddings → `depth` pre-LayerNorm blocks (causal self-attention, GELU MLP,
no biases anywhere, LayerNorm with a weight only) → final LayerNorm → output layer, tied to the token
embedding when `tie_embeddings`.

Three plain attributes exist so that a parametrization can be applied from outside the model
(`models/parametrization.py`) without the model knowing which one is in use:
  * `CausalSelfAttention.scale`     — softmax temperature; None means 1/sqrt(d_head) (SP), μP sets 1/d_head;
  * `Block.residual_multiplier`     — scales each residual branch (depth-μP/CompleteP: base_depth/depth);
  * `GPT.output_multiplier`         — scales the logits (μP readout multiplier base_width/width).

This file never imports `torch.distributed`: parallelism is applied from outside (train/parallel/), through
`embed` / `blocks` / `readout` (pipeline stages) and `tp_plan` (tensor parallelism).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from scalelab.models.flops import ModelShape
from scalelab.models.protocol import decoder_forward, readout_logits
from scalelab.spec import ModelSpec


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention through `scaled_dot_product_attention` (flash/mem-efficient kernels)."""

    def __init__(self, width: int, n_heads: int) -> None:
        super().__init__()
        if width % n_heads:
            raise ValueError(f"width={width} must be a multiple of n_heads={n_heads}")
        self.n_heads = n_heads
        self.d_head = width // n_heads
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.proj = nn.Linear(width, width, bias=False)
        self.proj.residual_out = True
        self.scale: float | None = None  # None → 1/sqrt(d_head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        # (B, T, H·d_head) → (B, H, T, d_head); H is whatever this rank holds (all heads, or its TP shard)
        q, k, v = (z.view(b, t, -1, self.d_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        return self.proj(y.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    """Two bias-free linear layers with a GELU between them."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, hidden, bias=False)
        self.proj = nn.Linear(hidden, width, bias=False)
        self.proj.residual_out = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    """Pre-LN transformer block: x + m·attn(LN(x)), then x + m·mlp(LN(x)) with m the residual multiplier."""

    def __init__(self, width: int, n_heads: int, hidden: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(width, bias=False)
        self.attn = CausalSelfAttention(width, n_heads)
        self.ln2 = nn.LayerNorm(width, bias=False)
        self.mlp = MLP(width, hidden)
        self.residual_multiplier = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.residual_multiplier * self.attn(self.ln1(x))
        return x + self.residual_multiplier * self.mlp(self.ln2(x))


class GPT(nn.Module):
    """The model: `forward(idx)` gives logits (B, T, V); `forward(idx, targets)` gives the mean CE loss."""

    #: tensor parallelism, per block (models/protocol.py): q, k, v column shards, output row shards
    tp_plan = {"attn.qkv": "colwise:3", "attn.proj": "rowwise", "mlp.fc": "colwise", "mlp.proj": "rowwise"}

    def __init__(self, shape: ModelShape) -> None:
        super().__init__()
        self.shape = shape
        d = shape.width
        self.tok_emb = nn.Embedding(shape.vocab_size, d)
        self.pos_emb = nn.Embedding(shape.context_tokens, d)
        self.blocks = nn.ModuleList(Block(d, shape.n_heads, shape.mlp_hidden) for _ in range(shape.depth))
        self.ln_f = nn.LayerNorm(d, bias=False)
        self.head = nn.Linear(d, shape.vocab_size, bias=False)
        if shape.tie_embeddings:
            self.head.weight = self.tok_emb.weight
        self.output_multiplier = 1.0
        self.register_buffer("_positions", torch.arange(shape.context_tokens), persistent=False)

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        return self.tok_emb(idx) + self.pos_emb(self._positions[: idx.shape[1]])

    def readout(self, x: torch.Tensor) -> torch.Tensor:
        return readout_logits(self, self.ln_f(x))

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        return decoder_forward(self, idx, targets)

    @property
    def embedding(self) -> nn.Embedding:
        return self.tok_emb

    def num_params(self) -> int:
        """Distinct parameters (a tied output layer is counted once), = `ModelShape.total_params`."""
        return sum(p.numel() for p in self.parameters())


def build_model(model_spec: ModelSpec, vocab_size: int | None = None) -> GPT:
    """The model of this spec, of its `model.family` (kept here for existing importers; see
    `models.registry.build_model`, which this is)."""
    from scalelab.models.registry import build_model as build

    return build(model_spec, vocab_size)  # type: ignore[return-value]
