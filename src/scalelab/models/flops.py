"""Parameter counts and training FLOPs of the built-in families — the one place they are stated.

`ModelShape` counts by its `family`: `gpt2` (`models/gpt.py`) and `llama` (`models/llama.py`) below; a
user family (`python:pkg.module:build`) is counted by `models.registry.counts` from the model it builds.

gpt2 (below); llama: no position embedding, attention q/o d² each and k/v d·d_kv each (d_kv = kv_heads ·
d/heads), SwiGLU MLP 3·d·h, two RMSNorms 2d (+ 2·d/heads with QK-norm), final norm d:
  non-embedding N = L·(2d² + 2d·d_kv + 3dh + 2d [+ 2d/heads]) + d,   embedding = V·d (+ V·d untied)
  forward = 2·L·(2d² + 2d·d_kv + 3dh) + 2·V·d + 4·L·T·d   (attention over every query head, as for gpt2)

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

from dataclasses import dataclass, replace

from scalelab.spec import ModelSpec


@dataclass(frozen=True)
class Counts:
    """What a family states about a shape: parameters (split as Kaplan et al. do) and forward FLOPs."""

    non_embedding_params: int
    embedding_params: int
    forward_flops_per_token: int


@dataclass(frozen=True)
class ModelShape:
    """The numbers that determine a model's size and cost (and which family's architecture it is)."""

    width: int
    depth: int
    n_heads: int
    context_tokens: int
    vocab_size: int
    mlp_hidden: int
    tie_embeddings: bool = True
    family: str = "gpt2"
    n_kv_heads: int | None = None  # None: n_heads (no grouped-query attention)
    qk_norm: bool = False

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def d_head(self) -> int:
        return self.width // self.n_heads

    def with_width(self, width: int) -> ModelShape:
        """The same shape at another width (heads fixed, MLP hidden width scaled with it)."""
        hidden = max(1, round(self.mlp_hidden * width / self.width))
        return replace(self, width=width, mlp_hidden=hidden)

    @property
    def counts(self) -> Counts:
        formula = FORMULAS.get(self.family)
        if formula is not None:
            return formula(self)
        from scalelab.models.registry import counts  # user family: counted from the model it builds

        return counts(self)

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
            family=spec.family,
            n_kv_heads=spec.n_kv_heads,
            qk_norm=spec.qk_norm,
        )

    @property
    def block_matmul_params(self) -> int:
        """Weights of the blocks' matrix multiplies (each used once per token)."""
        d, h, L = self.width, self.mlp_hidden, self.depth
        if self.family == "llama":
            return L * (2 * d * d + 2 * d * self.kv_heads * self.d_head + 3 * d * h)
        return L * (4 * d * d + 2 * d * h)

    @property
    def non_embedding_params(self) -> int:
        return self.counts.non_embedding_params

    @property
    def embedding_params(self) -> int:
        return self.counts.embedding_params

    @property
    def total_params(self) -> int:
        return self.non_embedding_params + self.embedding_params

    @property
    def forward_flops_per_token(self) -> int:
        return self.counts.forward_flops_per_token

    @property
    def training_flops_per_token(self) -> int:
        return 3 * self.forward_flops_per_token

    def training_flops(self, tokens: int | float) -> float:
        """Compute C of training on `tokens` tokens (see the module docstring for the formula)."""
        return float(self.training_flops_per_token) * float(tokens)

    def tokens_for_flops(self, flops: float) -> float:
        """Inverse of `training_flops`: the token budget D that spends `flops` on this shape."""
        return float(flops) / float(self.training_flops_per_token)


def attention_flops_per_token(shape: ModelShape) -> int:
    """QKᵀ and A·V over the full context for every query head, every layer (what a dense kernel does)."""
    return 4 * shape.depth * shape.context_tokens * shape.width


def _gpt2(shape: ModelShape) -> Counts:
    d, V = shape.width, shape.vocab_size
    readout = V * d if not shape.tie_embeddings else 0
    return Counts(
        non_embedding_params=shape.block_matmul_params + shape.depth * 2 * d + d,
        embedding_params=V * d + shape.context_tokens * d + readout,
        forward_flops_per_token=2 * shape.block_matmul_params + 2 * V * d + attention_flops_per_token(shape),
    )


def _llama(shape: ModelShape) -> Counts:
    d, V = shape.width, shape.vocab_size
    norms = 2 * d + (2 * shape.d_head if shape.qk_norm else 0)
    return Counts(
        non_embedding_params=shape.block_matmul_params + shape.depth * norms + d,
        embedding_params=V * d * (1 if shape.tie_embeddings else 2),
        forward_flops_per_token=2 * shape.block_matmul_params + 2 * V * d + attention_flops_per_token(shape),
    )


#: the built-in families' counts, stated as formulas (no model is built to count them).
FORMULAS = {"gpt2": _gpt2, "llama": _llama}


def mlp_hidden(width: int, mlp_ratio: float) -> int:
    """MLP hidden width: round(mlp_ratio · width), at least 1."""
    return max(1, int(round(mlp_ratio * width)))


def six_nd(n_params: float, tokens: float) -> float:
    """The usual C ≈ 6·N·D approximation (for comparison with published fits)."""
    return 6.0 * float(n_params) * float(tokens)
