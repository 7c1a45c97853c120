"""How each built-in model family runs one step of the KV-cached forward: its embedding at absolute
positions, the projections of a block around the attention the cache provides, and its readout.

`kvcache.extend` owns the cache and the attention over it and knows no family; a `CachedFamily` here
knows the family and no cache. Families without an adapter (user `python:` factories, `hf:` models)
are served by a cache-less full forward instead (`kvcache.forward_last`). An adapter reads the model's
public submodules only (the same modules, quantized or not, and the multipliers a parametrization set);
`cached_family` returns one only for the built-in classes, and the engine checks it against the plain
forward before using it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import nn

from scalelab.models.gpt import GPT
from scalelab.models.llama import Llama, rope_tables, rotate_half

#: attention over the cache: (q (B,T,H,dh), k, v (B,T,Hkv,dh), scale or None) → (B, T, H·dh)
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float | None], torch.Tensor]


class CachedFamily(Protocol):
    """What `kvcache.extend` needs to run a model with a cache."""

    model: nn.Module
    depth: int
    kv_heads: int
    d_head: int

    def embed(self, tokens: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """Input of the first block (B, T, D) for `tokens` at absolute `pos` (B, T), and any per-call
        context (rotary tables at `pos`) the blocks need."""
        ...

    def block(self, layer: int, x: torch.Tensor, ctx: Any, attend: Attend) -> torch.Tensor: ...

    def readout(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, V) from the last block's output."""
        ...


def _heads(z: torch.Tensor, heads: int) -> torch.Tensor:
    b, t, _ = z.shape
    return z.view(b, t, heads, -1)


class GPTCached:
    """`models/gpt.py`: learned positions, pre-LayerNorm blocks with a fused qkv, tied or untied readout."""

    def __init__(self, model: GPT) -> None:
        self.model = model
        self.depth = len(model.blocks)
        self.kv_heads = model.shape.n_heads
        self.d_head = model.shape.width // model.shape.n_heads

    def embed(self, tokens: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, Any]:
        return self.model.tok_emb(tokens) + self.model.pos_emb(pos), None

    def block(self, layer: int, x: torch.Tensor, ctx: Any, attend: Attend) -> torch.Tensor:
        blk = self.model.blocks[layer]
        attn = blk.attn
        q, k, v = attn.qkv(blk.ln1(x)).split(x.shape[-1], dim=2)
        h = attn.n_heads
        y = attend(_heads(q, h), _heads(k, h), _heads(v, h), attn.scale)
        x = x + blk.residual_multiplier * attn.proj(y)
        return x + blk.residual_multiplier * blk.mlp(blk.ln2(x))

    def readout(self, x: torch.Tensor) -> torch.Tensor:
        return _readout(self.model, self.model.ln_f(x))


class LlamaCached:
    """`models/llama.py`: rotary positions on q and k (at each token's absolute position), optional
    QK-norm, grouped-query attention (the cache holds `n_kv_heads` heads), RMSNorm, SwiGLU."""

    def __init__(self, model: Llama) -> None:
        self.model = model
        shape = model.shape
        self.depth = len(model.blocks)
        self.kv_heads = shape.kv_heads
        self.d_head = shape.d_head
        self.cos, self.sin = rope_tables(shape.context_tokens, shape.d_head)  # moved to x's device on use

    def embed(self, tokens: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, Any]:
        x = self.model.tok_emb(tokens)
        if self.cos.device != x.device:
            self.cos, self.sin = self.cos.to(x.device), self.sin.to(x.device)
        # (B, T, 1, dh): broadcast over heads in the (B, T, H, dh) layout
        return x, (self.cos[pos].to(x.dtype).unsqueeze(2), self.sin[pos].to(x.dtype).unsqueeze(2))

    def block(self, layer: int, x: torch.Tensor, ctx: Any, attend: Attend) -> torch.Tensor:
        blk = self.model.blocks[layer]
        attn = blk.attn
        cos, sin = ctx
        h = blk.attn_norm(x)
        q = _heads(attn.wq(h), attn.n_heads)
        k = _heads(attn.wk(h), attn.n_kv_heads)
        v = _heads(attn.wv(h), attn.n_kv_heads)
        if attn.q_norm is not None and attn.k_norm is not None:
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        x = x + blk.residual_multiplier * attn.wo(attend(q, k, v, attn.scale))
        return x + blk.residual_multiplier * blk.mlp(blk.mlp_norm(x))

    def readout(self, x: torch.Tensor) -> torch.Tensor:
        return _readout(self.model, self.model.norm(x))


def _readout(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    logits = model.head(x)
    mult = float(model.output_multiplier)
    return logits * mult if mult != 1.0 else logits


def cached_family(model: nn.Module) -> CachedFamily | None:
    """The KV-cache adapter of `model`'s family, or None (serve it with a cache-less forward)."""
    if isinstance(model, GPT):
        return GPTCached(model)
    if isinstance(model, Llama):
        return LlamaCached(model)
    return None
