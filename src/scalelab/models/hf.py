"""Hugging Face `transformers` causal LMs as a family: `model.family = "hf:llama"` (or "hf:gpt2",
"hf:mistral", … any `model_type` whose config takes the standard size names), built from a config of the
spec's shape and trained by the same trainer. Needs the `hf` extra.

The wrapper follows `models/protocol.py`: `embedding` / `head` are the model's input and output
embeddings, `blocks` its list of decoder layers. It has none of the optional μP hooks (attention scale,
residual multiplier), so μP here sets init scales, learning-rate groups and the readout multiplier only.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from scalelab.errors import ScalelabError
from scalelab.models.flops import ModelShape

PREFIX = "hf:"


def hf_config(shape: ModelShape, **overrides: Any) -> Any:
    """A transformers config of `shape` for the `model_type` after "hf:" (standard size names only);
    `overrides` are further config fields (export sets norms, RoPE and token ids this way)."""
    try:
        from transformers import AutoConfig
    except ImportError:
        raise ScalelabError("model.family 'hf:…' needs transformers: pip install 'scalelab[hf]'") from None
    model_type = shape.family.removeprefix(PREFIX)
    sizes: dict[str, Any] = {
        "vocab_size": shape.vocab_size,
        "hidden_size": shape.width,
        "num_hidden_layers": shape.depth,
        "num_attention_heads": shape.n_heads,
        "max_position_embeddings": shape.context_tokens,
        "tie_word_embeddings": shape.tie_embeddings,
        "bos_token_id": None,
        "eos_token_id": None,
    }
    if model_type == "gpt2":  # GPT-2's own names; no grouped-query attention
        sizes["n_inner"] = shape.mlp_hidden
    else:
        sizes |= {"intermediate_size": shape.mlp_hidden, "num_key_value_heads": shape.kv_heads}
    try:
        return AutoConfig.for_model(model_type, **(sizes | overrides))
    except ValueError as err:
        raise ScalelabError(f"model.family: {shape.family!r}: {err}") from None


class HFCausalLM(nn.Module):
    """A transformers causal LM behind scalelab's model protocol."""

    def __init__(self, shape: ModelShape) -> None:
        super().__init__()
        from transformers import AutoModelForCausalLM

        self.shape = shape
        self.hf = AutoModelForCausalLM.from_config(hf_config(shape), attn_implementation="sdpa")
        lists = [m for m in self.hf.modules() if isinstance(m, nn.ModuleList) and len(m) == shape.depth]
        if not lists:
            raise ScalelabError(f"model.family: {shape.family!r}: no list of {shape.depth} decoder layers")
        self.blocks = lists[0]
        self.head = self.hf.get_output_embeddings()
        self.output_multiplier = 1.0

    @property
    def embedding(self) -> nn.Embedding:
        return self.hf.get_input_embeddings()  # type: ignore[no-any-return]

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        logits = self.hf(input_ids=idx, use_cache=False).logits * self.output_multiplier
        if targets is None:
            return logits  # type: ignore[no-any-return]
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
