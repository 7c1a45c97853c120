"""Process pools for the data layer's parallel passes (ingest, statistics).

Workers come from a *forkserver* with the data modules preloaded: the server is a fresh,
single-threaded process, so forking workers from it is safe (unlike forking a parent that runs
torch or tokenizer threads), and workers start in milliseconds because imports — including the
caller's ``__main__`` module — happen once in the server instead of once per worker (spawn).
As with any non-fork start method, a script that starts workers must guard its entry point with
``if __name__ == "__main__":``.
"""

from __future__ import annotations

import multiprocessing as mp
from multiprocessing.context import BaseContext

_PRELOAD = ["scalelab.data.ingest", "scalelab.data.stats"]


def worker_context() -> BaseContext:
    """The multiprocessing context data-layer pools use (forkserver where available, else spawn)."""
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(_PRELOAD)
        return ctx
    return mp.get_context("spawn")
