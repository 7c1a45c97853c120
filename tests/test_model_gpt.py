"""The GPT matches the architecture counted in models/flops.py, is causal, and is built from a spec."""

from __future__ import annotations

import pytest
import torch

from scalelab.models.flops import ModelShape
from scalelab.models.gpt import GPT, build_model
from scalelab.spec import ModelSpec

torch.set_num_threads(1)


@pytest.mark.parametrize(
    ("width", "depth", "heads", "ctx", "vocab", "ratio", "tie"),
    [(32, 2, 4, 32, 64, 4.0, True), (48, 3, 6, 16, 257, 4.0, False), (64, 1, 2, 8, 100, 2.5, True)],
)
def test_param_count_equals_flops_module(width, depth, heads, ctx, vocab, ratio, tie):
    spec = ModelSpec(
        width=width, depth=depth, n_heads=heads, context_tokens=ctx, mlp_ratio=ratio, tie_embeddings=tie
    )
    model = build_model(spec, vocab)
    shape = ModelShape.from_spec(spec, vocab)
    assert sum(p.numel() for p in model.parameters()) == shape.total_params
    assert model.num_params() == shape.total_params
    emb = {"tok_emb.weight", "pos_emb.weight", "head.weight"}
    non_emb = sum(p.numel() for n, p in model.named_parameters() if n not in emb)
    assert non_emb == shape.non_embedding_params


def test_flops_hand_computed():
    # d=32, L=2, h=128, T=32, V=64:
    # block matmuls L·(4d² + 2dh) = 2·(4096 + 8192) = 24576
    # forward = 2·24576 + 2·V·d (4096) + 4·L·T·d (8192) = 61440; training = 3× = 184320 per token
    shape = ModelShape.from_spec(ModelSpec(width=32, depth=2, n_heads=4, context_tokens=32), 64)
    assert shape.block_matmul_params == 24576
    assert shape.forward_flops_per_token == 61440
    assert shape.training_flops_per_token == 184320
    assert shape.training_flops(1000) == 184320 * 1000
    assert shape.non_embedding_params == 24576 + 2 * 2 * 32 + 32
    assert shape.total_params == shape.non_embedding_params + 64 * 32 + 32 * 32


def test_tied_output_shares_the_embedding():
    model = build_model(ModelSpec(width=32, n_heads=4, context_tokens=16), 50)
    assert model.head.weight is model.tok_emb.weight
    untied = build_model(ModelSpec(width=32, n_heads=4, context_tokens=16, tie_embeddings=False), 50)
    assert untied.head.weight is not untied.tok_emb.weight


def test_forward_shapes_loss_and_causality():
    torch.manual_seed(0)
    model: GPT = build_model(ModelSpec(width=32, depth=2, n_heads=4, context_tokens=16), 40)
    idx = torch.randint(0, 40, (3, 16))
    logits = model(idx)
    assert logits.shape == (3, 16, 40)
    loss = model(idx, idx)
    assert loss.ndim == 0 and torch.isfinite(loss)
    # changing a future token leaves earlier positions' logits unchanged
    idx2 = idx.clone()
    idx2[:, 10] = (idx2[:, 10] + 1) % 40
    logits2 = model(idx2)
    torch.testing.assert_close(logits[:, :10], logits2[:, :10])
    assert not torch.allclose(logits[:, 10:], logits2[:, 10:])
    with pytest.raises(ValueError, match="context_tokens"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_multiplier_attributes_change_the_output():
    torch.manual_seed(0)
    model = build_model(ModelSpec(width=32, depth=2, n_heads=4, context_tokens=8), 20)
    idx = torch.randint(0, 20, (2, 8))
    base = model(idx)
    model.output_multiplier = 0.5
    torch.testing.assert_close(model(idx), base * 0.5)
    model.output_multiplier = 1.0
    for block in model.blocks:
        block.residual_multiplier = 0.0
    no_blocks = model.head(model.ln_f(model.tok_emb(idx) + model.pos_emb(torch.arange(8))))
    torch.testing.assert_close(model(idx), no_blocks)


def test_model_file_does_not_import_distributed():
    import scalelab.models.gpt as gpt

    source = open(gpt.__file__).read()
    assert "torch.distributed" not in source.replace("never imports `torch.distributed`", "")
