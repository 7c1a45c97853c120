"""Model families: gpt2, llama and a user factory are built, counted, parametrized and trained alike."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from scalelab.errors import SpecError
from scalelab.models.flops import ModelShape
from scalelab.models.parametrization import apply_parametrization, shape_classes
from scalelab.models.protocol import CausalLM
from scalelab.models.registry import build_model, counts
from scalelab.spec import ModelSpec

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
CUSTOM = "python:custom_model:build"


@pytest.fixture(autouse=True)
def _examples_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(EXAMPLES))


SPECS = {
    "gpt2": dict(family="gpt2"),
    "gpt2-untied": dict(family="gpt2", tie_embeddings=False),
    "llama": dict(family="llama", tie_embeddings=False),
    "llama-gqa-qknorm": dict(family="llama", n_kv_heads=2, qk_norm=True, tie_embeddings=False, mlp_ratio=2.5),
    "llama-tied": dict(family="llama", tie_embeddings=True),
    "custom": dict(family=CUSTOM),
    "hf-llama": dict(family="hf:llama", n_kv_heads=2, tie_embeddings=False),
    "hf-gpt2": dict(family="hf:gpt2"),
}
HF = pytest.importorskip  # the hf:… families need the hf extra


def _spec(name: str, **kw: object) -> ModelSpec:
    if name.startswith("hf-"):
        HF("transformers")
    base = dict(width=64, depth=3, n_heads=4, context_tokens=32, vocab_size=97)
    return ModelSpec(**{**base, **SPECS[name], **kw})  # type: ignore[arg-type]


@pytest.mark.parametrize("name", sorted(SPECS))
def test_flops_match_torch_flop_counter(name: str) -> None:
    """Forward FLOPs per token as stated equal torch.utils.flop_counter over a full context (SDPA's math
    path, so attention is counted too)."""
    spec = _spec(name)
    model = build_model(spec)
    shape = ModelShape.from_spec(spec)
    idx = torch.randint(0, 97, (2, 32))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(idx)
    assert counter.get_total_flops() / idx.numel() == shape.forward_flops_per_token
    assert shape.training_flops_per_token == 3 * shape.forward_flops_per_token


@pytest.mark.parametrize("name", sorted(SPECS))
def test_parameter_counts_and_protocol(name: str) -> None:
    spec = _spec(name)
    model = build_model(spec)
    shape = ModelShape.from_spec(spec)
    assert isinstance(model, CausalLM) and len(model.blocks) == 3
    assert sum(p.numel() for p in model.parameters()) == shape.total_params
    assert counts(shape) == shape.counts  # a family's formula = the count of what it builds


@pytest.mark.parametrize("name", ["llama-gqa-qknorm", "custom", "hf-llama"])
def test_causal_and_trains(name: str) -> None:
    torch.manual_seed(0)
    spec = _spec(name, parametrization="mup", base_width=32)
    model = build_model(spec)
    groups = apply_parametrization(model, spec)
    idx = torch.randint(0, 97, (2, 32))
    changed = idx.clone()
    changed[:, 20:] = (changed[:, 20:] + 1) % 97
    with torch.no_grad():
        assert torch.equal(model(idx)[:, :20], model(changed)[:, :20])
    opt = torch.optim.Adam([{"params": g["params"], "lr": 1e-2 * g["lr_mult"]} for g in groups])
    losses = []
    for _ in range(20):
        loss = model(idx[:, :-1], idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_llama_parameters_are_classified_by_shape() -> None:
    classes = shape_classes(build_model(_spec("llama-gqa-qknorm")))
    assert classes["tok_emb.weight"] == "input" and classes["head.weight"] == "output"
    assert {
        classes[f"blocks.0.{n}.weight"] for n in ("attn.wq", "attn.wk", "attn.wo", "mlp.w1", "mlp.w2")
    } == {"hidden"}
    assert {classes[f"blocks.0.{n}.weight"] for n in ("attn_norm", "attn.q_norm", "mlp_norm")} == {"vector"}


def test_a_factory_that_cannot_be_found_names_the_field() -> None:
    with pytest.raises(SpecError, match="model.family: cannot import 'no_such_module_xyz'"):
        build_model(_spec("gpt2", family="python:no_such_module_xyz:build"))
    with pytest.raises(SpecError, match="has no callable 'nope'"):
        build_model(_spec("gpt2", family="python:custom_model:nope"))
    with pytest.raises(SpecError, match="without"):
        build_model(_spec("gpt2", family="python:torch.nn:Identity"))


def test_bad_family_and_kv_heads_are_spec_errors() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="family"):
        ModelSpec(family="mamba")
    with pytest.raises(ValidationError, match="must divide n_heads=4"):
        ModelSpec(family="llama", n_kv_heads=3)
