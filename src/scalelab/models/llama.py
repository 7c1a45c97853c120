"""A Llama-style decoder (RoPE, SwiGLU, RMSNorm, grouped-query attention, untied embeddings by choice,
optional QK-norm), small enough to read in one sitting; counted in `models/flops.py`.

token embedding → `depth` pre-RMSNorm blocks (causal self-attention with rotary positions on q and k,
SwiGLU MLP w2(silu(w1·x) ⊙ w3·x), no biases) → final RMSNorm → readout (tied to the embedding only when
`tie_embeddings`; Llama unties it). Rotary embedding and weight layout follow Hugging Face's
`LlamaForCausalLM` (rotate-half, θ = 10000), so `scalelab export` copies weights as they are.
The same hooks as the GPT (`scale`, `residual_multiplier`, `output_multiplier`, `residual_out`) let a
parametrization be applied from outside. No `torch.distributed` here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from scalelab.models.flops import ModelShape
from scalelab.models.protocol import decoder_forward, readout_logits

ROPE_THETA = 10000.0
NORM_EPS = 1e-5


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_tables(context_tokens: int, d_head: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (T, d_head) of the rotary embedding: frequency θ^(-2i/d_head) for pair i."""
    inv_freq = 1.0 / ROPE_THETA ** (torch.arange(0, d_head, 2, dtype=torch.float32) / d_head)
    freqs = torch.outer(torch.arange(context_tokens, dtype=torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


class Attention(nn.Module):
    """Causal self-attention with RoPE; `n_kv_heads` < `n_heads` shares each k/v head among a group."""

    def __init__(self, width: int, n_heads: int, n_kv_heads: int, qk_norm: bool, context_tokens: int) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.d_head = n_heads, n_kv_heads, width // n_heads
        self.wq = nn.Linear(width, width, bias=False)
        self.wk = nn.Linear(width, n_kv_heads * self.d_head, bias=False)
        self.wv = nn.Linear(width, n_kv_heads * self.d_head, bias=False)
        self.wo = nn.Linear(width, width, bias=False)
        self.wo.residual_out = True
        self.q_norm = nn.RMSNorm(self.d_head, eps=NORM_EPS) if qk_norm else None
        self.k_norm = nn.RMSNorm(self.d_head, eps=NORM_EPS) if qk_norm else None
        self.scale: float | None = None  # None → 1/sqrt(d_head)
        cos, sin = rope_tables(context_tokens, self.d_head)  # per layer, so a block is called as block(x)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        # head counts from the tensors: all heads, or this rank's tensor-parallel share of them
        q = self.wq(x).view(b, t, -1, self.d_head).transpose(1, 2)
        k = self.wk(x).view(b, t, -1, self.d_head).transpose(1, 2)
        v = self.wv(x).view(b, t, -1, self.d_head).transpose(1, 2)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = self.rope_cos[:t].to(x.dtype), self.rope_sin[:t].to(x.dtype)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=self.scale, enable_gqa=self.n_kv_heads != self.n_heads
        )
        return self.wo(y.transpose(1, 2).reshape(b, t, -1))


class SwiGLU(nn.Module):
    """w2(silu(w1·x) ⊙ w3·x), bias-free."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(width, hidden, bias=False)
        self.w3 = nn.Linear(width, hidden, bias=False)
        self.w2 = nn.Linear(hidden, width, bias=False)
        self.w2.residual_out = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    """x + m·attn(norm(x)), then x + m·mlp(norm(x)), m the residual multiplier."""

    def __init__(self, shape: ModelShape) -> None:
        super().__init__()
        d = shape.width
        self.attn_norm = nn.RMSNorm(d, eps=NORM_EPS)
        self.attn = Attention(d, shape.n_heads, shape.kv_heads, shape.qk_norm, shape.context_tokens)
        self.mlp_norm = nn.RMSNorm(d, eps=NORM_EPS)
        self.mlp = SwiGLU(d, shape.mlp_hidden)
        self.residual_multiplier = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.residual_multiplier * self.attn(self.attn_norm(x))
        return x + self.residual_multiplier * self.mlp(self.mlp_norm(x))


class Llama(nn.Module):
    """The model: `forward(idx)` gives logits (B, T, V); `forward(idx, targets)` gives the mean CE loss."""

    #: tensor parallelism, per block (models/protocol.py): q/k/v and the gate/up projections column-
    #: parallel (whole heads per rank, so kv heads must divide too), the outputs row-parallel
    tp_plan = {
        "attn.wq": "colwise",
        "attn.wk": "colwise",
        "attn.wv": "colwise",
        "attn.wo": "rowwise",
        "mlp.w1": "colwise",
        "mlp.w3": "colwise",
        "mlp.w2": "rowwise",
    }

    def __init__(self, shape: ModelShape) -> None:
        super().__init__()
        if shape.width % shape.n_heads or shape.d_head % 2:
            raise ValueError(f"width={shape.width} / n_heads={shape.n_heads} must be an even integer")
        self.shape = shape
        self.tok_emb = nn.Embedding(shape.vocab_size, shape.width)
        self.blocks = nn.ModuleList(Block(shape) for _ in range(shape.depth))
        self.norm = nn.RMSNorm(shape.width, eps=NORM_EPS)
        self.head = nn.Linear(shape.width, shape.vocab_size, bias=False)
        if shape.tie_embeddings:
            self.head.weight = self.tok_emb.weight
        self.output_multiplier = 1.0

    @property
    def embedding(self) -> nn.Embedding:
        return self.tok_emb

    def num_params(self) -> int:
        """Distinct parameters (a tied readout counted once), = `ModelShape.total_params`."""
        return sum(p.numel() for p in self.parameters())

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        return self.tok_emb(idx)

    def readout(self, x: torch.Tensor) -> torch.Tensor:
        return readout_logits(self, self.norm(x))

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        return decoder_forward(self, idx, targets)
