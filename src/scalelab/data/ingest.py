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
  order, so the token stream — and every shard byte — is independent of `workers`.
- Also with ``workers > 1``, the two other passes leave this process's main thread. A fresh ingest
  of file-backed sources computes their fingerprints (`Source.fingerprint`, a full re-read) in one
  more process (`scalelab.data.procs.BackgroundCall`) while tokenizing starts at once; its error
  (an empty source, the first bad line) is the one raised, as the serial code would. One writer
  thread does every file operation — shard writes and their SHA-256, tail writes, state files,
  deleting old tails — in the order the serial code does them (FIFO; at most four shards' bytes,
  or 32 MiB, queued). So a state file still names only shards and tails made durable before it, and
  an error in the writer stops the operations after it and is raised here before ``index.json``
  is written. What stays serial in this process: cutting chunks (for JSONL a read of the file
  that counts its lines), receiving results, and the bookkeeping (shards are cut as views, never
  copied). ``workers=1`` does everything here, in order, on one core.
- With ``executor="ray"`` the chunks are tokenized as Ray tasks instead (`scalelab.data.raymap`: each
  chunk travels as its source and span, every node reads its text from the same paths, so those must
  be on a shared file system); results still arrive in chunk order and everything after tokenizing —
  the writer thread, shards, state files, the index — is the same code here, so the store is
  byte-identical to a local ingest.
- A document goes to ``heldout`` when a hash of its id falls below `heldout_fraction`.
- Each split's tokens are cut into shards of exactly `shard_tokens` (the last may be shorter). A
  shard is written atomically as soon as it is full. After a chunk that completed a shard, the
  unfinished tails and then a small state file (next chunk, finished shards, tail file and length)
  are made durable. A tail is appended to, not rewritten: only after a shard took its tokens does a
  new tail file (the next generation) start, and the older one is deleted once the state naming
  the new one is saved. (Rewriting the whole held-out tail at every train shard wrote ~45% more
  bytes than the shards themselves: 227 MiB of tails for 512 MiB of shards at 256 MB of text.)
  The state is keyed by the sources' fingerprints, so while a background fingerprint is not ready
  no state is saved (a crash then starts over, as it would without a state file); the first shard
  after it is ready saves one.
- A re-run after a crash loads that state, skips the chunks already done without tokenizing them
  again, and continues; finished shards are kept (temporary files of atomic writes the crash cut
  short are deleted). ``index.json`` is written last, so a store that looks complete is complete.
- Two processes never ingest into one directory at once: the second finds `.ingest.lock` held and
  stops with "already in use by PID …". Ingest only ever deletes files it created: the names it
  writes (shards, tails, its state, the temporaries of its atomic writes) are reserved, it claims a
  directory (`.ingest-owner`) only when none of those names is there already, and it deletes only
  regular files with those names (a directory called `x.tmp`, or another tool's `notes.tmp`, stays).
"""

from __future__ import annotations

import collections
import functools
import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Generator, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import numpy as np

from scalelab.data.corpus import Source, Span, combined_fingerprint, iter_spans, span_documents
from scalelab.data.procs import BackgroundCall, ordered_map
from scalelab.data.shards import (
    FORMAT_NAME,
    FORMAT_VERSION,
    INDEX_NAME,
    SPLITS,
    TOKENIZER_FILE,
    ShardInfo,
    atomic_write_json,
    shard_dicts,
    shard_name,
)
from scalelab.data.tokenize import BPETokenizer, Tokenizer, tokenizer_from_definition
from scalelab.errors import DataError
from scalelab.io import atomic_write_parts, atomic_write_text, file_lock

log = logging.getLogger(__name__)

STATE_NAME = ".ingest-state.json"
LOCK_NAME = ".ingest.lock"
OWNER_NAME = ".ingest-owner"
_SPLIT_RE = "|".join(map(re.escape, SPLITS))
#: every name ingest writes into its output directory (and may therefore delete), temporaries included
_OWN_BASE = (
    rf"(?:(?:{_SPLIT_RE})-\d{{5,}}\.bin|\.(?:{_SPLIT_RE})\.tail-\d+\.bin|{re.escape(STATE_NAME)}"
    rf"|{re.escape(INDEX_NAME)}|{re.escape(TOKENIZER_FILE)})"
)
#: the files themselves, and the temporaries `io.atomic_write_*` makes beside them (`.NAME.XXXX.tmp`)
_OWN_NAME = re.compile(rf"^(?:{_OWN_BASE}|\.{_OWN_BASE}\.[^/]*\.tmp)$")
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


_tokenizers_by_hash: dict[str, Tokenizer] = {}


def _tokenize_chunk_shared(
    chunk: tuple[int, Span], heldout_fraction: float, tokenizer_hash: str, definition: dict[str, Any]
) -> tuple[np.ndarray, np.ndarray, int, int]:
    """`_tokenize_chunk` in a Ray task: the tokenizer is built from its definition once per process."""
    tok = _tokenizers_by_hash.get(tokenizer_hash)
    if tok is None:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # a task is given one CPU
        tok = _tokenizers_by_hash[tokenizer_hash] = tokenizer_from_definition(definition)
    return _tokenize_chunk(chunk, heldout_fraction, tok)


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


# ------------------------------------------------------------------------------------ file writes
def _now(fn: Callable[..., object], *args: Any, nbytes: int = 0) -> None:
    """Run a file operation at once, in this thread (``workers=1``)."""
    fn(*args)


class _Writes:
    """Runs the store's file operations on one background thread, in the order they are issued.

    Call it like `_now`. A single thread (FIFO) keeps the serial order, so crash safety is that of
    the serial code; operations whose bytes would make more than `max_bytes` queued wait for the
    oldest first (the arrays they hold are never changed afterwards). Once one fails, the later
    ones do nothing, and the error is raised in the issuing thread by the next call, `check`,
    `drain` — always before the caller writes the index.
    """

    def __init__(self, max_bytes: int) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="scalelab-ingest-writer")
        self._queued: collections.deque[tuple[Future[None], int]] = collections.deque()
        self._bytes = 0
        self._max_bytes = max_bytes
        self._failed = False

    def __call__(self, fn: Callable[..., object], *args: Any, nbytes: int = 0) -> None:
        self.check()
        while self._queued and self._bytes + nbytes > self._max_bytes:
            self._wait_oldest()
        self._queued.append((self._pool.submit(self._run, fn, args), nbytes))
        self._bytes += nbytes

    def _run(self, fn: Callable[..., object], args: tuple[Any, ...]) -> None:
        if self._failed:  # nothing may follow a failed operation (a state naming a missing shard)
            return
        try:
            fn(*args)
        except BaseException:
            self._failed = True
            raise

    def _wait_oldest(self) -> None:
        done, nbytes = self._queued.popleft()
        self._bytes -= nbytes
        done.result()  # raises the operation's error

    def check(self) -> None:
        """Raise the error of a finished operation, if any (cheap: never waits)."""
        while self._queued and self._queued[0][0].done():
            self._wait_oldest()

    def drain(self) -> None:
        """Wait for every queued operation; raise the first error."""
        while self._queued:
            self._wait_oldest()

    def close(self) -> None:
        """Let queued operations finish (each is whole and in order) and stop the thread."""
        self._pool.shutdown(wait=True)


def _bytes_of(parts: list[np.ndarray]) -> list[memoryview]:
    return [memoryview(np.ascontiguousarray(p)).cast("B") for p in parts]


def _write_tail(path: Path, parts: list[np.ndarray]) -> None:
    atomic_write_parts(path, _bytes_of(parts))


def _append_tail(path: Path, parts: list[np.ndarray]) -> None:
    with open(path, "ab") as fh:
        for b in _bytes_of(parts):
            fh.write(b)
        fh.flush()
        os.fsync(fh.fileno())


# ---------------------------------------------------------------------------------- split writer
class _SplitWriter:
    """Accumulates one split's tokens and writes full shards atomically.

    The bookkeeping (which shard, which tail generation, how many tokens saved) happens in the
    calling thread; the file operations go through `io` (`_now`, or a `_Writes` queue), each with
    the arrays and paths it needs. `shards` holds what has been written, so it lags behind
    `n_shards` while writes are queued.
    """

    def __init__(
        self, out: Path, split: str, shard_tokens: int, dtype: np.dtype, io: Callable[..., None] = _now
    ) -> None:
        self.out, self.split, self.shard_tokens, self.dtype, self.io = out, split, shard_tokens, dtype, io
        self.shards: list[ShardInfo] = []
        self.n_shards = 0  # shards issued: named and queued for writing
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
            self._write_shard(self._take(self.shard_tokens))
            self.stale = True
            wrote = True
        return wrote

    def _take(self, n: int) -> list[np.ndarray]:
        """Remove the first `n` pending tokens; they are returned as views of the pending arrays
        (which are never written to), so cutting a shard copies nothing."""
        parts: list[np.ndarray] = []
        while n:
            head = self.pending[0]
            if head.size <= n:
                parts.append(self.pending.pop(0))
            else:
                parts.append(head[:n])
                self.pending[0] = head[n:]
            n -= parts[-1].size
            self.pending_tokens -= parts[-1].size
        return parts

    def _after(self, n: int) -> list[np.ndarray]:
        """Views of the pending tokens after the first `n`."""
        parts: list[np.ndarray] = []
        for a in self.pending:
            if n >= a.size:
                n -= a.size
            else:
                parts.append(a[n:])
                n = 0
        return parts

    def tail(self) -> np.ndarray:
        return np.concatenate(self.pending) if self.pending else np.zeros(0, dtype=self.dtype)

    def finish(self) -> None:
        if self.pending_tokens:
            self._write_shard(self._take(self.pending_tokens))

    def _write_shard(self, parts: list[np.ndarray]) -> None:
        name = shard_name(self.split, self.n_shards)
        self.n_shards += 1
        self.io(self._store_shard, name, parts, nbytes=sum(p.nbytes for p in parts))

    def _store_shard(self, name: str, parts: list[np.ndarray]) -> None:
        data = [np.ascontiguousarray(p, dtype=self.dtype.newbyteorder("<")) for p in parts]
        atomic_write_parts(self.out / name, [memoryview(d).cast("B") for d in data])
        h = hashlib.sha256()
        for d in data:
            h.update(d)
        tokens = sum(d.size for d in data)
        self.shards.append(ShardInfo(name, tokens, h.hexdigest()))
        log.debug("wrote %s (%d tokens)", name, tokens)

    # -- resume
    def deferred_state(self) -> Callable[[], dict[str, Any]]:
        """This split's part of the state file as it is now, built when called (by the operation
        that writes the state, after the shards issued before it are written)."""
        n_shards, generation, tail_tokens, documents = (
            self.n_shards,
            self.generation,
            int(self.pending_tokens),
            self.documents,
        )

        def build() -> dict[str, Any]:
            assert len(self.shards) == n_shards, "state built before its shards were written"
            return {
                "shards": shard_dicts(self.shards),
                "tail_generation": generation,
                "tail_tokens": tail_tokens,
                "documents": documents,
            }

        return build

    def save_tail(self) -> None:
        """Make the tail durable: append its new tokens, or start the next generation's file."""
        if self.stale:
            self.generation += 1
            new = self._after(0)
            self.io(_write_tail, self.tail_path(), new, nbytes=sum(p.nbytes for p in new))
        elif self.pending_tokens > self.saved_tokens:
            new = self._after(self.saved_tokens)
            self.io(_append_tail, self.tail_path(), new, nbytes=sum(p.nbytes for p in new))
        self.saved_tokens, self.stale = int(self.pending_tokens), False

    def drop_old_tails(self) -> None:
        """Delete tail files of earlier generations (call once a state naming the current is saved)."""
        self.io(self._drop_tails_but, self.tail_path())

    def _drop_tails_but(self, keep: Path) -> None:
        for p in self.tail_files():
            if p != keep:
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
        self.n_shards = len(shards)
        self.pending = [tail] if tail.size else []
        self.pending_tokens = int(tail.size)
        self.documents = int(state["documents"])
        self.generation, self.saved_tokens, self.stale = generation, n, True  # next save: a clean file
        return True


# ----------------------------------------------------------------------------------- fingerprints
def _fingerprints_there(sources: list[Source]) -> tuple[list[tuple[str, int]], list[tuple[str, int, str]]]:
    """In the background process: each source's (fingerprint, skipped documents), and what the pass
    logged under ``scalelab`` as (logger, level, message) for the caller to log."""
    records: list[tuple[str, int, str]] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append((record.name, record.levelno, record.getMessage()))

    logger, keep = logging.getLogger("scalelab"), Keep()
    before = logger.level, logger.propagate
    logger.addHandler(keep)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    try:
        return [(s.fingerprint(), s.skipped) for s in sources], records
    finally:
        logger.removeHandler(keep)
        logger.setLevel(before[0])
        logger.propagate = before[1]


class _BackgroundFingerprints:
    """Sources' fingerprints computed in another process (`BackgroundCall`) while this one goes on.

    `wait` puts the results on the sources (their cached fingerprints) and logs what the pass
    logged, or raises the pass's error — the same `DataError` `Source.fingerprint` raises here.
    """

    def __init__(self, sources: Sequence[Source]) -> None:
        self.sources = list(sources)
        self._call = BackgroundCall(_fingerprints_there, self.sources)

    def ready(self) -> bool:
        return self._call.ready()

    def wait(self) -> None:
        """Wait for the pass; set each source's fingerprint, or raise the pass's error."""
        fingerprints, records = self._call.result()
        for src, (fp, skipped) in zip(self.sources, fingerprints, strict=True):
            src._fingerprint, src.skipped = fp, skipped
        for name, level, message in records:
            logging.getLogger(name).log(level, "%s", message)

    def close(self) -> None:
        self._call.close()


def _fingerprint_in_background(sources: Sequence[Source]) -> bool:
    """Whether a background pass pays: some source is not fingerprinted yet, and every source is a
    small, picklable reader of its own spans (file-backed) that another process can re-read."""
    return any(s._fingerprint is None for s in sources) and all(
        type(s).read_part is not Source.read_part for s in sources
    )


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


def _own_files(out: Path) -> list[Path]:
    """Regular files in `out` whose names ingest writes (never a directory, a link or another name)."""
    return sorted(p for p in out.iterdir() if _OWN_NAME.match(p.name) and p.is_file() and not p.is_symlink())


def _claim(out: Path) -> None:
    """Make `out` ingest's own, unless files with ingest's names that it did not create are there."""
    if (out / OWNER_NAME).is_file():
        return
    foreign = [p.name for p in out.iterdir() if _OWN_NAME.match(p.name)]
    if foreign:
        raise DataError(
            f"{out}: holds {sorted(foreign)[0]}, a name a token store uses, which no ingest into this "
            "directory created; choose an empty directory for --out (nothing was changed)"
        )
    atomic_write_text(out / OWNER_NAME, "files with token store names here were written by scalelab ingest\n")


def _clean_partial(out: Path, temporary_only: bool = False) -> None:
    """Delete shards, tails and temporary files of an earlier attempt (with `temporary_only`: only
    the temporary files of atomic writes a crash interrupted, which nothing names)."""
    for p in _own_files(out):
        n = p.name
        partial = n.endswith(".bin")
        if n.endswith(".tmp") or (partial and not temporary_only):
            p.unlink(missing_ok=True)


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
    executor: Literal["local", "ray"] = "local",
    text_progress: Callable[[int], None] | None = None,
) -> Path:
    """Tokenize `sources` into a token store at `out`; returns `out`.

    `workers` > 1 tokenizes in that many single-threaded processes: this one and ``workers - 1``
    pool processes (`scalelab.data.procs.ordered_map`), with the fingerprint pass in one more
    process and file writes on a writer thread (see the module docstring); with ``workers=1``
    everything runs here, in order, and the tokenizer with its own threading (HF `tokenizers` uses
    all cores unless ``TOKENIZERS_PARALLELISM=false``). The result is byte-identical for any value.
    Re-running after an interruption resumes from the last checkpoint. `progress` (if given) is
    called after each chunk with the number of tokens it produced, `text_progress` with the bytes of text
    it covered (`Span.size_bytes`; chunks a resume skips count at once), which add up to about
    `sum(s.size_bytes() for s in sources)`. ``executor="ray"`` tokenizes as Ray
    tasks on the cluster at $RAY_ADDRESS (or a local Ray) instead; `workers` is then unused.
    """
    out = Path(out)
    if not 0 < heldout_fraction < 1:
        raise DataError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    if shard_tokens < 1:
        raise DataError(f"shard_tokens must be positive, got {shard_tokens}")
    if workers < 1:
        raise DataError(f"workers must be at least 1, got {workers}")
    if executor not in ("local", "ray"):
        raise DataError(f"executor must be 'local' or 'ray', got {executor!r}")
    if (out / INDEX_NAME).exists():
        raise DataError(f"{out}: already contains a complete token store; remove it or choose another path")
    if not sources:
        raise DataError("no sources given (empty corpus)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(f"{out}: cannot create the store directory ({err.strerror or err})") from None
    with file_lock(out / LOCK_NAME, wait=False, what=f"{out} (token store being written)"):
        if (out / INDEX_NAME).exists():  # again: another ingest may have finished since the check above
            raise DataError(
                f"{out}: already contains a complete token store; remove it or choose another path"
            )
        _claim(out)
        return _ingest_locked(
            sources,
            out,
            tokenizer,
            heldout_fraction,
            shard_tokens,
            workers,
            chunk_bytes,
            progress,
            executor,
            text_progress,
        )


def _ingest_locked(
    sources: Sequence[Source],
    out: Path,
    tokenizer: Tokenizer,
    heldout_fraction: float,
    shard_tokens: int,
    workers: int,
    chunk_bytes: int,
    progress: Callable[[int], None] | None,
    executor: str = "local",
    text_progress: Callable[[int], None] | None = None,
) -> Path:
    state_path = out / STATE_NAME

    def job_key() -> str:  # also fingerprints the sources (unless they already are)
        return _job_key(sources, tokenizer, heldout_fraction, shard_tokens, chunk_bytes)

    background = workers > 1 or executor == "ray"
    fingerprints: _BackgroundFingerprints | None = None
    job: str | None = None
    if background and not state_path.exists() and _fingerprint_in_background(sources):
        fingerprints = _BackgroundFingerprints(sources)  # nothing to resume: the key can wait
    else:
        job = job_key()
    dtype = tokenizer.dtype
    io = _Writes(max_bytes=max(4 * shard_tokens * dtype.itemsize, 1 << 25)) if background else None
    writers = {s: _SplitWriter(out, s, shard_tokens, dtype, io or _now) for s in SPLITS}
    results: Iterator[Any] | None = None
    try:
        next_chunk = 0 if job is None else _load_state(state_path, job, writers)
        if next_chunk == 0:
            _clean_partial(out)
        else:
            log.info("%s: resuming ingest at chunk %d", out, next_chunk)
            _clean_partial(out, temporary_only=True)

        sizes: collections.deque[int] = collections.deque()  # text bytes of the chunks in flight, in order
        chunks = _chunks_from(iter_spans(sources, chunk_bytes), next_chunk, sizes, text_progress)
        here = functools.partial(_tokenize_chunk, heldout_fraction=heldout_fraction, tokenizer=tokenizer)
        if executor == "ray":
            from scalelab.data.raymap import ray_ordered_map

            results = ray_ordered_map(
                _tokenize_chunk_shared,
                chunks,
                shared=(heldout_fraction, tokenizer.hash, tokenizer.definition()),
            )
        elif workers == 1:
            results = map(here, chunks)
        else:
            there = functools.partial(_tokenize_chunk, heldout_fraction=heldout_fraction)
            results = _tokenizer_threads_off(
                ordered_map(here, there, chunks, workers, _init_worker, (tokenizer.definition(),))
            )

        chunk_index = next_chunk
        for train, heldout, n_train, n_heldout in results:
            if fingerprints is not None and job is None and fingerprints.ready():
                fingerprints.wait()  # raises the fingerprint pass's error, if any
                job = job_key()
            if io is not None:
                io.check()
            writers["train"].documents += n_train
            writers["heldout"].documents += n_heldout
            wrote = writers["train"].add(train)
            wrote = writers["heldout"].add(heldout) or wrote
            chunk_index += 1
            if wrote and job is not None:  # without the key (not fingerprinted yet) no state
                _save_state(state_path, job, chunk_index, writers)
            if progress is not None:
                progress(int(train.size + heldout.size))
            if text_progress is not None:
                text_progress(sizes.popleft())

        if fingerprints is not None and job is None:
            fingerprints.wait()
            job = job_key()
        total_docs = sum(w.documents for w in writers.values())
        if total_docs == 0:
            raise DataError("the sources contain no documents (empty corpus)")
        for w in writers.values():
            w.finish()
        if io is not None:
            io.drain()
    except DataError:
        if fingerprints is not None and job is None:  # the serial code fingerprints first: its
            try:  # error (a bad line, an empty source) is the one to report
                fingerprints.wait()
            except DataError as err:
                raise err from None
        raise
    finally:
        if isinstance(results, Generator):
            results.close()  # stops the pool processes now, also when this raises
        if io is not None:
            io.close()
        if fingerprints is not None:
            fingerprints.close()

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


def _chunks_from(
    spans: Iterator[tuple[int, Span]],
    first: int,
    sizes: collections.deque[int],
    text_progress: Callable[[int], None] | None,
) -> Iterator[tuple[int, Span]]:
    """The chunks from number `first` on; each one's text bytes appended to `sizes` as it is handed out
    (with `text_progress`), and the bytes of the chunks before `first` (done before a resume) reported."""
    for i, chunk in enumerate(spans):
        if i < first:
            if text_progress is not None:
                text_progress(chunk[1].size_bytes)
            continue
        if text_progress is not None:
            sizes.append(chunk[1].size_bytes)
        yield chunk


def store_fingerprint(source_fingerprint: str, tokenizer_hash: str) -> str:
    """sha256 of the sources' content fingerprint and the tokenizer hash."""
    return hashlib.sha256(f"{source_fingerprint}:{tokenizer_hash}".encode()).hexdigest()


def _save_state(path: Path, job: str, next_chunk: int, writers: dict[str, _SplitWriter]) -> None:
    """Tails, then the state naming them and the shards before, then old tails gone (via `io`)."""
    for w in writers.values():
        w.save_tail()
    splits = {s: w.deferred_state() for s, w in writers.items()}
    next(iter(writers.values())).io(_write_state, path, job, next_chunk, splits)
    for w in writers.values():
        w.drop_old_tails()


def _write_state(
    path: Path, job: str, next_chunk: int, splits: dict[str, Callable[[], dict[str, Any]]]
) -> None:
    atomic_write_json(
        path, {"job": job, "next_chunk": next_chunk, "splits": {s: b() for s, b in splits.items()}}
    )


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
                w2.__init__(w2.out, w2.split, w2.shard_tokens, w2.dtype, w2.io)  # type: ignore[misc]
            return 0
    return int(state["next_chunk"])
