"""How each built-in model family runs one step of the KV-cached forward: its embedding at absolute
positions, the projections of a block around the attention the cache provides, and its readout.

`kvcache.extend` owns the cache and the attention over it and knows no family; a `CachedFamily` here
knows the family and no cache. Families without an adapter (user `python:` factories, `hf:` models)
are served by a cache-less full forward instead (`kvcache.forward_last`). An adapter reads the model's
public submodules only (the same modules, quantized or not, and the multipliers a parametrization set);
`cached_family` returns one only for the built-in classes, and the engine checks it against the plain
forward before using it. The readout is the model's own (`readout(x)`, models/protocol.py); the embedding
is not, since the model's `embed(idx)` places tokens at positions 0..T-1 and a decode step is at T.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import nn

from scalelab.models.gpt import GPT
from scalelab.models.llama import Llama, rotate_half

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
        """Logits (B, T, V) from the last block's output (the model's own `readout`)."""
        ...


def _heads(z: torch.Tensor, heads: int) -> torch.Tensor:
    b, t, _ = z.shape
    return z.view(b, t, heads, -1)


class _Adapter:
    """What every adapter shares: the model, its depth, and its own readout."""

    def __init__(self, model: nn.Module) -> None:
        self.model: Any = model
        self.depth = len(model.blocks)

    def readout(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.readout(x)  # type: ignore[no-any-return]


class GPTCached(_Adapter):
    """`models/gpt.py`: learned positions, pre-LayerNorm blocks with a fused qkv, tied or untied readout."""

    def __init__(self, model: GPT) -> None:
        super().__init__(model)
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


class LlamaCached(_Adapter):
    """`models/llama.py`: rotary positions on q and k (at each token's absolute position), optional
    QK-norm, grouped-query attention (the cache holds `n_kv_heads` heads), RMSNorm, SwiGLU."""

    def __init__(self, model: Llama) -> None:
        super().__init__(model)
        shape = model.shape
        self.kv_heads = shape.kv_heads
        self.d_head = shape.d_head

    def embed(self, tokens: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, Any]:
        x = self.model.tok_emb(tokens)
        attn = self.model.blocks[0].attn  # every layer holds the same rotary tables
        # (B, T, 1, dh) at each token's absolute position: broadcast over heads in the (B, T, H, dh) layout
        cos, sin = (t[pos].to(x.dtype).unsqueeze(2) for t in (attn.rope_cos, attn.rope_sin))
        return x, (cos, sin)

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


def cached_family(model: nn.Module) -> CachedFamily | None:
    """The KV-cache adapter of `model`'s family, or None (serve it with a cache-less forward)."""
    if isinstance(model, GPT):
        return GPTCached(model)
    if isinstance(model, Llama):
        return LlamaCached(model)
    return None
