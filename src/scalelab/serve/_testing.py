"""A tiny trained run for tests and benchmarks — real text (the standard library's `email` package
sources), real training through `run_training`, a few seconds on one core — and a real server process
on loopback to talk to.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from scalelab.spec import RunSpec


def tiny_corpus(root: Path) -> Path:
    """~30 real text files copied into `root/corpus` (small, and present on every Python install)."""
    corpus = root / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    src = Path(json.__file__).parent.parent / "email"
    for i, f in enumerate(sorted(src.glob("*.py"))):
        (corpus / f"doc{i}.txt").write_text(f.read_text())
    return corpus


def tiny_spec(corpus: Path, **overrides: Any) -> RunSpec:
    """A byte-level GPT small enough to train in seconds (override with dotted keys: {"model.width": 64})."""
    data: dict[str, Any] = {
        "model": {"n_heads": 4, "width": 32, "depth": 2, "context_tokens": 64},
        "data": {
            "sources": [{"kind": "text", "path": str(corpus)}],
            "heldout_fraction": 0.2,
            "shard_tokens": 8192,
        },
        "train": {
            "tokens": 8 * 64 * 40,
            "global_batch_size": 8,
            "lr": 1e-2,
            "eval_interval_steps": 1000,
            "eval_tokens": 2048,
            "checkpoint_interval_steps": 1000,
            "threads": 1,
            "device": "cpu",
        },
    }
    for key, value in overrides.items():
        node = data
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return RunSpec.model_validate(data)


def train_tiny_run(root: Path, **overrides: Any) -> Path:
    """Train `tiny_spec` into `root/run` (SCALELAB_CACHE_DIR should point into `root`); returns the run dir."""
    from scalelab.train.run import run_training

    corpus = tiny_corpus(root)
    out = root / "run"
    record = run_training(tiny_spec(corpus, **overrides), out, resume=False)
    if record["status"] != "done":
        raise RuntimeError(f"tiny run failed: {record['error']}")
    return out


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def serve_process(
    run_dir: Path, *args: str, timeout: float = 60.0
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """`python -m scalelab.serve serve RUN_DIR --port P ARGS…` as a real process on 127.0.0.1; yields
    (base URL, process) once /health answers, and terminates it on exit."""
    import httpx

    port = free_port()
    cmd = [sys.executable, "-m", "scalelab.serve", "serve", str(run_dir), "--host", "127.0.0.1"]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.Popen(
        [*cmd, "--port", str(port), *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                err = proc.stderr.read().decode() if proc.stderr else ""
                raise RuntimeError(f"server exited with {proc.returncode}: {err}")
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server did not answer /health within {timeout:g} s")
            time.sleep(0.1)
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
