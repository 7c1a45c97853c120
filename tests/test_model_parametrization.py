"""SP / μP / depth-μP: init scales, optimizer groups, multipliers, and the coordinate check."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from scalelab.models.gpt import build_model
from scalelab.models.parametrization import apply_parametrization, coord_check
from scalelab.spec import ModelSpec

torch.set_num_threads(1)


def _spec(**kw):
    base = {"width": 32, "depth": 2, "n_heads": 4, "context_tokens": 16, "base_width": 32, "base_depth": 2}
    base.update(kw)
    return ModelSpec(**base)


@pytest.mark.parametrize("kind", ["sp", "mup", "depth_mup"])
@pytest.mark.parametrize("tie", [True, False])
def test_groups_cover_every_parameter_once(kind, tie):
    model = build_model(_spec(parametrization=kind, tie_embeddings=tie), 50)
    groups = apply_parametrization(model, _spec(parametrization=kind, tie_embeddings=tie))
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    by_name = {g["name"]: g for g in groups}
    # weight decay rule: none on norms and embeddings
    assert by_name["norm"]["wd_mult"] == 0 and by_name["embedding"]["wd_mult"] == 0
    assert by_name["hidden"]["wd_mult"] > 0
    assert ("readout" in by_name) == (not tie)


def test_mup_at_base_shape_equals_sp():
    torch.manual_seed(0)
    sp = build_model(_spec(parametrization="sp"), 50)
    g_sp = apply_parametrization(sp, _spec(parametrization="sp"))
    torch.manual_seed(0)
    mup = build_model(_spec(parametrization="mup"), 50)
    g_mup = apply_parametrization(mup, _spec(parametrization="mup"))
    idx = torch.randint(0, 50, (2, 16))
    torch.testing.assert_close(sp(idx), mup(idx))
    assert [g["lr_mult"] for g in g_sp] == [g["lr_mult"] for g in g_mup]


def test_mup_scalings_at_4x_width():
    spec = _spec(parametrization="mup", width=128, base_width=32)
    torch.manual_seed(0)
    model = build_model(spec, 50)
    groups = {g["name"]: g for g in apply_parametrization(model, spec)}
    assert groups["hidden"]["lr_mult"] == pytest.approx(1 / 4)
    assert groups["embedding"]["lr_mult"] == 1.0
    assert model.output_multiplier == pytest.approx(1 / 4)
    d_head = 128 // 4
    assert model.blocks[0].attn.scale == pytest.approx(math.sqrt(32 / 4) / d_head)
    std = model.blocks[0].mlp.fc.weight.std().item()
    assert std == pytest.approx(0.02 / 2, rel=0.05)  # σ / sqrt(width/base_width)


def test_output_multiplier_is_a_base_hyperparameter():
    """α_out multiplies the logits at the base width; μP carries it to other widths as α_out·base/width."""
    for kind, width, expected in (("sp", 128, 4.0), ("mup", 32, 4.0), ("mup", 128, 1.0)):
        spec = _spec(parametrization=kind, width=width, base_width=32, output_multiplier=4.0)
        model = build_model(spec, 50)
        apply_parametrization(model, spec)
        assert model.output_multiplier == pytest.approx(expected)
    torch.manual_seed(0)
    plain = build_model(_spec(), 50)
    apply_parametrization(plain, _spec())
    torch.manual_seed(0)
    scaled = build_model(_spec(output_multiplier=3.0), 50)
    apply_parametrization(scaled, _spec(output_multiplier=3.0))
    idx = torch.randint(0, 50, (2, 16))
    torch.testing.assert_close(scaled(idx), 3.0 * plain(idx))


def test_depth_mup_residual_multiplier_and_groups():
    spec = _spec(parametrization="depth_mup", width=64, depth=8, base_width=32, base_depth=2)
    model = build_model(spec, 50)
    groups = {g["name"]: g for g in apply_parametrization(model, spec)}
    assert all(b.residual_multiplier == pytest.approx(2 / 8) for b in model.blocks)  # CompleteP α = 1
    assert groups["hidden"]["lr_mult"] == pytest.approx(0.5)
    assert groups["hidden"]["wd_mult"] == pytest.approx(2.0)
    assert groups["hidden"]["eps_mult"] == pytest.approx(1 / (2 * 4))
    assert groups["norm"]["lr_mult"] == 1.0


def _spread(rows, layer, step, widths):
    vals = [
        next(r["rms"] for r in rows if r["width"] == w and r["layer"] == layer and r["step"] == step)
        for w in widths
    ]
    return max(vals) / min(vals), vals


def test_coord_check_mup_flat_sp_grows():
    widths = [64, 256, 1024]
    steps = 3
    mup = coord_check(widths, "mup", steps=steps, batch_size=2, context_tokens=16)
    sp = coord_check(widths, "sp", steps=steps, batch_size=2, context_tokens=16)
    for layer in ("embedding", "block.0", "block.1", "logits"):
        ratio, vals = _spread(mup, layer, steps, widths)
        assert ratio < 2.0, (layer, vals)
    ratio_sp, vals_sp = _spread(sp, "block.1", steps, widths)
    assert ratio_sp > 20, vals_sp
    assert vals_sp == sorted(vals_sp)  # SP grows with width


@pytest.mark.parametrize("family", ["llama", "python:custom_model:build"])
def test_coord_check_is_flat_under_mup_and_grows_under_sp_for_every_family(family, monkeypatch):
    """The same check for the Llama family and the example's own model (examples/custom_model.py): μP's
    coordinates do not grow with width (finite-width noise at width 64 allowed), SP's grow many-fold."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "examples"))
    widths = [64, 256, 1024]
    steps = 3
    mup = coord_check(widths, "mup", steps=steps, batch_size=2, context_tokens=16, family=family)
    sp = coord_check(widths, "sp", steps=steps, batch_size=2, context_tokens=16, family=family)
    for layer in ("embedding", "block.0", "block.1", "logits"):
        ratio, vals = _spread(mup, layer, steps, widths)
        assert ratio < 3.0 and vals[-1] < 1.5 * vals[0], (layer, vals)
    ratio_sp, vals_sp = _spread(sp, "block.1", steps, widths)
    assert ratio_sp > 20 and vals_sp == sorted(vals_sp), vals_sp
