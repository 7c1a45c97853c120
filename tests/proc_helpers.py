"""Helpers for tests that start processes: which of them are still running."""

from __future__ import annotations

import psutil


def worker_processes() -> set[int]:
    """PIDs of this process's descendants other than the long-lived forkserver and resource tracker."""
    out = set()
    for p in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(p.cmdline())
        except psutil.Error:
            continue
        if "forkserver" not in cmd and "resource_tracker" not in cmd:
            out.add(p.pid)
    return out
