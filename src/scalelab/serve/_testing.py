"""A tiny trained run for tests and benchmarks: real text (the standard library's `email` package
sources), real training through `run_training`, a few seconds on one core.
"""

from __future__ import annotations

import json
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
