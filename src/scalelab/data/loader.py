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
exactly at any other. Batches are gathered from memmaps, a block per row (no shard is ever read
whole); a background thread (``num_workers=0``) or a torch DataLoader with worker processes keeps
`prefetch` batches ready.
"""

from __future__ import annotations

import contextlib
import itertools
import queue
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from scalelab.data.store import TokenStore
from scalelab.errors import DataError

STATE_VERSION = 1


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

    def __getstate__(self) -> dict[str, Any]:
        # Shard views are reopened (and verified) lazily in the receiving process.
        state = dict(self.__dict__)
        state["_views"] = [None] * len(self._views)
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
        epoch, batch = divmod(position, self.batches_per_epoch)
        perm = self.blocks.permutation(epoch)
        start = batch * self.global_batch_size + self.rank * self.local_batch_size
        return perm[start : start + self.local_batch_size]

    def make_array(self, position: int, dtype: np.dtype | type = np.int64) -> np.ndarray:
        """This rank's part of global batch `position` as a numpy array (no prefetch, no state change)."""
        ids = self.rows(position)
        shard, offset = self.blocks.locate(ids)
        out = np.empty((ids.size, self.block_tokens), dtype=dtype)
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

    def make_batch(self, position: int) -> torch.Tensor:
        """This rank's part of global batch `position` as an int64 tensor (no prefetch, no state change)."""
        return torch.from_numpy(self.make_array(position))

    # -- iteration
    def __iter__(self) -> Iterator[torch.Tensor]:
        """Batches from the current position on; consuming one advances `state_dict()`."""
        source = self._source(self.position)
        try:
            for batch in source:
                self._advance()
                yield batch
        finally:
            for name in ("close", "_shutdown_workers"):  # our thread / torch's worker iterator
                close = getattr(source, name, None)
                if close is not None:
                    close()
                    break

    def _source(self, start: int) -> Iterator[torch.Tensor]:
        if self.num_workers > 0:
            return self._dataloader(start)
        if self.prefetch > 0:
            return _PrefetchThread(self._make_pinned, start, self.prefetch)
        return (self._make_pinned(k) for k in itertools.count(start))

    def _make_pinned(self, position: int) -> torch.Tensor:
        t = self.make_batch(position)
        return t.pin_memory() if self.pin_memory else t

    def _dataloader(self, start: int) -> Iterator[torch.Tensor]:
        """Worker processes gather batches in the store's narrow dtype (numpy, pickled through a pipe:
        cheaper than a shared-memory tensor per batch); widening and pinning happen here."""
        from torch.utils.data import DataLoader

        loader = DataLoader(
            _PositionDataset(self),
            batch_size=None,
            sampler=_CountFrom(start),
            num_workers=self.num_workers,
            prefetch_factor=max(1, self.prefetch),
            collate_fn=_keep,
            worker_init_fn=_worker_init,
        )
        return _Widen(iter(loader), self.pin_memory)


def _keep(x: np.ndarray) -> np.ndarray:
    return x


class _Widen:
    """Numpy batches from DataLoader workers → int64 tensors (pinned when asked)."""

    def __init__(self, it: Any, pin: bool) -> None:
        self.it, self.pin = it, pin

    def __iter__(self) -> _Widen:
        return self

    def __next__(self) -> torch.Tensor:
        t = torch.from_numpy(next(self.it).astype(np.int64))
        return t.pin_memory() if self.pin else t

    def close(self) -> None:
        shutdown = getattr(self.it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


def _worker_init(_worker_id: int) -> None:
    torch.set_num_threads(1)


class _PositionDataset(torch.utils.data.Dataset):
    """Map-style view: item k = this rank's part of global batch k. Workers share nothing but the order."""

    def __init__(self, loader: BlockLoader) -> None:
        self.loader = loader

    def __getitem__(self, position: int) -> np.ndarray:
        return self.loader.make_array(position, self.loader.store.dtype)


class _CountFrom(torch.utils.data.Sampler):
    def __init__(self, start: int) -> None:
        self.start = start

    def __iter__(self) -> Iterator[int]:
        return itertools.count(self.start)


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error


class _PrefetchThread:
    """Produces batches start, start+1, … in a daemon thread, keeping up to `depth` ready."""

    def __init__(self, make: Any, start: int, depth: int) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(make, start), daemon=True, name="scalelab-prefetch"
        )
        self._thread.start()

    def _run(self, make: Any, start: int) -> None:
        k = start
        while not self._stop.is_set():
            try:
                item: Any = make(k)
            except BaseException as err:  # handed to the consumer, re-raised there
                item = _Failure(err)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item, _Failure):
                return
            k += 1

    def __iter__(self) -> _PrefetchThread:
        return self

    def __next__(self) -> torch.Tensor:
        item = self._queue.get()
        if isinstance(item, _Failure):
            self.close()
            raise item.error
        return item

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(queue.Empty):
            while True:
                self._queue.get_nowait()
        self._thread.join(timeout=5)

    def __del__(self) -> None:
        self._stop.set()
