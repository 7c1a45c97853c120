"""Model families by name: the built-in `gpt2` and `llama`, `hf:MODEL_TYPE` (transformers, `models/hf.py`)
and `python:pkg.module:build` user factories.

Adding a built-in family is one file (the model) plus one line in `FAMILIES` (and its counts formula in
`models/flops.py`); a user family needs no change here at all.
"""

from __future__ import annotations

import importlib

import torch
from torch import nn

from scalelab.errors import SpecError
from scalelab.models.flops import Counts, ModelShape, attention_flops_per_token
from scalelab.models.gpt import GPT
from scalelab.models.hf import PREFIX as HF_PREFIX
from scalelab.models.hf import HFCausalLM
from scalelab.models.llama import Llama
from scalelab.models.protocol import CausalLM, Factory
from scalelab.spec import ModelSpec

FAMILIES: dict[str, Factory] = {"gpt2": GPT, "llama": Llama}
PYTHON_PREFIX = "python:"


def factory(family: str) -> Factory:
    """The factory of `family`: a built-in name or `python:pkg.module:attr` (imported here)."""
    if family in FAMILIES:
        return FAMILIES[family]
    if family.startswith(HF_PREFIX):
        return HFCausalLM
    if not family.startswith(PYTHON_PREFIX):
        raise SpecError(f"model.family: unknown family {family!r} (built-in: {', '.join(FAMILIES)})")
    module_name, _, attr = family.removeprefix(PYTHON_PREFIX).rpartition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise SpecError(
            f"model.family: cannot import {module_name!r} ({err}); is its directory on PYTHONPATH?"
        ) from None
    build = getattr(module, attr, None)
    if not callable(build):
        raise SpecError(f"model.family: {module_name!r} has no callable {attr!r}")
    return build  # type: ignore[no-any-return]


def build(shape: ModelShape) -> nn.Module:
    """The model of `shape` (torch's default init; `apply_parametrization` sets the real one)."""
    model = factory(shape.family)(shape)
    missing = [
        a for a in ("shape", "embedding", "blocks", "head", "output_multiplier") if not hasattr(model, a)
    ]
    if missing or not isinstance(model, CausalLM):
        raise SpecError(
            f"model.family: {shape.family!r} built a {type(model).__name__} without "
            f"{', '.join(missing) or 'forward'} (see scalelab.models.protocol)"
        )
    return model


def build_model(model_spec: ModelSpec, vocab_size: int | None = None) -> nn.Module:
    """The model of this spec; `vocab_size` (the tokenizer's) is used unless the spec fixes one."""
    return build(ModelShape.from_spec(model_spec, vocab_size))


def counts(shape: ModelShape) -> Counts:
    """Counts of a family without a formula, from the model it builds (on the meta device: no memory).

    Embedding parameters: every `nn.Embedding` plus an untied readout; forward FLOPs: two per weight of
    every matrix in the blocks, the readout, and attention over the full context (as `flops.py` states).
    """
    with torch.device("meta"):
        model = build(shape)
    embedding = sum(p.numel() for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters())
    tied = model.head.weight is model.embedding.weight
    readout = 0 if tied else model.head.weight.numel()
    total = sum(p.numel() for p in model.parameters())
    block_matmul = sum(p.numel() for p in model.blocks.parameters() if p.ndim >= 2)
    return Counts(
        non_embedding_params=total - embedding - readout,
        embedding_params=embedding + readout,
        forward_flops_per_token=2 * block_matmul
        + 2 * model.head.weight.numel()
        + attention_flops_per_token(shape),
    )
