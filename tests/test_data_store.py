"""Token store: deterministic parallel ingest, checksums, crash-safe resume, content-keyed cache."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from scalelab.data.corpus import JsonlSource, ParquetSource, TextSource
from scalelab.data.ingest import ingest, is_heldout
from scalelab.data.loader import BlockLoader
from scalelab.data.store import TokenStore, ensure_store
from scalelab.data.tokenize import BPETokenizer, ByteTokenizer
from scalelab.errors import DataError, ShardChecksumError
from scalelab.spec import DataSpec, SourceSpec

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu def return import".split()


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SCALELAB_CACHE_DIR", str(tmp_path / "cache"))


def make_corpus(root: Path, n_docs: int = 60, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        n = int(rng.integers(50, 600))
        words = rng.choice(WORDS, size=n)
        (root / f"doc{i:03d}.txt").write_text(" ".join(words) + f"\n# {i} ✓\n")
    return root


def store_bytes(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()}


def test_ingest_is_deterministic_across_workers(tmp_path):
    corpus = make_corpus(tmp_path / "c")
    kw = dict(heldout_fraction=0.2, shard_tokens=4096, chunk_bytes=3000)
    a = ingest([TextSource(corpus)], tmp_path / "a", ByteTokenizer(), workers=1, **kw)
    b = ingest([TextSource(corpus)], tmp_path / "b", ByteTokenizer(), workers=2, **kw)
    assert store_bytes(a) == store_bytes(b)
    store = TokenStore.open(a)
    assert store.verify() == []
    assert store.dtype == np.uint16 and store.vocab_size == 257 and store.eod_id == 256
    train = store.shards("train")
    assert all(s.tokens == 4096 for s in train[:-1]) and len(train) > 3
    assert train[0].file == "train-00000.bin"
    total_chars = sum(len(p.read_bytes()) for p in corpus.iterdir())
    assert store.num_tokens("train") + store.num_tokens("heldout") == total_chars + 60  # + one EOD each
    n_held = sum(is_heldout(f"0:doc{i:03d}.txt", 0.2) for i in range(60))
    assert store.num_documents("heldout") == n_held and 0 < n_held < 60
    mm = np.memmap(a / train[0].file, dtype=np.uint16, mode="r")
    assert mm.shape == (4096,)
    index = json.loads((a / "index.json").read_text())
    assert index["format_version"] == 1 and index["tokenizer"]["name"] == "byte"
    assert set(index["splits"]) == {"train", "heldout"}


def test_ingest_identical_for_any_workers_and_chunking_with_every_source_kind(tmp_path):
    """Workers read their own spans (files, JSONL byte ranges, Parquet row groups): same bytes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    corpus = make_corpus(tmp_path / "c", n_docs=25)
    jl = tmp_path / "d.jsonl"
    jl.write_text("".join(json.dumps({"text": f"json doc {i} " * (i + 3)}) + "\n" for i in range(80)))
    pqf = tmp_path / "t.parquet"
    pq.write_table(
        pa.table({"text": [f"row {i} ✓ " * (i % 7 + 1) for i in range(200)]}), pqf, row_group_size=30
    )
    sources = [TextSource(corpus), JsonlSource(jl, "text"), ParquetSource(pqf, "text")]
    kw = dict(heldout_fraction=0.2, shard_tokens=4096)
    a = ingest(sources, tmp_path / "a", ByteTokenizer(), workers=1, chunk_bytes=1 << 20, **kw)
    b = ingest(sources, tmp_path / "b", ByteTokenizer(), workers=2, chunk_bytes=700, **kw)
    assert store_bytes(a) == store_bytes(b)
    assert TokenStore.open(a).num_documents("train") + TokenStore.open(a).num_documents("heldout") == 305


def test_bpe_store(tmp_path):
    corpus = make_corpus(tmp_path / "c", n_docs=20)
    tok = BPETokenizer.train((p.read_text() for p in sorted(corpus.iterdir())), vocab_size=300)
    out = ingest(
        [TextSource(corpus)], tmp_path / "s", tok, heldout_fraction=0.2, shard_tokens=2048, workers=2
    )
    store = TokenStore.open(out)
    assert store.tokenizer_name == "bpe" and store.tokenizer.hash == tok.hash
    ids = np.concatenate(
        [np.asarray(store.shard_array("train", i)) for i in range(len(store.shards("train")))]
    )
    text = store.tokenizer.decode(ids)
    assert "alpha" in text and (ids == tok.eod_id).sum() == store.num_documents("train")


def test_flipped_byte_caught_by_verify_and_loader(tmp_path):
    corpus = make_corpus(tmp_path / "c")
    out = ingest(
        [TextSource(corpus)], tmp_path / "s", ByteTokenizer(), heldout_fraction=0.1, shard_tokens=4096
    )
    shard = out / "train-00001.bin"
    data = bytearray(shard.read_bytes())
    data[100] ^= 0x01
    shard.write_bytes(bytes(data))
    store = TokenStore.open(out)
    problems = store.verify()
    assert len(problems) == 1 and "train-00001.bin" in problems[0]
    for workers in (0, 2):
        loader = BlockLoader(TokenStore.open(out), block_tokens=256, global_batch_size=4, num_workers=workers)
        with pytest.raises(ShardChecksumError) as info:
            for _, _ in zip(range(loader.batches_per_epoch), loader, strict=False):
                pass
        msg = str(info.value)
        assert "train-00001.bin" in msg
        index = json.loads((out / "index.json").read_text())
        expected = index["splits"]["train"]["shards"][1]["sha256"]
        assert expected in msg and hashlib.sha256(bytes(data)).hexdigest() in msg


def test_truncated_and_missing_shard(tmp_path):
    out = ingest(
        [TextSource(make_corpus(tmp_path / "c"))], tmp_path / "s", ByteTokenizer(), shard_tokens=4096
    )
    (out / "train-00000.bin").write_bytes(b"\0" * 10)
    (out / "train-00002.bin").unlink()
    problems = TokenStore.open(out).verify()
    assert any("train-00000.bin" in p and "bytes" in p for p in problems)
    assert any("train-00002.bin" in p and "missing" in p for p in problems)
    with pytest.raises(ShardChecksumError, match="train-00000.bin"):
        TokenStore.open(out).shard_array("train", 0)


def test_open_errors(tmp_path):
    with pytest.raises(DataError, match="no index.json"):
        TokenStore.open(tmp_path)
    (tmp_path / "index.json").write_text('{"format": "other"}')
    with pytest.raises(DataError, match="not a scalelab token store"):
        TokenStore.open(tmp_path)


def test_ingest_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{oops\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2"):
        ingest([JsonlSource(bad, "text")], tmp_path / "s", ByteTokenizer())
    with pytest.raises(DataError, match="missing_dir"):
        ingest([TextSource(tmp_path / "missing_dir")], tmp_path / "s2", ByteTokenizer())
    out = ingest([JsonlSource(bad, "text", skip_bad=True)], tmp_path / "s3", ByteTokenizer())
    with pytest.raises(DataError, match="already contains"):
        ingest([JsonlSource(bad, "text", skip_bad=True)], out, ByteTokenizer())


def test_tail_files_survive_a_crash_between_tail_and_state(tmp_path):
    """Tails are appended (and a new generation started after a shard); a crash after the tails but
    before the state leaves what the saved state names intact."""
    from scalelab.data.ingest import _load_state, _save_state, _SplitWriter

    def writers():
        return {s: _SplitWriter(tmp_path, s, 100, np.dtype(np.uint16)) for s in ("train", "heldout")}

    w = writers()
    w["train"].add(np.arange(130, dtype=np.uint16))  # one shard + 30 tail tokens
    w["heldout"].add(np.arange(7, dtype=np.uint16))
    _save_state(tmp_path / "state.json", "job", 1, w)
    saved = {s: x.tail().copy() for s, x in w.items()}
    w["heldout"].add(np.arange(5, dtype=np.uint16))  # appended to the same heldout tail file...
    w["train"].add(np.arange(90, dtype=np.uint16))  # ...while train fills a shard: a new generation
    for x in w.values():
        x.save_tail()  # crash here: the state still names generation 1 of both
    assert len(w["train"].tail_files()) == 2 and len(w["heldout"].tail_files()) == 1
    again = writers()
    assert _load_state(tmp_path / "state.json", "job", again) == 1
    for s in saved:
        np.testing.assert_array_equal(again[s].tail(), saved[s])
    assert len(again["train"].shards) == 1


def test_ensure_store_caches_by_content(tmp_path):
    corpus = make_corpus(tmp_path / "c", n_docs=30)
    spec = DataSpec(
        sources=[SourceSpec(kind="text", path=str(corpus))], shard_tokens=4096, heldout_fraction=0.1
    )
    a = ensure_store(spec)
    assert str(a.path).startswith(str(tmp_path / "cache"))
    b = ensure_store(spec)
    assert a.path == b.path and a.fingerprint == b.fingerprint
    assert len(a.fingerprint) == 64 and len(a.tokenizer_hash) == 64
    assert a.num_tokens("train") > 0 and a.num_tokens("heldout") > 0
    (corpus / "doc000.txt").write_text("changed")
    c = ensure_store(spec)
    assert c.path != a.path and c.fingerprint != a.fingerprint
    explicit = ensure_store(DataSpec(store=str(a.path)))
    assert explicit.path == a.path


def test_ensure_store_bpe(tmp_path):
    corpus = make_corpus(tmp_path / "c", n_docs=20)
    spec = DataSpec(sources=[SourceSpec(kind="text", path=str(corpus))], tokenizer="bpe", bpe_vocab_size=300)
    store = ensure_store(spec, cache_dir=tmp_path / "other")
    assert store.tokenizer_name == "bpe" and store.vocab_size <= 300
    assert ensure_store(spec, cache_dir=tmp_path / "other").path == store.path


CONCURRENT = """
import sys
from scalelab.data.store import ensure_store
from scalelab.spec import DataSpec, SourceSpec
spec = DataSpec(sources=[SourceSpec(kind="text", path=sys.argv[1])], shard_tokens=4096)
s = ensure_store(spec)
print(s.path, s.content_hash)
"""


def test_concurrent_ensure_store_builds_once(tmp_path):
    corpus = make_corpus(tmp_path / "c", n_docs=40)
    env = {**os.environ, "SCALELAB_CACHE_DIR": str(tmp_path / "shared")}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CONCURRENT, str(corpus)], env=env, stdout=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert outs[0] == outs[1] and outs[0].strip()
    store = TokenStore.open(outs[0].split()[0])
    assert store.verify() == []
