"""Per-request sampling: greedy at temperature 0, else temperature + top-k with the request's own generator.

Each request draws from its own `torch.Generator` seeded from its seed, so the tokens it gets do not
depend on which other requests share its batch (batched and unbatched generation agree). Sampling is by
inverse CDF on float64 NumPy rows — one uniform draw per token from the request's generator — which
costs microseconds per row where `torch.multinomial` (with its input checks) cost ~0.2 ms; at batch 32
that was a third of a decode step.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class SamplingParams:
    """What a generate request asks for. `seed=None` with temperature > 0 draws a random seed."""

    max_tokens: int = 32
    temperature: float = 1.0
    top_k: int | None = None
    seed: int | None = None

    @property
    def deterministic(self) -> bool:
        """Same request ⇒ same tokens: greedy, or a fixed seed."""
        return self.temperature == 0 or self.seed is not None

    def generator(self) -> torch.Generator:
        seed = self.seed if self.seed is not None else secrets.randbits(63)
        return torch.Generator(device="cpu").manual_seed(int(seed))


def _sample_row(row: np.ndarray, params: SamplingParams, generator: torch.Generator) -> int:
    if params.temperature == 0:
        return int(np.argmax(row))
    scaled = row / params.temperature
    if params.top_k is not None and params.top_k < scaled.size:
        kth = np.partition(scaled, -params.top_k)[-params.top_k]
        scaled = np.where(scaled < kth, -np.inf, scaled)
    cdf = np.cumsum(np.exp(scaled - scaled.max()))
    u = float(torch.rand((), generator=generator, dtype=torch.float64)) * cdf[-1]
    return min(int(np.searchsorted(cdf, u, side="right")), scaled.size - 1)


def sample_tokens(
    logits: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator]
) -> list[int]:
    """One token id per row of (B, V) logits, row b with params[b] and generators[b]."""
    rows = logits.detach().to("cpu", torch.float64).numpy()
    return [_sample_row(rows[b], params[b], generators[b]) for b in range(rows.shape[0])]


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """One token id from a (V,) row of logits."""
    return sample_tokens(logits[None], [params], [generator])[0]
