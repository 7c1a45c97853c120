"""The on-disk token store format: shard files, the JSON index, checksums and atomic writes.

A store is a directory::

    index.json          written last: its presence means the store is complete
    tokenizer.json      only for BPE stores
    train-00000.bin …   raw little-endian uint16/uint32 token ids, readable with numpy.memmap
    heldout-00000.bin …

``index.json`` holds the format version, the tokenizer (name, hash, vocab size, EOD id), the dtype,
the source fingerprint(s), the split settings and, per split, the list of shards with file name,
token count and SHA-256. Nothing in it depends on time or on the machine, so two ingests of the same
sources with the same settings produce byte-identical stores.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from scalelab.errors import DataError
from scalelab.io import atomic_write_bytes, fsync_dir  # noqa: F401 - re-exported for data/ modules
from scalelab.io import sha256_file as io_sha256_file

FORMAT_NAME = "scalelab-token-store"
FORMAT_VERSION = 1
INDEX_NAME = "index.json"
TOKENIZER_FILE = "tokenizer.json"
SPLITS = ("train", "heldout")
_HASH_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class ShardInfo:
    """One shard file of a split."""

    file: str
    tokens: int
    sha256: str


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.bin"


# ---------------------------------------------------------------------------------- atomic writes
def atomic_write_json(path: Path, obj: Any) -> None:
    """Canonical (sorted, indented) JSON, written atomically."""
    text = json.dumps(obj, sort_keys=True, indent=1, ensure_ascii=False) + "\n"
    atomic_write_bytes(path, text.encode("utf-8"))


# --------------------------------------------------------------------------------------- hashing
def sha256_file(path: Path, chunk_bytes: int = _HASH_CHUNK_BYTES) -> str:
    """Streaming SHA-256 of a shard (`scalelab.io.sha256_file`); a read failure is a DataError naming it."""
    try:
        return io_sha256_file(path, chunk_bytes)
    except OSError as err:
        raise DataError(f"{path}: cannot read shard ({err.strerror or err})") from None


# ------------------------------------------------------------------------------------------ index
def read_index(store_dir: Path) -> dict[str, Any]:
    """Read and check ``index.json``; `DataError` when missing, unreadable or of another format."""
    path = Path(store_dir) / INDEX_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(
            f"{store_dir}: not a complete token store (no {INDEX_NAME}); build it with `scalelab data ingest`"
        ) from None
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror or err})") from None
    try:
        index = json.loads(text)
    except ValueError as err:
        raise DataError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT_NAME:
        raise DataError(f"{path}: not a scalelab token store index")
    if index.get("format_version") != FORMAT_VERSION:
        raise DataError(
            f"{path}: token store format version {index.get('format_version')} is not supported "
            f"(this scalelab reads version {FORMAT_VERSION}); rebuild the store"
        )
    for split in SPLITS:
        if split not in index.get("splits", {}):
            raise DataError(f"{path}: split '{split}' is missing from the index")
    return index


def shards_of(index: dict[str, Any], split: str) -> list[ShardInfo]:
    if split not in SPLITS:
        raise DataError(f"unknown split '{split}' (expected one of {', '.join(SPLITS)})")
    return [ShardInfo(**s) for s in index["splits"][split]["shards"]]


def shard_dicts(shards: list[ShardInfo]) -> list[dict[str, Any]]:
    return [asdict(s) for s in shards]
