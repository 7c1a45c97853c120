"""BlockLoader: one global order for every world size and worker count; exact resume."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch

from scalelab.data.corpus import TextSource
from scalelab.data.ingest import ingest
from scalelab.data.loader import BlockLoader
from scalelab.data.store import TokenStore
from scalelab.data.tokenize import ByteTokenizer
from scalelab.errors import DataError

torch.set_num_threads(1)

T = 257  # block tokens
B = 8  # global batch
STEPS = 40  # > one epoch (the store holds ~31 global batches)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SCALELAB_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    rng = np.random.default_rng(0)
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(60):
        (corpus / f"d{i:02d}.txt").write_text(
            "".join(rng.choice(list("abcdefgh \n"), size=int(rng.integers(100, 2500))))
        )
    out = ingest(
        [TextSource(corpus)], root / "store", ByteTokenizer(), heldout_fraction=0.1, shard_tokens=4096
    )
    return TokenStore.open(out)


def collect(loaders: list[BlockLoader], steps: int) -> np.ndarray:
    """Global batches rebuilt from all ranks: shape (steps, B, T)."""
    iters = [iter(ld) for ld in loaders]
    out = []
    for _ in range(steps):
        out.append(torch.cat([next(it) for it in iters]).numpy())
    for it in iters:
        it.close()
    return np.stack(out)


def ranks(store, world, **kw):
    return [
        BlockLoader(store, block_tokens=T, global_batch_size=B, seed=3, rank=r, world_size=world, **kw)
        for r in range(world)
    ]


@pytest.fixture(scope="module")
def reference(store):
    return collect(ranks(store, 1, prefetch=0), STEPS)


def test_reference_matches_definition(store, reference):
    loader = BlockLoader(store, block_tokens=T, global_batch_size=B, seed=3)
    per_shard = [s.tokens // T for s in store.shards("train")]
    starts = np.cumsum([0, *per_shard])
    bpe = loader.batches_per_epoch
    assert bpe == sum(per_shard) // B and STEPS > bpe
    for step in (0, 5, bpe - 1, bpe, STEPS - 1):
        epoch, j = divmod(step, bpe)
        perm = np.random.Generator(np.random.PCG64([3, epoch])).permutation(sum(per_shard))
        for row, block in enumerate(perm[j * B : (j + 1) * B]):
            shard = int(np.searchsorted(starts, block, side="right") - 1)
            off = (block - starts[shard]) * T
            expect = np.asarray(store.shard_array("train", shard)[off : off + T])
            np.testing.assert_array_equal(reference[step, row], expect)
    assert reference.dtype == np.int64 and reference.max() <= 256


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("workers", [0, 2])
def test_same_global_batches_for_any_world_size_and_workers(store, reference, world, workers):
    got = collect(ranks(store, world, num_workers=workers, prefetch=2), STEPS)
    np.testing.assert_array_equal(got, reference)


@pytest.mark.parametrize(("save_world", "resume_world"), [(1, 1), (2, 1), (2, 4), (4, 2)])
def test_resume_mid_epoch_across_world_sizes(store, reference, save_world, resume_world):
    first = ranks(store, save_world, prefetch=2)
    head = collect(first, 13)
    states = [ld.state_dict() for ld in first]
    assert all(s == states[0] for s in states)
    assert (states[0]["epoch"], states[0]["batch"]) == (0, 13)
    resumed = ranks(store, resume_world)
    for ld in resumed:
        ld.load_state_dict(states[0])
    tail = collect(resumed, STEPS - 13)
    np.testing.assert_array_equal(np.concatenate([head, tail]), reference)


def test_resume_after_epoch_boundary_with_workers(store, reference):
    loader = ranks(store, 1, num_workers=2)[0]
    bpe = loader.batches_per_epoch
    head = collect([loader], bpe + 2)
    state = loader.state_dict()
    assert (state["epoch"], state["batch"]) == (1, 2)
    again = ranks(store, 2)
    for ld in again:
        ld.load_state_dict(state)
    tail = collect(again, STEPS - bpe - 2)
    np.testing.assert_array_equal(np.concatenate([head, tail]), reference)


def test_blocks_do_not_cross_shards_and_heldout_split(store):
    loader = BlockLoader(
        store, split="heldout", block_tokens=64, global_batch_size=2, shuffle=False, prefetch=0
    )
    first = next(iter(loader))
    np.testing.assert_array_equal(first[0].numpy(), np.asarray(store.shard_array("heldout", 0)[:64]))
    assert loader.state_dict()["batch"] == 1


def test_bad_arguments(store):
    with pytest.raises(DataError, match="world_size=3 must divide global_batch_size=8"):
        BlockLoader(store, block_tokens=T, global_batch_size=8, world_size=3)
    with pytest.raises(DataError, match="fewer than global_batch_size"):
        BlockLoader(store, block_tokens=4000, global_batch_size=64)
    loader = BlockLoader(store, block_tokens=T, global_batch_size=B, seed=3)
    other = BlockLoader(store, block_tokens=T, global_batch_size=B, seed=4)
    with pytest.raises(DataError, match="seed"):
        other.load_state_dict(loader.state_dict())
    with pytest.raises(DataError, match="global_batch_size"):
        BlockLoader(store, block_tokens=T, global_batch_size=16, seed=3).load_state_dict(loader.state_dict())


def test_next_iter_repeatedly_continues_in_order(store, reference):
    loader = ranks(store, 1, prefetch=3)[0]
    got = np.stack([next(iter(loader)).numpy() for _ in range(5)])
    np.testing.assert_array_equal(got, reference[:5])
    assert loader.state_dict()["batch"] == 5


def test_loader_pickles_without_shard_data(store, reference):
    import pickle

    loader = ranks(store, 1, prefetch=0)[0]
    next(iter(loader))
    blob = pickle.dumps(loader)
    assert len(blob) < 100_000  # no memmap contents travel
    clone = pickle.loads(blob)
    np.testing.assert_array_equal(next(iter(clone)).numpy(), reference[1])


def test_permutation_cache_keeps_earlier_epoch_after_going_back(store):
    """Going back to an earlier epoch (resume, rollback) draws its permutation once, not per batch."""
    loader = BlockLoader(store, block_tokens=9, global_batch_size=4, seed=3, prefetch=0)
    blocks = loader.blocks
    for epoch in (0, 1, 2, 3):
        blocks.permutation(epoch)
    first = blocks.permutation(0)
    assert blocks.permutation(0) is first  # cached, not redrawn
    assert np.array_equal(first, np.random.Generator(np.random.PCG64([3, 0])).permutation(blocks.num_blocks))
    assert blocks.permutation(3) is blocks.permutation(3)
    assert len(blocks._perms) == 2


# ----------------------------------------------------------------------- block map (one gather)
def test_row_loop_fallback_gives_the_block_map_batches(store, reference, monkeypatch):
    """Where the split cannot be mapped as one array (not Linux), the per-row reads give the same batches."""
    fresh = TokenStore.open(store.path)
    monkeypatch.setattr(fresh, "block_map", lambda split, block_tokens: None)
    loader = BlockLoader(fresh, block_tokens=T, global_batch_size=B, seed=3, prefetch=0)
    assert loader._block_map() is None
    np.testing.assert_array_equal(np.stack([loader.make_array(k) for k in range(STEPS)]), reference)
    assert store.block_map("train", T) is not None  # this test means something on this platform


@pytest.mark.parametrize(("dtype", "block"), [(np.uint16, 257), (np.uint32, 1000), (np.uint32, 1024)])
def test_block_map_rows_are_the_shards_blocks(tmp_path, dtype, block):
    """Every block of every shard (sizes off the page and block grid, an empty one) is its row."""
    from scalelab.data.blockmap import BlockMap

    rng = np.random.default_rng(1)
    sizes = [5 * block + 17, 0, 3 * block, block - 1, 9000]
    files, arrays = [], []
    for i, n in enumerate(sizes):
        a = rng.integers(0, np.iinfo(dtype).max, size=n, dtype=dtype)
        files.append(tmp_path / f"s{i}.bin")
        a.tofile(files[-1])
        arrays.append(a)
    bm = BlockMap.create(files, sizes, np.dtype(dtype), block)
    if bm is None:
        pytest.skip("BlockMap needs Linux on x86-64/aarch64")
    expect, rows = [], []
    for s, a in enumerate(arrays):
        for b in range(a.size // block):
            expect.append(a[b * block : (b + 1) * block])
            rows.append(bm.first_row[s] + b)
    order = rng.permutation(len(rows))
    ids = np.asarray(rows)[order]
    want = np.stack(expect)[order]
    np.testing.assert_array_equal(bm.gather(ids, np.empty(want.shape, dtype)), want)
    np.testing.assert_array_equal(bm.gather(ids, np.empty(want.shape, np.int64)), want)
    assert not bm.rows.flags.writeable


def test_ring_depth_is_prefetch_raised_within_the_byte_budget(store):
    from scalelab.data import loader as loader_module

    small = BlockLoader(store, block_tokens=T, global_batch_size=B, num_workers=2, prefetch=2)
    assert small._ring_depth() == loader_module.RING_DEPTH  # 8 slots of 8x257 uint16 fit easily
    assert (
        BlockLoader(store, block_tokens=T, global_batch_size=B, num_workers=2, prefetch=11)._ring_depth()
        == 11
    )
    slot_bytes = B * T * store.dtype.itemsize
    big = BlockLoader(store, block_tokens=T, global_batch_size=B, num_workers=2, prefetch=1)
    big_budget = 3 * slot_bytes
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loader_module, "RING_BYTES", big_budget)
        assert big._ring_depth() == 3


# ------------------------------------------------------------------ worker transport (shared slots)
@pytest.mark.parametrize(("workers", "prefetch"), [(1, 0), (3, 1), (2, 5)])
def test_worker_ring_order_for_odd_worker_counts_and_depths(store, reference, workers, prefetch):
    got = collect(ranks(store, 1, num_workers=workers, prefetch=prefetch), STEPS)
    np.testing.assert_array_equal(got, reference)
    assert got.dtype == np.int64


@pytest.mark.parametrize("resume_workers", [0, 2])
def test_resume_exact_from_workers_into_any_worker_count(store, reference, resume_workers):
    loader = ranks(store, 1, num_workers=2)[0]
    head = collect([loader], 17)
    resumed = ranks(store, 1, num_workers=resume_workers)[0]
    resumed.load_state_dict(loader.state_dict())
    tail = collect([resumed], STEPS - 17)
    np.testing.assert_array_equal(np.concatenate([head, tail]), reference)


def _loader_children() -> set[int]:
    import psutil

    return {p.pid for p in psutil.Process().children(recursive=True)}


def _shm_maps() -> list[str]:
    with open("/proc/self/maps") as fh:
        return [line for line in fh if "/dev/shm" in line]


def _stop_by(how: str, loader: BlockLoader) -> None:
    if how == "break":
        for k, _ in enumerate(loader):
            if k == 3:
                break
    elif how == "raise":

        def consume() -> None:
            for k, _ in enumerate(loader):
                if k == 3:
                    raise RuntimeError("consumer failed")

        with pytest.raises(RuntimeError, match="consumer failed"):
            consume()
    else:  # "drop": an iterator abandoned without close()
        it = iter(loader)
        for _ in range(3):
            next(it)
        del it


@pytest.mark.parametrize("how", ["break", "raise", "drop"])
def test_early_stop_leaves_no_workers_or_shm_segments(store, reference, how):
    import gc

    before, shm_before = _loader_children(), set(os.listdir("/dev/shm"))
    loader = ranks(store, 1, num_workers=2)[0]
    _stop_by(how, loader)
    gc.collect()
    deadline = time.monotonic() + 5
    while _loader_children() - before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _loader_children() <= before  # workers exited and were reaped (no zombies)
    assert _shm_maps() == []
    assert not {n for n in set(os.listdir("/dev/shm")) - shm_before if str(os.getpid()) in n}
    # The consumed batches count, the abandoned prefetched ones do not: resuming continues exactly.
    position = loader.position
    assert position == (3 if how == "drop" else 4)  # a batch counts once it was handed out
    np.testing.assert_array_equal(next(iter(loader)).numpy(), reference[position])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("workers", [0, 2])
def test_batches_are_pinned_on_cuda_and_copy_asynchronously(store, reference, workers):
    """With CUDA present the loader pins by default, so `.to("cuda", non_blocking=True)` is a real
    asynchronous copy; the batches are the same as anywhere else."""
    loader = ranks(store, 1, num_workers=workers)[0]
    assert loader.pin_memory
    it = iter(loader)
    stream = torch.cuda.Stream()
    for step in range(STEPS):
        batch = next(it)
        assert batch.is_pinned()
        with torch.cuda.stream(stream):
            on_gpu = batch.to("cuda", non_blocking=True)
        stream.synchronize()
        assert torch.equal(on_gpu.cpu(), torch.from_numpy(reference[step]))
    it.close()
