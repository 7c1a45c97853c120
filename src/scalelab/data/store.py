"""Opening token stores, verifying them, and the content-keyed cache (`ensure_store`).

`ensure_store(data_spec)` returns the store for a spec's sources and tokenizer, building it once:
the cache key is a hash of the sources' content fingerprints, the tokenizer hash and the split/shard
settings, so the same data always maps to the same store and changed data never reuses a stale one.
Concurrent builders of the same store serialise on a lock file (``fcntl.flock``); the second one
waits and then opens what the first built.

Shard reads are checked: the first time a process opens a shard it re-hashes the file and compares
against the index (`ShardChecksumError` on mismatch). Verified shards are remembered per process,
keyed by the file's identity (device, inode, size, mtime), so later opens are free. `block_map`
(the loader's one-gather view of a whole split) verifies every shard of the split the same way before
it maps them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from scalelab.data.blockmap import BlockMap
from scalelab.data.corpus import Source, sources_from_spec
from scalelab.data.ingest import ingest
from scalelab.data.shards import (
    INDEX_NAME,
    SPLITS,
    TOKENIZER_FILE,
    ShardInfo,
    atomic_write_bytes,
    read_index,
    sha256_file,
    shards_of,
)
from scalelab.data.tokenize import BPETokenizer, ByteTokenizer, Tokenizer, train_bpe
from scalelab.errors import DataError, ShardChecksumError
from scalelab.io import file_lock

if TYPE_CHECKING:
    from scalelab.spec import DataSpec

log = logging.getLogger(__name__)

BPE_TRAIN_MAX_BYTES = 256 << 20  # BPE merges settle long before this; bounds time and memory
_verified: set[tuple[Any, ...]] = set()
_verify_lock = threading.Lock()


def _renew_verify_lock() -> None:
    """In a forked child (loader workers): a parent thread may have held the lock at fork time."""
    global _verify_lock
    _verify_lock = threading.Lock()


os.register_at_fork(after_in_child=_renew_verify_lock)


def default_cache_dir() -> Path:
    """$SCALELAB_CACHE_DIR, else ~/.cache/scalelab."""
    env = os.environ.get("SCALELAB_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "scalelab"


def _file_identity(path: Path) -> tuple[Any, ...]:
    st = path.stat()
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class TokenStore:
    """A complete token store on disk (see `scalelab.data.shards` for the format)."""

    def __init__(self, path: Path, index: dict[str, Any]) -> None:
        self.path = Path(path)
        self.index = index
        tok = index["tokenizer"]
        self.tokenizer_name: str = tok["name"]
        self.tokenizer_hash: str = tok["hash"]
        self.vocab_size: int = int(tok["vocab_size"])
        self.eod_id: int = int(tok["eod_id"])
        self.dtype = np.dtype(index["dtype"])
        self.fingerprint: str = index["fingerprint"]
        self.source_fingerprint: str = index["source_fingerprint"]
        self.heldout_fraction: float = index["heldout_fraction"]
        self.shard_tokens: int = index["shard_tokens"]
        self._maps: dict[str, np.memmap] = {}
        self._block_maps: dict[tuple[str, int], BlockMap | None] = {}
        self._tokenizer: Tokenizer | None = None

    @classmethod
    def open(cls, path: str | Path) -> TokenStore:
        """Open a complete store; `DataError` when `path` holds none (or an unsupported version)."""
        path = Path(path)
        index = read_index(path)
        try:
            return cls(path, index)
        except (KeyError, TypeError, ValueError) as err:
            raise DataError(f"{path / INDEX_NAME}: malformed index ({type(err).__name__}: {err})") from None

    # -- metadata
    def shards(self, split: str) -> list[ShardInfo]:
        return shards_of(self.index, split)

    def num_tokens(self, split: str) -> int:
        return sum(s.tokens for s in self.shards(split))

    def num_documents(self, split: str) -> int:
        return int(self.index["splits"][split]["documents"])

    @property
    def content_hash(self) -> str:
        """SHA-256 of ``index.json`` (which holds every shard's SHA-256): equal hash, equal store."""
        return hashlib.sha256((self.path / INDEX_NAME).read_bytes()).hexdigest()

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            if self.tokenizer_name == "byte":
                tok: Tokenizer = ByteTokenizer()
            elif self.tokenizer_name == "bpe":
                tok = BPETokenizer.load(self.path / TOKENIZER_FILE)
            else:
                raise DataError(f"{self.path}: unknown tokenizer '{self.tokenizer_name}' in the index")
            if tok.hash != self.tokenizer_hash:
                raise DataError(
                    f"{self.path}: {TOKENIZER_FILE} does not match the tokenizer hash in the index"
                )
            self._tokenizer = tok
        return self._tokenizer

    # -- shard access
    def shard_array(self, split: str, i: int) -> np.memmap:
        """Read-only memmap of shard `i` of `split`, checksum-verified on first open in this process."""
        key = f"{split}/{i}"
        mm = self._maps.get(key)
        if mm is None:
            info = self.shards(split)[i]
            file = self.path / info.file
            self.check_shard(info)
            mm = np.memmap(file, dtype=self.dtype.newbyteorder("<"), mode="r", shape=(info.tokens,))
            self._maps[key] = mm
        return mm

    def block_map(self, split: str, block_tokens: int) -> BlockMap | None:
        """Every shard of `split` as one ``(rows, block_tokens)`` array (`scalelab.data.blockmap`),
        each shard checksum-verified first as `shard_array` does; None where the platform cannot map
        it so (then read through `shard_array`). Made once per process and block size."""
        key = (split, block_tokens)
        if key not in self._block_maps:
            infos = self.shards(split)
            for info in infos:
                self.check_shard(info)
            try:
                made = BlockMap.create(
                    [self.path / i.file for i in infos], [i.tokens for i in infos], self.dtype, block_tokens
                )
            except OSError as err:
                raise DataError(f"{self.path}: cannot map split '{split}' ({err})") from None
            self._block_maps.setdefault(key, made)
        return self._block_maps[key]

    def check_shard(self, info: ShardInfo) -> None:
        """Verify one shard's size and SHA-256 unless already verified in this process."""
        file = self.path / info.file
        try:
            ident = _file_identity(file)
        except OSError as err:
            raise DataError(f"{file}: shard missing or unreadable ({err.strerror or err})") from None
        key = (*ident, info.sha256)
        with _verify_lock:
            if key in _verified:
                return
        expected_bytes = info.tokens * self.dtype.itemsize
        if ident[2] != expected_bytes:
            raise ShardChecksumError(
                f"{file}: shard has {ident[2]} bytes, the index says {expected_bytes}; the store is "
                "damaged — rebuild it (delete the directory and re-run)"
            )
        actual = sha256_file(file)
        if actual != info.sha256:
            raise ShardChecksumError(
                f"{file}: shard checksum mismatch: index sha256 {info.sha256}, file sha256 {actual}; "
                "the store is damaged — rebuild it (delete the directory and re-run)"
            )
        with _verify_lock:
            _verified.add(key)

    def verify(self) -> list[str]:
        """Re-hash every shard (ignoring the per-process cache); a list of problems, empty when sound."""
        problems: list[str] = []
        for split in SPLITS:
            for info in self.shards(split):
                file = self.path / info.file
                if not file.is_file():
                    problems.append(f"{file}: missing")
                    continue
                size = file.stat().st_size
                if size != info.tokens * self.dtype.itemsize:
                    problems.append(
                        f"{file}: {size} bytes, expected {info.tokens * self.dtype.itemsize} "
                        f"({info.tokens} tokens)"
                    )
                    continue
                actual = sha256_file(file)
                if actual != info.sha256:
                    problems.append(f"{file}: sha256 {actual} does not match the index ({info.sha256})")
        if self.tokenizer_name == "bpe":
            try:
                _ = self.tokenizer
            except DataError as err:
                problems.append(str(err))
        return problems

    def info(self) -> dict[str, Any]:
        """Summary for display: tokenizer, dtype, fingerprint, per-split documents/tokens/shards."""
        return {
            "path": str(self.path),
            "tokenizer": self.tokenizer_name,
            "tokenizer_hash": self.tokenizer_hash,
            "vocab_size": self.vocab_size,
            "eod_id": self.eod_id,
            "dtype": self.dtype.name,
            "fingerprint": self.fingerprint,
            "sources": self.index.get("sources", []),
            "splits": {
                s: {
                    "documents": self.num_documents(s),
                    "tokens": self.num_tokens(s),
                    "shards": len(self.shards(s)),
                    "bytes": self.num_tokens(s) * self.dtype.itemsize,
                }
                for s in SPLITS
            },
        }

    def __getstate__(self) -> dict[str, Any]:
        # memmaps are reopened lazily in the receiving process (DataLoader workers).
        return {"path": self.path, "index": self.index}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], state["index"])  # type: ignore[misc]

    def __repr__(self) -> str:
        return (
            f"TokenStore({str(self.path)!r}, tokenizer={self.tokenizer_name}, "
            f"train_tokens={self.num_tokens('train')}, heldout_tokens={self.num_tokens('heldout')})"
        )


# ------------------------------------------------------------------------------------------ cache
def _key(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def tokenizer_for(data_spec: DataSpec, sources: list[Source], cache_dir: Path) -> Tokenizer:
    """The spec's tokenizer: bytes, or a BPE trained on the sources once and cached by content."""
    if data_spec.tokenizer == "byte":
        return ByteTokenizer()
    key = _key(
        {
            "sources": [s.fingerprint() for s in sources],
            "vocab": data_spec.bpe_vocab_size,
            "max_bytes": BPE_TRAIN_MAX_BYTES,
            "v": 1,
        }
    )
    path = cache_dir / "tokenizers" / f"bpe-{key[:20]}.json"
    with file_lock(path.with_suffix(".lock")):
        if path.is_file():
            return BPETokenizer.load(path)
        tok = train_bpe(sources, data_spec.bpe_vocab_size, max_bytes=BPE_TRAIN_MAX_BYTES)
        atomic_write_bytes(path, tok.to_str().encode())
        return tok


def store_key(sources: list[Source], tokenizer: Tokenizer, heldout_fraction: float, shard_tokens: int) -> str:
    """Cache key of a store: content fingerprints + tokenizer hash + split/shard settings."""
    return _key(
        {
            "sources": [s.fingerprint() for s in sources],
            "tokenizer": tokenizer.hash,
            "heldout_fraction": heldout_fraction,
            "shard_tokens": shard_tokens,
            "v": 1,
        }
    )


def ensure_store(
    data_spec: DataSpec, cache_dir: Path | None = None, *, workers: int | None = None
) -> TokenStore:
    """Open the token store for `data_spec`, building it (once, atomically, under a lock) if needed.

    With ``data_spec.store`` set, that path is opened as is. Otherwise the store lives in
    ``<cache_dir>/stores/<key>`` (cache_dir default: $SCALELAB_CACHE_DIR or ~/.cache/scalelab).
    """
    if data_spec.store:
        store = TokenStore.open(data_spec.store)
        if store.tokenizer_name != data_spec.tokenizer:
            log.warning(
                "%s: store uses tokenizer '%s' but the spec says '%s'; using the store's",
                data_spec.store,
                store.tokenizer_name,
                data_spec.tokenizer,
            )
        return store
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    sources = sources_from_spec(data_spec)
    for s in sources:
        s.fingerprint(cache_dir=cache_dir)  # remembered by file stats: unchanged files are not re-read
    tokenizer = tokenizer_for(data_spec, sources, cache_dir)
    key = store_key(sources, tokenizer, data_spec.heldout_fraction, data_spec.shard_tokens)
    path = cache_dir / "stores" / key[:20]
    if (path / INDEX_NAME).is_file():
        return TokenStore.open(path)
    with file_lock(cache_dir / "stores" / f"{key[:20]}.lock"):
        if not (path / INDEX_NAME).is_file():  # another process may have built it while we waited
            # One process by default: byte tokenization is cheaper than shipping text to another
            # process, and BPE already uses all cores through the tokenizer's own threads.
            n = workers if workers is not None else 1
            log.info("building token store %s (%s tokenizer, %d workers)", path, tokenizer.name, n)
            ingest(
                sources,
                path,
                tokenizer,
                heldout_fraction=data_spec.heldout_fraction,
                shard_tokens=data_spec.shard_tokens,
                workers=n,
            )
    return TokenStore.open(path)
