"""Deterministic, resumable block loader over a token store, independent of world size and workers.

The order is defined globally, once:

- A split is cut into blocks of `block_tokens` contiguous tokens. Blocks never cross a shard
  boundary (each shard's last incomplete block is dropped) but do cross document boundaries; EOD
  tokens separate documents inside a block.
- Each epoch draws a permutation of all blocks from ``numpy.random.Generator(PCG64)`` seeded with
  ``(seed, epoch)`` and cuts it into global batches of `global_batch_size` (the last partial batch
  of an epoch is dropped). Epochs follow each other forever.
- Rank ``r`` of ``W`` takes rows ``[r*B/W, (r+1)*B/W)`` of every global batch.

So the sequence of global batches is the same for every world size and every number of loader
workers, and a position is just ``(epoch, batch)``: `state_dict()` saved at any world size resumes
exactly at any other. A batch is gathered with one ``np.take`` from the split's shards mapped side by
side as one 2-D array of blocks (`scalelab.data.blockmap`; every shard of the split is checksum-verified
once per process before it is mapped; no shard is ever read whole), or, where the platform cannot map
them so, a block per row from memmaps. A background thread (``num_workers=0``) or `num_workers` forked
processes keep at least `prefetch` batches ready (per worker; workers get up to `RING_DEPTH` slots
while they fit in `RING_BYTES`, so each wakes once per several batches). Workers write blocks in the
store's narrow dtype into a ring of shared-memory slots and pass only slot notices
(`scalelab.data.prefetch.WorkerRing`); this process widens each slot into a fresh int64 tensor
(pinned when asked), its only copy per batch. No batch is ever pickled.

What that costs, measured on the 2-core development machine under load 6-10 (64 MB store in the page
cache, batches of 32x1024 tokens, CPU microseconds per batch): one gather into a worker's uint16 slot
13-18 (a Python loop over rows: 30-38); `make_batch` 34-36 (68); the thread path 55-65 of this
process's CPU (94-115) with `queue.Queue` hand-offs, the extra over `make_batch` being the hand-off,
which now goes through two C-level ``SimpleQueue``s (`PrefetchThread`); with two workers this
process spends 16-27 (the widening copy and the pipe notices) and the workers 24-37 (25 and 55 with
the row loop and 2-slot rings). `benchmarks/bench_data_loader.py` compares both with a plain numpy
reader of the same blocks: per CPU-second, 0 workers went from 0.81-0.96x that reader to 1.02-1.12x
with the ``SimpleQueue`` hand-off (load 3-5), 2 workers 1.04-1.05x. Workers pay off whenever the training loop keeps this process's core busy,
or reads stall (cold page cache, network file systems); more workers than cores gain nothing.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from scalelab.data.blockmap import BlockMap
from scalelab.data.prefetch import PrefetchThread, WorkerRing, fork_available
from scalelab.data.store import TokenStore
from scalelab.errors import DataError

log = logging.getLogger(__name__)

STATE_VERSION = 1
RING_DEPTH = 8  # worker slots per worker when they fit in RING_BYTES (never fewer than `prefetch`)
RING_BYTES = 4 << 20


class BlockIndex:
    """Maps global block ids to (shard, token offset) and draws the per-epoch permutation."""

    def __init__(self, shard_tokens: list[int], block_tokens: int, seed: int, shuffle: bool = True) -> None:
        self.block_tokens = block_tokens
        self.seed = seed
        self.shuffle = shuffle
        per_shard = np.asarray([t // block_tokens for t in shard_tokens], dtype=np.int64)
        self.ends = np.cumsum(per_shard)
        self.starts = self.ends - per_shard
        self.num_blocks = int(self.ends[-1]) if len(self.ends) else 0
        self._perms: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        del state["_lock"]
        state["_perms"] = {}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def after_fork(self) -> None:
        """Renew the cache lock in a forked worker (a parent thread may have held it at fork time)."""
        self._lock = threading.Lock()

    def permutation(self, epoch: int) -> np.ndarray:
        """Block order of `epoch` (cached for the two most recently used epochs)."""
        with self._lock:
            perm = self._perms.pop(epoch, None)
            if perm is None:
                if self.shuffle:
                    rng = np.random.Generator(np.random.PCG64([self.seed, epoch]))
                    perm = rng.permutation(self.num_blocks)
                else:
                    perm = np.arange(self.num_blocks, dtype=np.int64)
            # Evict by use, not by epoch number: after a resume to an earlier epoch, an eviction by
            # number dropped the permutation just drawn and redrew it for every batch.
            self._perms[epoch] = perm  # (re)inserted last = most recently used
            while len(self._perms) > 2:
                del self._perms[next(iter(self._perms))]
            return perm

    def locate(self, block_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard index, token offset) of each block id."""
        shard = np.searchsorted(self.ends, block_ids, side="right")
        offset = (block_ids - self.starts[shard]) * self.block_tokens
        return shard, offset


class BlockLoader:
    """Infinite iterator of ``torch.LongTensor`` batches of shape ``(B // world_size, block_tokens)``.

    ``x = b[:, :-1], y = b[:, 1:]`` for next-token prediction (so pass ``block_tokens=context+1``).
    """

    def __init__(
        self,
        store: TokenStore,
        split: str = "train",
        block_tokens: int = 129,
        global_batch_size: int = 16,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        prefetch: int = 2,
        pin_memory: bool | None = None,
        shuffle: bool = True,
    ) -> None:
        if block_tokens < 2:
            raise DataError(f"block_tokens must be at least 2, got {block_tokens}")
        if global_batch_size < 1:
            raise DataError(f"global_batch_size must be positive, got {global_batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if global_batch_size % world_size:
            raise DataError(
                f"world_size={world_size} must divide global_batch_size={global_batch_size} "
                "(every rank takes an equal share of each global batch)"
            )
        if num_workers < 0 or prefetch < 0:
            raise DataError("num_workers and prefetch must be non-negative")
        self.store = store
        self.split = split
        self.block_tokens = block_tokens
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.num_workers = num_workers
        self.prefetch = prefetch
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.shuffle = shuffle
        self.local_batch_size = global_batch_size // world_size
        self.blocks = BlockIndex([s.tokens for s in store.shards(split)], block_tokens, seed, shuffle)
        self.batches_per_epoch = self.blocks.num_blocks // global_batch_size
        if self.batches_per_epoch == 0:
            raise DataError(
                f"{store.path}: split '{split}' has {self.blocks.num_blocks} blocks of {block_tokens} tokens "
                f"({store.num_tokens(split)} tokens), fewer than global_batch_size={global_batch_size}; "
                "use more data, smaller blocks or a smaller batch"
            )
        self.epoch = 0
        self.batch = 0  # next global batch within the epoch
        self._views: list[np.ndarray | None] = [None] * len(store.shards(split))
        self._mapped: BlockMap | None | bool = False  # False: not looked up yet in this process
        self._rows_of: tuple[int, np.ndarray] | None = None  # (epoch, its permutation as map rows)

    def __getstate__(self) -> dict[str, Any]:
        # Shard views and the block map are reopened (and verified) lazily in the receiving process.
        state = dict(self.__dict__)
        state["_views"] = [None] * len(self._views)
        state["_mapped"], state["_rows_of"] = False, None
        return state

    # -- position and state
    @property
    def position(self) -> int:
        """Global batches consumed since the start of epoch 0."""
        return self.epoch * self.batches_per_epoch + self.batch

    def _advance(self) -> None:
        self.batch += 1
        if self.batch == self.batches_per_epoch:
            self.epoch, self.batch = self.epoch + 1, 0

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume at the next unconsumed global batch, at any world size."""
        return {
            "version": STATE_VERSION,
            "epoch": self.epoch,
            "batch": self.batch,
            "seed": self.seed,
            "global_batch_size": self.global_batch_size,
            "block_tokens": self.block_tokens,
            "split": self.split,
            "shuffle": self.shuffle,
            "num_blocks": self.blocks.num_blocks,
            "store_fingerprint": self.store.fingerprint,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from `state_dict()`; `DataError` naming the field when it belongs to another order."""
        for field in ("seed", "global_batch_size", "block_tokens", "split", "shuffle", "num_blocks"):
            mine = self.state_dict()[field]
            if field in state and state[field] != mine:
                raise DataError(
                    f"loader state: {field}={state[field]!r} does not match this loader's {mine!r}; "
                    "a loader resumes only the same order (same store, seed, batch and block size)"
                )
        if state.get("store_fingerprint", self.store.fingerprint) != self.store.fingerprint:
            raise DataError("loader state: saved for a different token store (fingerprint differs)")
        epoch, batch = int(state["epoch"]), int(state["batch"])
        if epoch < 0 or not 0 <= batch < self.batches_per_epoch:
            raise DataError(f"loader state: position epoch={epoch}, batch={batch} is out of range")
        self.epoch, self.batch = epoch, batch

    # -- batch assembly
    def rows(self, position: int) -> np.ndarray:
        """Block ids of this rank's rows of global batch number `position` (counted over epochs)."""
        epoch, start = self._locate_batch(position)
        return self.blocks.permutation(epoch)[start : start + self.local_batch_size]

    def _locate_batch(self, position: int) -> tuple[int, int]:
        """(epoch, index of this rank's first row in that epoch's permutation) of batch `position`."""
        epoch, batch = divmod(position, self.batches_per_epoch)
        return epoch, batch * self.global_batch_size + self.rank * self.local_batch_size

    def fill(self, position: int, out: np.ndarray) -> np.ndarray:
        """Write this rank's part of global batch `position` into `out` and return it.

        `out` has shape ``(local_batch_size, block_tokens)`` and any integer dtype wide enough for
        the store's ids (the store's own narrow dtype in worker slots, int64 for finished batches).
        """
        mapped = self._block_map()
        if mapped is not None:  # one gather over the whole split (Linux)
            epoch, start = self._locate_batch(position)
            return mapped.gather(self._epoch_rows(epoch, mapped)[start : start + self.local_batch_size], out)
        ids = self.rows(position)
        shard, offset = self.blocks.locate(ids)
        T = self.block_tokens
        views = self._views
        # One slice copy per row (B rows, not B*T Python steps) from plain ndarray views of the
        # memmaps (slicing a np.memmap subclass costs ~10x more in Python overhead).
        for i, (s, o) in enumerate(zip(shard.tolist(), offset.tolist(), strict=True)):
            v = views[s]
            if v is None:
                v = views[s] = self.store.shard_array(self.split, s).view(np.ndarray)
            out[i] = v[o : o + T]
        return out

    def _block_map(self) -> BlockMap | None:
        """The split's `BlockMap` (None where the platform cannot map one)."""
        if self._mapped is False:
            self._mapped = self.store.block_map(self.split, self.block_tokens)
        return self._mapped

    def _epoch_rows(self, epoch: int, block_map: BlockMap) -> np.ndarray:
        """`BlockMap` rows of `epoch`'s permutation, computed once per epoch (the last one is kept)."""
        cached = self._rows_of
        if cached is None or cached[0] != epoch:
            perm = self.blocks.permutation(epoch)
            shard = np.searchsorted(self.blocks.ends, perm, side="right")
            cached = self._rows_of = (epoch, perm + (block_map.first_row - self.blocks.starts)[shard])
        return cached[1]

    def make_array(self, position: int, dtype: np.dtype | type = np.int64) -> np.ndarray:
        """This rank's part of global batch `position` as a numpy array (no prefetch, no state change)."""
        return self.fill(position, np.empty((self.local_batch_size, self.block_tokens), dtype=dtype))

    def make_batch(self, position: int) -> torch.Tensor:
        """This rank's part of global batch `position` as an int64 tensor (no prefetch, no state change)."""
        return torch.from_numpy(self.make_array(position))

    # -- iteration
    def __iter__(self) -> Iterator[torch.Tensor]:
        """Batches from the current position on; consuming one advances `state_dict()`.

        Breaking out of the loop, an exception in its body, or dropping the iterator stops the
        background thread or worker processes (the ring's finalizer also runs at exit).
        """
        source = self._source(self.position)
        try:
            for batch in source:
                self._advance()
                yield batch
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                close()

    def _source(self, start: int) -> Iterator[torch.Tensor]:
        if self.num_workers > 0 and fork_available():
            self._block_map()  # mapped and verified once here; the forked workers inherit it
            return WorkerRing(
                fill=self.fill,
                take=self._take,
                shape=(self.local_batch_size, self.block_tokens),
                dtype=self.store.dtype,
                start=start,
                num_workers=self.num_workers,
                depth=self._ring_depth(),
                init=self.blocks.after_fork,
            )
        if self.num_workers > 0:
            log.warning("loader workers need the 'fork' start method; prefetching in a thread instead")
        if self.prefetch > 0:
            return PrefetchThread(self._make_owned, start, self.prefetch)
        return (self._make_owned(k) for k in itertools.count(start))

    def _ring_depth(self) -> int:
        """Slots per worker: `prefetch`, raised up to `RING_DEPTH` while they fit in `RING_BYTES`, so
        a worker refills several slots per wake-up (credits go back half its slots at a time)."""
        slot_bytes = self.local_batch_size * self.block_tokens * self.store.dtype.itemsize
        return max(1, self.prefetch, min(RING_DEPTH, RING_BYTES // slot_bytes))

    def _empty_batch(self) -> torch.Tensor:
        shape = (self.local_batch_size, self.block_tokens)
        return torch.empty(shape, dtype=torch.int64, pin_memory=self.pin_memory)

    def _make_owned(self, position: int) -> torch.Tensor:
        """Batch `position` gathered straight into a fresh (pinned, when asked) int64 tensor."""
        t = self._empty_batch()
        self.fill(position, t.numpy())
        return t

    def _take(self, slot: np.ndarray) -> torch.Tensor:
        """A worker's filled slot (store dtype) widened into a fresh (pinned, when asked) int64 tensor:
        the one copy this process makes per batch."""
        t = self._empty_batch()
        t.numpy()[...] = slot
        return t
