"""The parallel layouts as plug-ins (`scalelab.train.parallel`), without a second process: the registry's
order, pipeline stages cut from any conforming model with the whole model's parameter names and forward,
tensor-parallel plans checked and undone for serving, and named refusals for models that lack a capability.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from scalelab.errors import DistributedError
from scalelab.models.registry import build_model
from scalelab.spec import ModelSpec, TrainSpec
from scalelab.train.parallel import STRATEGIES, active_strategies
from scalelab.train.parallel.pipeline import Stage
from scalelab.train.parallel.tensor import fused_row_order, parse_style, plain_order, tp_plan_of

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = {
    "gpt2": {},
    "llama": {"family": "llama", "n_kv_heads": 2, "qk_norm": True, "tie_embeddings": False},
    "custom": {"family": "python:custom_model:build"},
}


@pytest.fixture(autouse=True)
def _examples_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "examples"))


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    spec = ModelSpec(width=32, depth=3, n_heads=4, context_tokens=16, **FAMILIES[name])
    return build_model(spec, 64)


def test_layouts_apply_in_registry_order():
    names = [
        s.name for s in active_strategies(TrainSpec(strategy="fsdp", tensor_parallel=2, pipeline_parallel=2))
    ]
    assert names == ["pipeline", "tensor", "fsdp"] and STRATEGIES.index("pipeline") < STRATEGIES.index(
        "tensor"
    )
    assert [s.name for s in active_strategies(TrainSpec(strategy="ddp"))] == ["ddp"]
    assert active_strategies(TrainSpec()) == []


@pytest.mark.parametrize("family", list(FAMILIES))
def test_pipeline_stages_keep_names_and_compose_to_the_whole_model(family):
    whole = _model(family)
    idx = torch.randint(0, 64, (2, 16))
    expected = whole(idx)
    names = set(whole.state_dict())
    stages = [Stage(copy.deepcopy(whole), s, 2) for s in range(2)]
    assert [type(b) for b in stages[0].blocks.values()] == [type(whole.blocks[0])] * 2  # never class-swapped
    stage_names = [set(s.state_dict()) for s in stages]
    assert stage_names[0] | stage_names[1] == names
    assert not stage_names[0] & stage_names[1]  # disjoint: each rank holds only its part
    assert not {n for n in stage_names[1] if n.startswith(("blocks.0.", "blocks.1."))}
    hidden = stages[0](idx)
    assert hidden.shape == (2, 16, 32)
    torch.testing.assert_close(stages[1](hidden), expected)


def test_only_the_first_stage_embeds_and_only_the_last_reads_out():
    stages = [Stage(_model("llama"), s, 3) for s in range(3)]
    firsts = [{n.split(".")[0] for n in s.state_dict()} for s in stages]
    assert firsts == [{"tok_emb", "blocks"}, {"blocks"}, {"blocks", "norm", "head"}]


def test_tensor_plan_styles_and_plain_order():
    assert parse_style("a", "colwise") == ("colwise", 1) and parse_style("a", "colwise:3") == ("colwise", 3)
    for bad in ("rowwise:2", "col", "colwise:x", "colwise:0"):
        with pytest.raises(DistributedError, match=r"tp_plan\['a'\]"):
            parse_style("a", bad)
    w = torch.arange(24.0).view(24, 1)
    order = fused_row_order(24, 3, 2)
    saved = {"blocks.0.attn.qkv.weight": w[order], "blocks.0.attn.proj.weight": w}
    plain = plain_order(saved, {"attn.qkv": "colwise:3", "attn.proj": "rowwise"}, 2)
    torch.testing.assert_close(plain["blocks.0.attn.qkv.weight"], w)
    assert plain["blocks.0.attn.proj.weight"] is w


def test_every_family_states_a_tensor_plan_over_its_linear_layers():
    for family in FAMILIES:
        model = _model(family)
        for path in tp_plan_of(model):
            assert isinstance(model.blocks[0].get_submodule(path), nn.Linear), (family, path)


def test_models_without_a_capability_are_refused_by_name():
    class Plain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)

    with pytest.raises(DistributedError, match="no tp_plan"):
        tp_plan_of(Plain())
    with pytest.raises(DistributedError, match="no embed/readout"):
        Stage(Plain(), 0, 2)


def test_the_mesh_is_built_from_the_registered_layouts():
    from scalelab.train.distributed import mesh_layout

    train = TrainSpec(strategy="fsdp", tensor_parallel=2, pipeline_parallel=2)
    assert mesh_layout(8, train) == (("pp", "dp", "tp"), (2, 2, 2))
    assert mesh_layout(1, TrainSpec()) == (("pp", "dp", "tp"), (1, 1, 1))
    with pytest.raises(DistributedError, match=r"train.pipeline_parallel=2 × train.tensor_parallel=2"):
        mesh_layout(6, train)
