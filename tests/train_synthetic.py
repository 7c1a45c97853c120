"""A tiny in-memory token store and loader with the data/ contract (for the train/ and model/ tests).

`SyntheticStore` has `vocab_size`, `eod_id`, `fingerprint`, `tokenizer_name`, `tokenizer_hash`,
`num_tokens(split)` and `path`; `SyntheticLoader` yields LongTensor (B, block_tokens) batches forever and
resumes exactly from `state_dict()`. The tokens follow a seeded first-order Markov chain with a few likely
successors per token, so a small model's loss visibly falls within tens of steps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch


class SyntheticStore:
    def __init__(self, vocab_size: int = 64, tokens: int = 50_000, seed: int = 0) -> None:
        self.vocab_size = vocab_size
        self.eod_id = vocab_size - 1
        self.fingerprint = f"synthetic-{vocab_size}-{tokens}-{seed}"
        self.tokenizer_name = "synthetic"
        self.tokenizer_hash = "synthetic"
        self.path = Path("/nonexistent/synthetic-store")
        rng = np.random.default_rng(seed)
        successors = rng.integers(0, vocab_size, size=(vocab_size, 3))
        seq = np.empty(tokens, dtype=np.int64)
        seq[0] = 0
        choices = rng.integers(0, 3, size=tokens)
        for i in range(1, tokens):
            seq[i] = successors[seq[i - 1], choices[i]]
        cut = int(tokens * 0.9)
        self.splits = {"train": seq[:cut], "heldout": seq[cut:]}

    def num_tokens(self, split: str) -> int:
        return int(self.splits[split].size)


class SyntheticLoader:
    def __init__(
        self,
        store: SyntheticStore,
        split: str = "train",
        block_tokens: int = 33,
        global_batch_size: int = 4,
        seed: int = 0,
        **_: Any,
    ) -> None:
        self.tokens = store.splits[split]
        self.block_tokens = block_tokens
        self.batch_size = global_batch_size
        self.seed = seed
        self.batches_done = 0

    def __iter__(self):
        while True:
            rng = np.random.default_rng([self.seed, self.batches_done])
            starts = rng.integers(0, self.tokens.size - self.block_tokens, size=self.batch_size)
            batch = np.stack([self.tokens[s : s + self.block_tokens] for s in starts])
            self.batches_done += 1
            yield torch.from_numpy(batch)

    def state_dict(self) -> dict[str, Any]:
        return {"batches_done": self.batches_done}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batches_done = int(state["batches_done"])


def synthetic_factory(store: Any, split: str, block_tokens: int, global_batch_size: int, seed: int):
    return SyntheticLoader(store, split, block_tokens, global_batch_size, seed)


def tiny_run_spec(steps: int, train: dict[str, Any] | None = None, **sections: Any) -> Any:
    """A RunSpec of a 1-block width-32 model trained `steps` steps of 4 × 32 tokens on one thread (no
    evals or checkpoints on the way); `train` overrides [train] keys, `sections` adds other sections."""
    from scalelab.spec import RunSpec

    t = {
        "tokens": 32 * 4 * steps,
        "global_batch_size": 4,
        "threads": 1,
        "eval_interval_steps": 1000,
        "eval_tokens": 128,
        "checkpoint_interval_steps": 1000,
        "lr": 1e-2,
        **(train or {}),
    }
    model = {"width": 32, "depth": 1, "n_heads": 4, "context_tokens": 32}
    return RunSpec.model_validate({"model": model, "train": t, **sections})
