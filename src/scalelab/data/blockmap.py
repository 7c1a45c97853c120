"""A split's shard files mapped side by side into one reserved address range, seen as one 2-D array of
blocks, so the loader gathers a whole batch with one ``np.take`` instead of a Python loop over rows.

Each shard is mapped read-only and shared (the page cache, as ``numpy.memmap`` does) at an offset that
is a multiple of both the page size and a block's bytes, so every block of every shard is a row of a
single strided array; the gaps between shards are reserved but inaccessible (``PROT_NONE``) and are
never indexed. Blocks never cross a shard's end, so no row reads past a file. Linux only (``MAP_FIXED``
through libc); `BlockMap.create` returns None elsewhere and the loader falls back to a row loop.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import mmap
import os
import platform
import sys
import weakref
from pathlib import Path

import numpy as np

_PROT_NONE = 0
_MAP_FIXED = 0x10  # the same value on every Linux architecture allowed below
_MAP_NORESERVE = 0x4000
_MAP_FAILED = ctypes.c_void_p(-1).value
_ARCHES = {"x86_64", "amd64", "aarch64", "arm64"}


def _libc() -> ctypes.CDLL | None:
    if sys.platform != "linux" or platform.machine().lower() not in _ARCHES:
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_long,
    ]
    libc.munmap.restype = ctypes.c_int
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    return libc


_LIBC = _libc()


def _munmap(owner: int, addr: int, length: int) -> None:
    if _LIBC is not None and os.getpid() == owner:  # a forked child's copy goes with its process
        _LIBC.munmap(addr, length)


class BlockMap:
    """``rows``: a read-only ``(rows, block_tokens)`` array over every shard of a split; block `b` of
    shard `s` is row ``first_row[s] + b``. The mapping lives as long as any view of ``rows``."""

    def __init__(self, rows: np.ndarray, first_row: np.ndarray) -> None:
        self.rows = rows
        self.first_row = first_row

    @classmethod
    def create(
        cls, files: list[Path], tokens: list[int], dtype: np.dtype, block_tokens: int
    ) -> BlockMap | None:
        """Map `files` (holding `tokens` ids of `dtype` each); None where this platform cannot."""
        if _LIBC is None:
            return None
        dtype = np.dtype(dtype)
        row_bytes = block_tokens * dtype.itemsize
        align = math.lcm(mmap.PAGESIZE, row_bytes)
        sizes = [t * dtype.itemsize for t in tokens]
        spans = [max(1, math.ceil(s / align)) * align for s in sizes]
        total = sum(spans)
        base = _LIBC.mmap(
            None, total, _PROT_NONE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE, -1, 0
        )
        if base in (None, _MAP_FAILED):
            return None
        first_row = np.zeros(len(files), dtype=np.int64)
        offset = 0
        try:
            for i, (file, size, span) in enumerate(zip(files, sizes, spans, strict=True)):
                first_row[i] = offset // row_bytes
                if size:
                    fd = os.open(file, os.O_RDONLY)
                    try:
                        got = _LIBC.mmap(
                            base + offset, size, mmap.PROT_READ, mmap.MAP_SHARED | _MAP_FIXED, fd, 0
                        )
                    finally:
                        os.close(fd)
                    if got != base + offset:
                        err = ctypes.get_errno()
                        raise OSError(err, f"{file}: mmap failed ({os.strerror(err)})")
                offset += span
        except BaseException:
            _munmap(os.getpid(), base, total)
            raise
        buffer = (ctypes.c_char * total).from_address(base)
        # The buffer owns the mapping: numpy keeps it as the base of every view of `rows`.
        unmap = weakref.finalize(buffer, _munmap, os.getpid(), base, total)
        unmap.atexit = False  # a daemon prefetch thread may still read it at exit; the OS unmaps then
        buffer._unmap = unmap  # type: ignore[attr-defined]
        flat = np.frombuffer(buffer, dtype=dtype.newbyteorder("<"))
        rows = np.lib.stride_tricks.as_strided(
            flat,
            shape=(total // row_bytes, block_tokens),
            strides=(row_bytes, dtype.itemsize),
            writeable=False,
        )
        return cls(rows, first_row)

    def gather(self, row_ids: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Rows `row_ids` into `out` (any integer dtype wide enough): one C call, two when widening."""
        if out.dtype == self.rows.dtype and out.flags.c_contiguous:
            np.take(self.rows, row_ids, axis=0, out=out, mode="clip")  # ids are in range: no buffering
        else:
            out[...] = np.take(self.rows, row_ids, axis=0, mode="clip")
        return out
