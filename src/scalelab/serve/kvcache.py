"""The cached forward pass: a slot pool of key/value tensors and `extend`, which runs new tokens through
the model while reading and writing that pool; and `forward_last`, the cache-less alternative.

Why here and not in the model files: the training model stays a plain full-sequence forward; serving
reuses its very modules (embeddings, norms, the Linear layers — quantized or not — and the multipliers a
parametrization set) in a different order, through the family's adapter (`serve/families.py`). `extend`
is the one inference primitive: prefill is `extend` of a whole prompt from position 0 (or from a cached
prefix), a decode step is `extend` of one token per sequence. Rows may have different start positions
and lengths (right padding): a query at absolute position p attends to cached keys 0..p of its own slot,
so padding never leaks into real tokens and sequences of any length share one batched call.
Models without an adapter run `forward_last`: the whole of every sequence through `model(idx)` at each
step (right padding is harmless under causal attention) — correct for any causal LM, and slower.
"""

from __future__ import annotations

import functools
import heapq
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from scalelab.serve.families import CachedFamily


class SlotPool:
    """`slots` request slots (a request owns one from admission until it finishes or is cancelled)."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self._free = list(range(slots))  # a heap: the lowest free slot first, so busy slots stay compact

    @property
    def nbytes(self) -> int:
        return 0

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise RuntimeError("KV pool exhausted: no free slot")
        return heapq.heappop(self._free)

    def release(self, slot: int) -> None:
        heapq.heappush(self._free, slot)


class KVPool(SlotPool):
    """Slots with preallocated keys/values: k, v of shape (depth, slots, kv_heads, context, d_head)."""

    def __init__(self, family: CachedFamily, slots: int, device: torch.device | str = "cpu") -> None:
        super().__init__(slots)
        self.family = family
        device = torch.device(device)
        self.context_tokens = ctx = family.model.shape.context_tokens
        zero = torch.zeros(1, 1, dtype=torch.long, device=device)
        with torch.inference_mode():
            dtype = family.embed(zero, zero)[0].dtype  # the residual stream's (norms stay floating point)
        size = (family.depth, slots, family.kv_heads, ctx, family.d_head)
        self.k = torch.zeros(size, dtype=dtype, device=device)
        self.v = torch.zeros(size, dtype=dtype, device=device)

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def read(self, slot: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of the first `length` positions of `slot`: (depth, heads, length, d_head) each."""
        return self.k[:, slot, :, :length].clone(), self.v[:, slot, :, :length].clone()

    def write(self, slot: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Put a prefix's keys/values (depth, heads, length, d_head) at positions 0..length-1 of `slot`."""
        n = k.shape[2]
        self.k[:, slot, :, :n] = k
        self.v[:, slot, :, :n] = v


@torch.inference_mode()
def extend(
    pool: KVPool,
    slots: torch.Tensor,
    tokens: torch.Tensor,
    starts: torch.Tensor,
    lengths: torch.Tensor,
    *,
    last_only: bool = False,
) -> torch.Tensor:
    """Logits (B, T, V) for `tokens` (B, T) placed at positions starts[b] + t of slot slots[b]; with
    `last_only`, (B, V) logits after each row's last real token only (a prefill needs no others, and the
    readout is most of a token's cost when the vocabulary is large).

    Only the first lengths[b] tokens of row b are real (the rest is padding: its keys/values are not
    stored and its logits are meaningless). The pool must already hold positions 0..starts[b]-1.
    `slots`, `starts` and `lengths` are small host (CPU) tensors: every index is worked out here and
    sent to the device ahead of the kernels, so a call never waits for the GPU (a boolean mask or a
    `.max()` on device tensors would, once per layer). `tokens` may live on either.
    """
    b, t = tokens.shape
    device = pool.k.device
    family = pool.family
    slots, starts, lengths = slots.cpu(), starts.cpu(), lengths.cpu()
    ctx = pool.context_tokens
    end = int((starts + lengths).max())
    if end > ctx:
        raise ValueError(f"sequence of {end} tokens exceeds context_tokens={ctx}")
    steps = torch.arange(t)
    pos = (starts[:, None] + steps[None, :]).clamp(max=ctx - 1)  # (B, T) absolute positions
    rows = (steps[None, :] < lengths[:, None]).reshape(-1).nonzero().squeeze(1)  # real (b, t) as b·T + t
    write_slot = slots[:, None].expand(b, t).reshape(-1)[rows]
    write_pos = pos.reshape(-1)[rows]  # padding past the context was clamped; it is never stored

    def there(x: torch.Tensor) -> torch.Tensor:
        return x.to(device, non_blocking=True)

    first = int(slots[0])
    contiguous = bool(torch.equal(slots, torch.arange(first, first + b)))
    all_real = rows.numel() == b * t
    hkv, d_head = pool.k.shape[2], pool.k.shape[4]
    # one flat row of a layer's (slots·kv_heads·context, d_head) view per stored (token, head): one
    # index_copy_ a layer (advanced-index assignment with two index tensors took ~3x as long at 32 slots)
    flat = ((write_slot[:, None] * hkv + torch.arange(hkv)[None, :]) * ctx + write_pos[:, None]).reshape(-1)
    rows, flat, slots, pos = map(there, (rows, flat, slots, pos))

    def rows_of(pool_layer: torch.Tensor) -> torch.Tensor:
        # a view when the batch is a run of consecutive slots (a full decode batch is); else a gather.
        # index_select, not pool_layer[slots]: advanced indexing was ~4x slower (450 vs 125 µs at 32 slots)
        if contiguous:
            return pool_layer[first : first + b, :, :end]
        return pool_layer.index_select(0, slots)[:, :, :end]

    keys = torch.arange(end, device=device)
    allowed = (keys[None, None, :] <= pos[:, :, None]).unsqueeze(1)  # (B, 1, T, end): causal within the slot
    # additive float mask, made once for all layers (SDPA would convert a boolean one in every call)
    mask = torch.zeros(allowed.shape, device=device).masked_fill_(~allowed, float("-inf"))
    x, step_ctx = family.embed(tokens.to(device, non_blocking=True), pos)
    mask = mask.to(x.dtype)

    def store(pool_layer: torch.Tensor, z: torch.Tensor) -> None:
        z = z.reshape(b * t, hkv, d_head)
        if not all_real:
            z = z.index_select(0, rows)
        pool_layer.view(-1, d_head).index_copy_(0, flat, z.reshape(-1, d_head).to(pool_layer.dtype))

    def attend(
        layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None
    ) -> torch.Tensor:
        # q (B, T, H, dh); k, v (B, T, Hkv, dh): store the real rows' k/v, attend over the slot's cache
        store(pool.k[layer], k)
        store(pool.v[layer], v)
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            rows_of(pool.k[layer]),
            rows_of(pool.v[layer]),
            attn_mask=mask,
            scale=scale,
            enable_gqa=hkv != q.shape[2],
        )
        return y.transpose(1, 2).reshape(b, t, -1)

    for layer in range(family.depth):
        x = family.block(layer, x, step_ctx, functools.partial(attend, layer))
    if last_only:
        last = there((lengths - 1).clamp(min=0))
        return family.readout(x[torch.arange(b, device=device), last][:, None])[:, 0]
    return family.readout(x)


@torch.inference_mode()
def cache_mismatch(family: CachedFamily, device: torch.device | str = "cpu", tokens: int = 12) -> str | None:
    """None when `extend` (a prefill, then one token at a time) gives the logits of the model's own
    forward on a probe sequence; else what differs. Guards an adapter against a model it misreads."""
    model = family.model
    shape = model.shape
    n = max(2, min(tokens, shape.context_tokens))
    idx = (torch.arange(n) * 7 + 1) % shape.vocab_size
    idx = idx[None].to(device)
    try:
        full = model(idx).float()
        pool = KVPool(family, 1, device)
        half = n // 2
        zero = torch.zeros(1, dtype=torch.long)
        parts = [extend(pool, zero, idx[:, :half], zero, torch.tensor([half]))]
        for t in range(half, n):
            parts.append(extend(pool, zero, idx[:, t : t + 1], torch.tensor([t]), torch.tensor([1])))
        cached = torch.cat(parts, dim=1).float()
    except Exception as err:  # noqa: BLE001 — any failure means: do not use the cache for this model
        return f"{type(err).__name__}: {err}"
    if cached.shape != full.shape:
        return f"logits of shape {tuple(cached.shape)}, the model gives {tuple(full.shape)}"
    diff = float((cached - full).abs().max())
    # relative to the logits' scale; loose enough for TF32/bf16 kernels, far below what a misread model gives
    scale = max(1.0, float(full.abs().max()))
    tol = (2e-2 if pool.k.dtype == torch.float32 else 5e-2) * scale
    return None if diff <= tol else f"cached logits differ from the forward by {diff:.3g} (> {tol:.3g})"


@torch.inference_mode()
def forward_last(model: nn.Module, sequences: Sequence[Sequence[int]], device: torch.device) -> torch.Tensor:
    """Logits (B, V) after the last token of each sequence: one right-padded full forward, no cache."""
    width = max(len(s) for s in sequences)
    idx = torch.zeros(len(sequences), width, dtype=torch.long)
    for row, seq in enumerate(sequences):
        idx[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
    last = torch.tensor([len(s) - 1 for s in sequences], dtype=torch.long)
    logits = model(idx.to(device, non_blocking=True))
    return logits[torch.arange(len(sequences), device=logits.device), last.to(logits.device)]
