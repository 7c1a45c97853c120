"""Memory-bounded LRU caches: whole responses of deterministic requests, and KV tensors of prompt prefixes.

Both are bounded in bytes (not entries), because a prefix's KV tensors grow with its length and the
model's width: a count bound would not bound memory. Hits, misses, evictions and the bytes held are
kept as attributes that /metrics exposes.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch

V = TypeVar("V")


class LRUCache(Generic[V]):
    """Least-recently-used mapping whose values' summed size (bytes, given on `put`) stays ≤ `max_bytes`."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = int(max_bytes)
        self._data: OrderedDict[str, tuple[V, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: str) -> V | None:
        with self._lock:
            item = self._data.get(key)
            if item is None:
                self.misses += 1
                return None
            self._data.move_to_end(key)
            self.hits += 1
            return item[0]

    def peek(self, key: str) -> V | None:
        """The value without counting a hit or miss or refreshing its recency."""
        with self._lock:
            item = self._data.get(key)
            return None if item is None else item[0]

    def put(self, key: str, value: V, nbytes: int) -> bool:
        """Insert (or refresh) `key`; False when the value alone exceeds the bound (not stored)."""
        if nbytes > self.max_bytes:
            return False
        with self._lock:
            old = self._data.pop(key, None)
            if old is not None:
                self.bytes -= old[1]
            self._data[key] = (value, nbytes)
            self.bytes += nbytes
            while self.bytes > self.max_bytes:
                _, (_, size) = self._data.popitem(last=False)
                self.bytes -= size
                self.evictions += 1
        return True


@dataclass(frozen=True)
class PrefixEntry:
    """Keys and values of every layer for the first `length` tokens of a prompt: (L, H, length, d_head) each."""

    length: int
    k: torch.Tensor
    v: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()


def token_key(ids: Sequence[int]) -> str:
    """A collision-resistant key of a token sequence."""
    h = hashlib.blake2b(digest_size=16)
    h.update(len(ids).to_bytes(4, "little"))
    h.update(b"".join(int(i).to_bytes(4, "little") for i in ids))
    return h.hexdigest()


class PrefixCache:
    """KV tensors of prompt prefixes at multiples of `block_tokens`, LRU within `max_bytes`.

    After a prefill, the longest block-aligned proper prefix of the prompt is stored; a later prompt
    that starts with the same tokens reuses it and prefills only the rest. Proper prefix (shorter than
    the prompt) because the last prompt token must still run to produce the first logits.
    """

    def __init__(self, max_bytes: int, block_tokens: int = 16) -> None:
        self.block_tokens = int(block_tokens)
        self.lru: LRUCache[PrefixEntry] = LRUCache(max_bytes)

    def _boundary(self, n: int) -> int:
        return ((n - 1) // self.block_tokens) * self.block_tokens

    def lookup(self, ids: Sequence[int]) -> PrefixEntry | None:
        """The longest cached block-aligned proper prefix of `ids` (counts one hit or one miss; prompts
        shorter than a block + 1 cannot hit and count as neither)."""
        if self._boundary(len(ids)) <= 0:
            return None
        for length in range(self._boundary(len(ids)), 0, -self.block_tokens):
            entry = self.lru.peek(token_key(ids[:length]))
            if entry is not None:
                return self.lru.get(token_key(ids[:length]))
        self.lru.misses += 1
        return None

    def wants(self, ids: Sequence[int]) -> int:
        """Length of the prefix worth storing for `ids` (0: none, or already cached)."""
        length = self._boundary(len(ids))
        if length <= 0 or self.lru.peek(token_key(ids[:length])) is not None:
            return 0
        return length

    def store(self, ids: Sequence[int], k: torch.Tensor, v: torch.Tensor) -> None:
        """Keep `k`, `v` ((L, H, len(ids), d_head), already copies) as the prefix `ids`."""
        entry = PrefixEntry(len(ids), k, v)
        self.lru.put(token_key(ids), entry, entry.nbytes)
