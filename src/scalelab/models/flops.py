"""Parameter counts and training FLOPs of the GPT family in `models/gpt.py` — the one place they are stated.

Architecture counted here (pre-LayerNorm, no biases, LayerNorm with weight only):
  token embedding V·d, learned position embedding T·d,
  per block: attention qkv 3d² + output d², MLP d·h + h·d with h = round(mlp_ratio·d), two norms 2d,
  final norm d, output layer V·d (shared with the token embedding when tied).

Counts:
  non-embedding N = L·(4d² + 2dh + 2d) + d              (Kaplan et al. 2020: embeddings excluded)
  total N         = non-embedding + V·d + T·d (+ V·d untied)

Training FLOPs per token (forward + backward = 3 × forward; a multiply-add is 2 FLOPs):
  forward = 2·(L·(4d² + 2dh)) + 2·V·d + 4·L·T·d
  i.e. every weight matmul in the blocks, the output layer (always a matmul, tied or not), and attention
  scores QKᵀ plus the weighted sum A·V over the full context T (what a dense kernel computes; causal
  skipping would halve the attention term). Norms, softmax and embedding lookups are ignored (< 1 %).
  training_flops_per_token = 3 · forward, and a run's compute C = training_flops_per_token · D.
The common approximation C ≈ 6·N·D is available as `six_nd` for comparison with published work.
"""

from __future__ import annotations

from dataclasses import dataclass

from scalelab.spec import ModelSpec


@dataclass(frozen=True)
class ModelShape:
    """The numbers that determine a model's size and cost."""

    width: int
    depth: int
    n_heads: int
    context_tokens: int
    vocab_size: int
    mlp_hidden: int
    tie_embeddings: bool = True

    @classmethod
    def from_spec(cls, spec: ModelSpec, vocab_size: int | None = None) -> ModelShape:
        vocab = spec.vocab_size or vocab_size
        if vocab is None:
            raise ValueError("vocab_size is needed: set model.vocab_size or pass the tokenizer's")
        return cls(
            width=spec.width,
            depth=spec.depth,
            n_heads=spec.n_heads,
            context_tokens=spec.context_tokens,
            vocab_size=int(vocab),
            mlp_hidden=mlp_hidden(spec.width, spec.mlp_ratio),
            tie_embeddings=spec.tie_embeddings,
        )

    @property
    def block_matmul_params(self) -> int:
        d, h = self.width, self.mlp_hidden
        return self.depth * (4 * d * d + 2 * d * h)

    @property
    def non_embedding_params(self) -> int:
        d = self.width
        return self.block_matmul_params + self.depth * 2 * d + d

    @property
    def embedding_params(self) -> int:
        d = self.width
        emb = self.vocab_size * d + self.context_tokens * d
        if not self.tie_embeddings:
            emb += self.vocab_size * d
        return emb

    @property
    def total_params(self) -> int:
        return self.non_embedding_params + self.embedding_params

    @property
    def forward_flops_per_token(self) -> int:
        d, L, T, V = self.width, self.depth, self.context_tokens, self.vocab_size
        return 2 * self.block_matmul_params + 2 * V * d + 4 * L * T * d

    @property
    def training_flops_per_token(self) -> int:
        return 3 * self.forward_flops_per_token

    def training_flops(self, tokens: int | float) -> float:
        """Compute C of training on `tokens` tokens (see the module docstring for the formula)."""
        return float(self.training_flops_per_token) * float(tokens)

    def tokens_for_flops(self, flops: float) -> float:
        """Inverse of `training_flops`: the token budget D that spends `flops` on this shape."""
        return float(flops) / float(self.training_flops_per_token)


def mlp_hidden(width: int, mlp_ratio: float) -> int:
    """MLP hidden width: round(mlp_ratio · width), at least 1."""
    return max(1, int(round(mlp_ratio * width)))


def six_nd(n_params: float, tokens: float) -> float:
    """The usual C ≈ 6·N·D approximation (for comparison with published fits)."""
    return 6.0 * float(n_params) * float(tokens)
