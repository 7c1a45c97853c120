"""Parallel, resumable ingest: documents → tokens → checksummed shards + index.

How it stays deterministic and resumable:

- The sources are cut into chunks (`scalelab.data.corpus.Span`) of about `chunk_bytes` of text,
  never crossing a source. Chunk boundaries depend only on the data, never on the number of workers
  (and the token stream does not depend on them at all: shards are cut by token count).
- With ``workers=W > 1``, this process and ``W - 1`` pool processes read and tokenize chunks
  (`scalelab.data.procs.ordered_map`): the pool starts in the background while this process
  already tokenizes, and afterwards this process takes whatever chunk the pool has not, whenever
  the oldest result is not ready. A chunk of a file-backed source travels as a few paths and
  offsets and the worker reads its text itself, so nothing reads, decodes or pickles text on its
  behalf (other sources' chunks carry their documents). Results are consumed strictly in chunk
  order, so the token stream — and every shard byte — is independent of `workers`. What stays
  serial: the sources' fingerprint pass, cutting chunks, and writing and hashing shards.
- A document goes to ``heldout`` when a hash of its id falls below `heldout_fraction`.
- Each split's tokens are cut into shards of exactly `shard_tokens` (the last may be shorter). A
  shard is written atomically as soon as it is full. After a chunk that completed a shard, the
  unfinished tails and then a small state file (next chunk, finished shards, tail file and length)
  are made durable. A tail is appended to, not rewritten: only after a shard took its tokens does a
  new tail file (the next generation) start, and the older one is deleted once the state naming
  the new one is saved. (Rewriting the whole held-out tail at every train shard wrote ~45% more
  bytes than the shards themselves: 227 MiB of tails for 512 MiB of shards at 256 MB of text.)
- A re-run after a crash loads that state, skips the chunks already done without tokenizing them
  again, and continues; finished shards are kept. ``index.json`` is written last, so a store that
  looks complete is complete.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from scalelab.data.corpus import Source, Span, combined_fingerprint, iter_spans, span_documents
from scalelab.data.procs import ordered_map
from scalelab.data.shards import (
    FORMAT_NAME,
    FORMAT_VERSION,
    INDEX_NAME,
    SPLITS,
    TOKENIZER_FILE,
    ShardInfo,
    atomic_write_bytes,
    atomic_write_json,
    shard_dicts,
    shard_name,
)
from scalelab.data.tokenize import BPETokenizer, Tokenizer, tokenizer_from_definition
from scalelab.errors import DataError

log = logging.getLogger(__name__)

STATE_NAME = ".ingest-state.json"
DEFAULT_CHUNK_BYTES = 1 << 18  # ~0.2 s of BPE per chunk: little idle time for workers at the end
_CHUNKING = 2  # version of how chunks are cut (part of the resume key): 2 = spans within a source
_HELDOUT_SALT = b"scalelab-heldout-v1:"


def is_heldout(doc_id: str, heldout_fraction: float) -> bool:
    """Deterministic split: hash of the doc id, as a number in [0, 1), below the fraction."""
    digest = hashlib.blake2b(_HELDOUT_SALT + doc_id.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64 < heldout_fraction


# --------------------------------------------------------------------------------------- workers
_worker_tokenizer: Tokenizer | None = None


def _init_worker(definition: dict[str, Any]) -> None:
    global _worker_tokenizer
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process = one core; parallelism is ours
    _worker_tokenizer = tokenizer_from_definition(definition)


def _tokenizer_threads_off(results: Iterator[Any]) -> Iterator[Any]:
    """`results`, consumed with HF `tokenizers`' own threads off in this process (it tokenizes a
    worker's share beside the pool's processes: one thread each); the setting is restored after."""
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield from results
    finally:
        if before is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before


def _tokenize_chunk(
    chunk: tuple[int, Span], heldout_fraction: float, tokenizer: Tokenizer | None = None
) -> tuple[np.ndarray, np.ndarray, int, int]:
    """(train tokens, heldout tokens, train docs, heldout docs) of one chunk (source index, span),
    read here; each document ends with EOD."""
    tok = tokenizer if tokenizer is not None else _worker_tokenizer
    assert tok is not None
    train_texts: list[str] = []
    heldout_texts: list[str] = []
    for doc in span_documents(*chunk):
        (heldout_texts if is_heldout(doc.doc_id, heldout_fraction) else train_texts).append(doc.text)
    return (
        tok.encode_documents(train_texts),
        tok.encode_documents(heldout_texts),
        len(train_texts),
        len(heldout_texts),
    )


# ---------------------------------------------------------------------------------- split writer
class _SplitWriter:
    """Accumulates one split's tokens and writes full shards atomically."""

    def __init__(self, out: Path, split: str, shard_tokens: int, dtype: np.dtype) -> None:
        self.out, self.split, self.shard_tokens, self.dtype = out, split, shard_tokens, dtype
        self.shards: list[ShardInfo] = []
        self.pending: list[np.ndarray] = []
        self.pending_tokens = 0
        self.documents = 0
        self.generation = 0  # of the tail file; a new one starts when a shard took the tail's tokens
        self.saved_tokens = 0  # tokens at the start of the current tail file that are the tail's
        self.stale = True  # the current tail file does not start with the tail (or does not exist)

    def tail_path(self, generation: int | None = None) -> Path:
        return self.out / f".{self.split}.tail-{self.generation if generation is None else generation}.bin"

    def tail_files(self) -> list[Path]:
        return sorted(self.out.glob(f".{self.split}.tail-*.bin"))

    def add(self, tokens: np.ndarray) -> bool:
        """Append tokens; write every shard that became full. True when at least one was written."""
        if tokens.size == 0:
            return False
        self.pending.append(tokens)
        self.pending_tokens += tokens.size
        wrote = False
        while self.pending_tokens >= self.shard_tokens:
            buf = np.concatenate(self.pending)
            self._write_shard(buf[: self.shard_tokens])
            rest = buf[self.shard_tokens :]
            self.pending = [rest] if rest.size else []
            self.pending_tokens = rest.size
            self.stale = True
            wrote = True
        return wrote

    def tail(self) -> np.ndarray:
        return np.concatenate(self.pending) if self.pending else np.zeros(0, dtype=self.dtype)

    def finish(self) -> None:
        if self.pending_tokens:
            self._write_shard(self.tail())
            self.pending, self.pending_tokens = [], 0

    def _write_shard(self, tokens: np.ndarray) -> None:
        data = np.ascontiguousarray(tokens, dtype=self.dtype.newbyteorder("<"))
        name = shard_name(self.split, len(self.shards))
        atomic_write_bytes(self.out / name, memoryview(data).cast("B"))
        self.shards.append(ShardInfo(name, int(data.size), hashlib.sha256(data).hexdigest()))
        log.debug("wrote %s (%d tokens)", name, data.size)

    # -- resume
    def state(self) -> dict[str, Any]:
        return {
            "shards": shard_dicts(self.shards),
            "tail_generation": self.generation,
            "tail_tokens": int(self.pending_tokens),
            "documents": self.documents,
        }

    def save_tail(self) -> None:
        """Make the tail durable: append its new tokens, or start the next generation's file."""
        tail = self.tail()
        self.pending = [tail] if tail.size else []
        if self.stale:
            self.generation += 1
            atomic_write_bytes(self.tail_path(), memoryview(np.ascontiguousarray(tail)).cast("B"))
        elif tail.size > self.saved_tokens:
            with open(self.tail_path(), "ab") as fh:
                fh.write(memoryview(np.ascontiguousarray(tail[self.saved_tokens :])).cast("B"))
                fh.flush()
                os.fsync(fh.fileno())
        self.saved_tokens, self.stale = int(tail.size), False

    def drop_old_tails(self) -> None:
        """Delete tail files of earlier generations (call once a state naming the current is saved)."""
        for p in self.tail_files():
            if p != self.tail_path():
                p.unlink(missing_ok=True)

    def restore(self, state: dict[str, Any]) -> bool:
        """Load finished shards and the tail from a checkpoint; False when files do not match it."""
        shards = [ShardInfo(**s) for s in state["shards"]]
        for s in shards:
            p = self.out / s.file
            if not p.is_file() or p.stat().st_size != s.tokens * self.dtype.itemsize:
                return False
        try:
            generation, n = int(state["tail_generation"]), int(state["tail_tokens"])
            tail = np.fromfile(self.tail_path(generation), dtype=self.dtype)
        except (KeyError, OSError):
            return False
        if tail.size < n:  # longer is fine: tokens appended after the state was saved
            return False
        tail = tail[:n]
        self.shards = shards
        self.pending = [tail] if tail.size else []
        self.pending_tokens = int(tail.size)
        self.documents = int(state["documents"])
        self.generation, self.saved_tokens, self.stale = generation, n, True  # next save: a clean file
        return True


# ---------------------------------------------------------------------------------------- ingest
def _job_key(
    sources: Sequence[Source], tokenizer: Tokenizer, heldout_fraction: float, shard_tokens: int, chunk: int
) -> str:
    blob = json.dumps(
        {
            "format_version": FORMAT_VERSION,
            "sources": [s.fingerprint() for s in sources],
            "tokenizer": tokenizer.hash,
            "heldout_fraction": heldout_fraction,
            "shard_tokens": shard_tokens,
            "chunk_bytes": chunk,
            "chunking": _CHUNKING,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def _clean_partial(out: Path) -> None:
    for p in out.iterdir():
        n = p.name
        if n.endswith(".bin") and n.split("-")[0] in SPLITS or n.endswith(".tmp") or ".tail-" in n:
            p.unlink()


def ingest(
    sources: Sequence[Source],
    out: str | Path,
    tokenizer: Tokenizer,
    *,
    heldout_fraction: float = 0.02,
    shard_tokens: int = 1 << 22,
    workers: int = 1,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    progress: Callable[[int], None] | None = None,
) -> Path:
    """Tokenize `sources` into a token store at `out`; returns `out`.

    `workers` > 1 tokenizes in that many single-threaded processes: this one and ``workers - 1``
    pool processes (`scalelab.data.procs.ordered_map`); with ``workers=1`` the tokenizer runs in
    this process with its own threading (HF `tokenizers` uses all cores unless
    ``TOKENIZERS_PARALLELISM=false``). The result is byte-identical for any value.
    Re-running after an interruption resumes from the last checkpoint. `progress` (if given) is
    called after each chunk with the number of tokens it produced.
    """
    out = Path(out)
    if not 0 < heldout_fraction < 1:
        raise DataError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    if shard_tokens < 1:
        raise DataError(f"shard_tokens must be positive, got {shard_tokens}")
    if workers < 1:
        raise DataError(f"workers must be at least 1, got {workers}")
    if (out / INDEX_NAME).exists():
        raise DataError(f"{out}: already contains a complete token store; remove it or choose another path")
    if not sources:
        raise DataError("no sources given (empty corpus)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(f"{out}: cannot create the store directory ({err.strerror or err})") from None

    job = _job_key(sources, tokenizer, heldout_fraction, shard_tokens, chunk_bytes)  # also fingerprints
    dtype = tokenizer.dtype
    writers = {s: _SplitWriter(out, s, shard_tokens, dtype) for s in SPLITS}
    state_path = out / STATE_NAME
    next_chunk = _load_state(state_path, job, writers)
    if next_chunk == 0:
        _clean_partial(out)
    else:
        log.info("%s: resuming ingest at chunk %d", out, next_chunk)

    chunks = (c for i, c in enumerate(iter_spans(sources, chunk_bytes)) if i >= next_chunk)
    here = functools.partial(_tokenize_chunk, heldout_fraction=heldout_fraction, tokenizer=tokenizer)
    if workers == 1:
        results: Iterator[Any] = map(here, chunks)
    else:
        there = functools.partial(_tokenize_chunk, heldout_fraction=heldout_fraction)
        results = _tokenizer_threads_off(
            ordered_map(here, there, chunks, workers, _init_worker, (tokenizer.definition(),))
        )

    chunk_index = next_chunk
    for train, heldout, n_train, n_heldout in results:
        writers["train"].documents += n_train
        writers["heldout"].documents += n_heldout
        wrote = writers["train"].add(train)
        wrote = writers["heldout"].add(heldout) or wrote
        chunk_index += 1
        if wrote:
            _save_state(state_path, job, chunk_index, writers)
        if progress is not None:
            progress(int(train.size + heldout.size))

    total_docs = sum(w.documents for w in writers.values())
    if total_docs == 0:
        raise DataError("the sources contain no documents (empty corpus)")
    for w in writers.values():
        w.finish()

    if isinstance(tokenizer, BPETokenizer):
        tokenizer.save(out / TOKENIZER_FILE)
    index = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "tokenizer": {
            "name": tokenizer.name,
            "hash": tokenizer.hash,
            "vocab_size": tokenizer.vocab_size,
            "eod_id": tokenizer.eod_id,
        },
        "dtype": dtype.name,
        "source_fingerprint": combined_fingerprint(sources),
        "sources": [{**s.describe(), "fingerprint": s.fingerprint()} for s in sources],
        "fingerprint": store_fingerprint(combined_fingerprint(sources), tokenizer.hash),
        "heldout_fraction": heldout_fraction,
        "shard_tokens": shard_tokens,
        "splits": {
            s: {
                "documents": w.documents,
                "tokens": sum(x.tokens for x in w.shards),
                "shards": shard_dicts(w.shards),
            }
            for s, w in writers.items()
        },
    }
    atomic_write_json(out / INDEX_NAME, index)
    for p in [state_path, *(f for w in writers.values() for f in w.tail_files())]:
        p.unlink(missing_ok=True)
    log.info(
        "%s: %d train / %d heldout tokens",
        out,
        index["splits"]["train"]["tokens"],
        index["splits"]["heldout"]["tokens"],
    )
    return out


def store_fingerprint(source_fingerprint: str, tokenizer_hash: str) -> str:
    """sha256 of the sources' content fingerprint and the tokenizer hash."""
    return hashlib.sha256(f"{source_fingerprint}:{tokenizer_hash}".encode()).hexdigest()


def _save_state(path: Path, job: str, next_chunk: int, writers: dict[str, _SplitWriter]) -> None:
    for w in writers.values():
        w.save_tail()
    atomic_write_json(
        path, {"job": job, "next_chunk": next_chunk, "splits": {s: w.state() for s, w in writers.items()}}
    )
    for w in writers.values():
        w.drop_old_tails()


def _load_state(path: Path, job: str, writers: dict[str, _SplitWriter]) -> int:
    """Restore writers from a checkpoint of the same job; the chunk to continue from (0: start over)."""
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return 0
    if state.get("job") != job:
        log.warning("%s: ingest state belongs to other sources/settings; starting over", path)
        return 0
    for split, w in writers.items():
        if not w.restore(state["splits"][split]):
            log.warning("%s: shard files do not match the ingest state; starting over", path)
            for w2 in writers.values():
                w2.__init__(w2.out, w2.split, w2.shard_tokens, w2.dtype)  # type: ignore[misc]
            return 0
    return int(state["next_chunk"])
