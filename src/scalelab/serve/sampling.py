"""Per-request sampling: greedy at temperature 0, else temperature + top-k with the request's own generator.

Each request draws from its own `torch.Generator` seeded from its seed, so the tokens it gets do not
depend on which other requests share its batch (batched and unbatched generation agree).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

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


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """One token id from a (V,) row of logits."""
    logits = logits.detach().to("cpu", torch.float64)
    if params.temperature == 0:
        return int(torch.argmax(logits))
    scaled = logits / params.temperature
    if params.top_k is not None and params.top_k < scaled.numel():
        kth = torch.topk(scaled, params.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))
