"""`hw.step_gemms`: the GEMM shapes `peak_flops` is given for a model shape and micro-batch."""

from scalelab.hw import MAX_ROWS, model_gemms, step_gemms
from scalelab.models.flops import ModelShape
from scalelab.spec import ModelSpec


def test_step_gemms_are_the_model_gemms_of_a_micro_step():
    for family in ("gpt2", "llama"):
        shape = ModelShape.from_spec(
            ModelSpec(family=family, width=96, depth=2, n_heads=4, context_tokens=8), 300
        )
        got = step_gemms(shape, 3)
        assert got == model_gemms(24, 96, shape.mlp_hidden, 300)
        assert (24, 96, shape.mlp_hidden) in got and (24, 96, 300) in got  # MLP and output layer


def test_step_gemms_cap_the_rows():
    shape = ModelShape.from_spec(ModelSpec(width=64, depth=1, n_heads=2, context_tokens=512), 257)
    assert {m for m, _, _ in step_gemms(shape, 64)} == {MAX_ROWS}
