"""Atomic file writes: write to a temporary file beside the target, fsync, rename over it.

A crash at any moment leaves either the old file or the new one, never a half-written one; the file's
mode follows the user's umask (as `open` would give), not mkstemp's 0600.
Also the one streaming file hash (`sha256_file`) that shards and checkpoints are verified with, and the
one advisory lock (`file_lock`) for anything two processes can share.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from scalelab.errors import LockedError


def fsync_dir(path: str | Path) -> None:
    """Make a rename inside `path` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def current_umask() -> int:
    """The process's umask, read without changing it where /proc says it (Linux), else by setting and
    restoring it (briefly process-wide)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes | memoryview) -> None:
    atomic_write_parts(path, [data])


def atomic_write_parts(path: str | Path, parts: Iterable[bytes | memoryview]) -> None:
    """Write the parts one after another (no joined copy of them is made) to a temporary file beside
    `path`, fsync it and rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes 0600; files get the user's umask
        with os.fdopen(fd, "wb") as f:
            for part in parts:
                f.write(part)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any, *, indent: int | None = 2, allow_nan: bool = True) -> None:
    """Sorted-key JSON, written atomically; `allow_nan=False` refuses NaN/inf instead of writing invalid JSON."""
    text = json.dumps(obj, indent=indent, sort_keys=True, default=str, allow_nan=allow_nan)
    atomic_write_text(path, text + "\n")


def read_tail(path: str | Path, max_bytes: int) -> str:
    """The last `max_bytes` of a file as text ('' when it cannot be read) — for logs being written."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - max_bytes))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def sha256_file(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    """Streaming SHA-256 of a file (constant memory; hashlib releases the GIL on large chunks)."""
    h = hashlib.sha256()
    buf = bytearray(chunk_bytes)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


@contextlib.contextmanager
def file_lock(path: str | Path, *, wait: bool = True, what: str | None = None) -> Iterator[None]:
    """Exclusive advisory lock (`fcntl.flock` on `path`) held for the block; the holder's PID is written
    into the lock file. `wait=False` raises LockedError ("… already in use by PID n") instead of waiting.

    The kernel releases the lock when its holder exits, also on kill -9, so a stale lock file is never a
    problem; the file itself is left in place (deleting it would let two processes lock two files).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "unknown"
            raise LockedError(
                f"{what or path.parent}: already in use by PID {holder} (lock file {path}); wait for it to "
                "finish, or stop it"
            ) from None
        try:
            fh.seek(0)
            fh.truncate()
            fh.write(f"{os.getpid()}\n")
            fh.flush()
            yield
        finally:
            fh.truncate(0)  # no PID in the file of a lock nobody holds
            fh.flush()
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
