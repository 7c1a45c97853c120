"""Parallel ingest (``workers > 1``): the fingerprint pass in another process, shard writes on a
writer thread, results read straight from the workers' pipes — same store bytes, same errors, and
the same crash safety as the serial path."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from proc_helpers import worker_processes
from scalelab.data import ingest as ingest_mod
from scalelab.data.corpus import BuiltinCorpus, JsonlSource, TextSource, stdlib_dir
from scalelab.data.ingest import STATE_NAME, ingest
from scalelab.data.procs import ordered_map
from scalelab.data.store import TokenStore
from scalelab.data.tokenize import ByteTokenizer
from scalelab.errors import DataError

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu def return import".split()
KW = dict(heldout_fraction=0.2, shard_tokens=2048, chunk_bytes=1500)


def make_corpus(root: Path, n_docs: int = 80, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        words = rng.choice(WORDS, size=int(rng.integers(50, 600)))
        (root / f"doc{i:03d}.txt").write_text(" ".join(words) + f"\n# {i} ✓\n")
    return root


def store_bytes(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()}


class SlowBytes(ByteTokenizer):
    """Same definition and hash as ByteTokenizer; slow here, so the fingerprint is ready early."""

    def encode_documents(self, texts, dtype=None):
        time.sleep(0.01)
        return super().encode_documents(texts, dtype)


def check_state_names_durable_files(out: Path) -> None:
    """What a crash right now would resume from: every shard and tail the state names is there."""
    state = json.loads((out / STATE_NAME).read_text())
    for split, s in state["splits"].items():
        for shard in s["shards"]:
            data = (out / shard["file"]).read_bytes()
            assert len(data) == 2 * shard["tokens"] and hashlib.sha256(data).hexdigest() == shard["sha256"]
        tail = out / f".{split}.tail-{s['tail_generation']}.bin"
        assert tail.stat().st_size >= 2 * s["tail_tokens"]


def test_two_workers_identical_to_one_with_many_shards_and_state_saves(tmp_path, monkeypatch):
    corpus = make_corpus(tmp_path / "c")
    one = ingest([TextSource(corpus)], tmp_path / "one", ByteTokenizer(), workers=1, **KW)

    saves: list[int] = []
    write_state = ingest_mod._write_state

    def checked_write_state(path, job, next_chunk, splits):  # runs on the writer thread
        write_state(path, job, next_chunk, splits)
        check_state_names_durable_files(path.parent)
        saves.append(next_chunk)

    real_ready = ingest_mod._BackgroundFingerprints.ready

    def ready_at_once(self):  # the key is known from the first chunk on: a state at every shard
        self._call.result()
        return real_ready(self)

    monkeypatch.setattr(ingest_mod, "_write_state", checked_write_state)
    monkeypatch.setattr(ingest_mod._BackgroundFingerprints, "ready", ready_at_once)
    two = ingest([TextSource(corpus)], tmp_path / "two", ByteTokenizer(), workers=2, **KW)
    assert store_bytes(one) == store_bytes(two)
    index = json.loads((two / "index.json").read_text())
    assert len(index["splits"]["train"]["shards"]) > 20 and len(index["splits"]["heldout"]["shards"]) > 3
    assert len(saves) > 20 and saves == sorted(saves) and saves[0] < 5
    assert not (two / STATE_NAME).exists() and not list(two.glob(".*.tail-*.bin"))


def test_no_state_until_the_fingerprint_is_ready(tmp_path, monkeypatch):
    """The key waits for the background fingerprint; before it, no state is saved (a crash starts
    over), and the store is the same."""
    corpus = make_corpus(tmp_path / "c", n_docs=40)
    one = ingest([TextSource(corpus)], tmp_path / "one", ByteTokenizer(), workers=1, **KW)
    saved = []
    monkeypatch.setattr(ingest_mod._BackgroundFingerprints, "ready", lambda self: False)
    monkeypatch.setattr(ingest_mod, "_save_state", lambda *a: saved.append(a))
    two = ingest([TextSource(corpus)], tmp_path / "two", ByteTokenizer(), workers=2, **KW)
    assert saved == [] and store_bytes(one) == store_bytes(two)


def test_a_failing_shard_write_stops_ingest_without_index_and_a_rerun_completes(tmp_path, monkeypatch):
    corpus = make_corpus(tmp_path / "c")
    clean = ingest([TextSource(corpus)], tmp_path / "clean", ByteTokenizer(), workers=1, **KW)

    calls = []
    store_shard = ingest_mod._SplitWriter._store_shard

    def failing(self, name, parts):
        calls.append(name)
        if name == "train-00002.bin":
            raise OSError(28, "No space left on device")
        store_shard(self, name, parts)

    monkeypatch.setattr(ingest_mod._SplitWriter, "_store_shard", failing)
    out = tmp_path / "s"
    before = worker_processes()
    with pytest.raises(OSError, match="No space left"):
        ingest([TextSource(corpus)], out, SlowBytes(), workers=2, **KW)
    assert worker_processes() <= before  # the pool and the fingerprint process are stopped
    assert not (out / "index.json").exists()
    assert calls[-1] == "train-00002.bin"  # nothing was written after the failed shard
    assert not (out / "train-00002.bin").exists() and not (out / "train-00003.bin").exists()
    if (out / STATE_NAME).exists():
        check_state_names_durable_files(out)

    monkeypatch.setattr(ingest_mod._SplitWriter, "_store_shard", store_shard)
    ingest([TextSource(corpus)], out, ByteTokenizer(), workers=2, **KW)
    assert store_bytes(out) == store_bytes(clean)


SLOW_INGEST = """
import sys, time
from scalelab.data.corpus import TextSource
from scalelab.data.ingest import ingest
from scalelab.data.tokenize import ByteTokenizer

class SlowBytes(ByteTokenizer):  # same definition and hash as ByteTokenizer, just slow
    def encode_documents(self, texts, dtype=None):
        time.sleep(0.05)
        return super().encode_documents(texts, dtype)

if __name__ == "__main__":
    ingest([TextSource(sys.argv[1])], sys.argv[2], SlowBytes(), heldout_fraction=0.2,
           shard_tokens=4096, chunk_bytes=2000, workers=int(sys.argv[3]))
"""


@pytest.mark.parametrize(("workers", "resume_workers"), [(1, 1), (2, 2), (2, 1)])
def test_killed_ingest_resumes_to_identical_store(tmp_path, workers, resume_workers):
    """kill -9 midway (serial or parallel), re-run with any worker count: the store one clean ingest
    gives, finished shards kept, and a state that only ever named durable files."""
    corpus = make_corpus(tmp_path / "c", n_docs=120)
    out = tmp_path / "killed"
    script = tmp_path / "slow.py"
    script.write_text(SLOW_INGEST)
    proc = subprocess.Popen([sys.executable, str(script), str(corpus), str(out), str(workers)])
    state_file = out / STATE_NAME
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            try:
                if json.loads(state_file.read_text())["next_chunk"] >= 8:
                    break
            except (OSError, ValueError, KeyError):
                pass
            assert proc.poll() is None, "ingest finished before it could be killed"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert not (out / "index.json").exists()
    check_state_names_durable_files(out)
    done = json.loads(state_file.read_text())["splits"]["train"]["shards"]
    first = out / done[0]["file"]
    before = first.stat().st_mtime_ns, first.stat().st_ino

    kw = dict(heldout_fraction=0.2, shard_tokens=4096, chunk_bytes=2000)
    ingest([TextSource(corpus)], out, ByteTokenizer(), workers=resume_workers, **kw)
    assert (first.stat().st_mtime_ns, first.stat().st_ino) == before  # finished shard kept
    clean = ingest([TextSource(corpus)], tmp_path / "clean", ByteTokenizer(), workers=1, **kw)
    assert store_bytes(out) == store_bytes(clean)
    assert TokenStore.open(out).content_hash == TokenStore.open(clean).content_hash


def test_fingerprint_errors_are_the_serial_ones(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    corpus = make_corpus(tmp_path / "c", n_docs=30)
    bad = tmp_path / "bad.jsonl"  # two bad lines far apart: the first is reported
    lines = [json.dumps({"text": f"line {i} " * 40}) for i in range(300)]
    lines[150], lines[280] = "{oops", "[1, 2]"
    bad.write_text("\n".join(lines) + "\n")
    cases = [  # (sources, what the serial code reports)
        ([JsonlSource(empty, "text")], "empty.jsonl: the source has no documents"),
        ([TextSource(corpus), JsonlSource(empty, "text")], "empty.jsonl: the source has no documents"),
        ([JsonlSource(bad, "text")], "bad.jsonl:151: not valid JSON"),
    ]
    for i, (sources, expected) in enumerate(cases):
        messages = []
        for workers in (1, 2):
            fresh = [pickle.loads(pickle.dumps(s)) for s in sources]  # nothing fingerprinted yet
            with pytest.raises(DataError) as info:
                ingest(fresh, tmp_path / f"s{i}-{workers}", ByteTokenizer(), workers=workers, **KW)
            messages.append(str(info.value))
            assert not (tmp_path / f"s{i}-{workers}" / "index.json").exists()
        assert messages[0] == messages[1] and expected in messages[0], messages


def test_background_fingerprints_match_and_warnings_reach_this_process(tmp_path, caplog):
    jl = tmp_path / "d.jsonl"
    jl.write_text("".join(json.dumps({"text": f"doc {i} " * 30}) + "\n" for i in range(50)) + "{bad\n")
    sources = [BuiltinCorpus(root=stdlib_dir() / "json"), JsonlSource(jl, "text", skip_bad=True)]
    here = [s.fingerprint() for s in [pickle.loads(pickle.dumps(s)) for s in sources]]
    caplog.set_level(logging.WARNING, logger="scalelab")
    there = ingest_mod._BackgroundFingerprints(sources)
    try:
        there.wait()
    finally:
        there.close()
    assert [s._fingerprint for s in sources] == here and sources[1].skipped == 1
    assert any("skipped 1 bad line" in r.getMessage() for r in caplog.records)


def big(n: int) -> np.ndarray:
    return np.full(n, n % 251, dtype=np.uint16)


def test_ordered_map_carries_large_results_in_order():
    sizes = [(i * 7919) % 900_000 + 1 for i in range(40)]  # up to ~1.8 MB each: over the pipe size
    out = list(ordered_map(big, big, sizes, 2))
    assert [a.size for a in out] == sizes and all(
        (a == n % 251).all() for a, n in zip(out, sizes, strict=True)
    )


def test_ordered_map_reports_a_dead_worker():
    with pytest.raises(RuntimeError, match="died"):
        list(ordered_map(_slow_identity, os._exit, [1] * 20, 2))


def _slow_identity(x: int) -> int:
    time.sleep(0.05)
    return x


def test_background_call_result_errors_and_stop():
    import math

    from scalelab.data.procs import BackgroundCall

    before = worker_processes()
    ok = BackgroundCall(math.isqrt, 10**6)
    bad = BackgroundCall(math.isqrt, -1)
    unpicklable = BackgroundCall(len, lambda: 0)
    try:
        assert ok.result() == 1000
        with pytest.raises(ValueError, match="nonnegative"):
            bad.result()
        with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
            unpicklable.result()
        assert ok.ready() and bad.ready() and unpicklable.ready()
    finally:
        for call in (ok, bad, unpicklable):
            call.close()
    assert worker_processes() <= before
