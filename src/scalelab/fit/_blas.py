"""Pin BLAS to one thread while many small fits run (OpenBLAS threads make L-BFGS-B ~6x slower here).

Uses threadpoolctl when it is installed; otherwise calls OpenBLAS's own ``*_set_num_threads`` on the
OpenBLAS libraries already loaded into this process (found in /proc/self/maps), and does nothing where
neither works.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

_NAMES = (
    ("scipy_openblas_set_num_threads64_", "scipy_openblas_get_num_threads64_"),
    ("scipy_openblas_set_num_threads", "scipy_openblas_get_num_threads"),
    ("openblas_set_num_threads64_", "openblas_get_num_threads64_"),
    ("openblas_set_num_threads", "openblas_get_num_threads"),
)


def _openblas_handles() -> list[tuple[object, object]]:
    maps = Path("/proc/self/maps")
    if not maps.is_file():
        return []
    paths = []
    for line in maps.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 6 and "openblas" in parts[-1].lower() and ".so" in parts[-1]:
            if parts[-1] not in paths:
                paths.append(parts[-1])
    out = []
    for p in paths:
        try:
            lib = ctypes.CDLL(p)
        except OSError:
            continue
        for set_name, get_name in _NAMES:
            if hasattr(lib, set_name) and hasattr(lib, get_name):
                out.append((getattr(lib, set_name), getattr(lib, get_name)))
                break
    return out


@contextlib.contextmanager
def one_blas_thread() -> Iterator[None]:
    """Context manager: BLAS uses one thread inside, the previous setting is restored after."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        threadpool_limits = None
    if threadpool_limits is not None:
        with threadpool_limits(limits=1, user_api="blas"):
            yield
        return
    handles = _openblas_handles()
    old = []
    for set_fn, get_fn in handles:
        try:
            old.append((set_fn, int(get_fn())))  # type: ignore[operator]
            set_fn(1)  # type: ignore[operator]
        except Exception:  # pragma: no cover - exotic builds
            log.debug("could not set OpenBLAS threads", exc_info=True)
    try:
        yield
    finally:
        for set_fn, n in old:
            set_fn(n)  # type: ignore[operator]


def pin_process_to_one_thread() -> None:
    """For worker processes: enter `one_blas_thread` for the rest of the process's life."""
    cm = one_blas_thread()
    cm.__enter__()
    global _KEEP
    _KEEP = cm


_KEEP: object = None
