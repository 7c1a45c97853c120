"""`scalelab transfer` commands that need no sweep: coord-check, noise-scale from a given B_noise."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from scalelab.errors import SpecError
from scalelab.transfer.commands import app


def test_coord_check_separates_sp_and_mup():
    out = {}
    for p in ("sp", "mup"):
        res = CliRunner().invoke(
            app, ["coord-check", "--widths", "32,64,128", "--steps", "3", "--parametrization", p, "--json"]
        )
        assert res.exit_code == 0, res.output
        out[p] = {c["layer"]: c for c in json.loads(res.output)["layers"]}
    assert all(c["stable"] for c in out["mup"].values())
    assert out["sp"]["block.1"]["slope"] > 0.5 and not out["sp"]["block.1"]["stable"]
    res = CliRunner().invoke(app, ["coord-check", "--widths", "32,64", "--steps", "1"])
    assert res.exit_code == 0 and "logits" in res.output


def test_noise_scale_recommendation_from_given_b_noise():
    args = ["noise-scale", "--b-noise", "65536", "--target-tokens", "1000000000", "--context", "1024"]
    res = CliRunner().invoke(app, [*args, "--tuned-lr", "1e-3", "--tuned-batch", "16", "--json"])
    assert res.exit_code == 0, res.output
    rec = json.loads(res.output)["recommendation"]
    assert rec["batch_sequences"] == 64 and rec["lr_scaling"]["rule"].startswith("square-root")
    res = CliRunner().invoke(app, ["noise-scale", "--b-noise", "65536", "--target-tokens", "1000"])
    assert isinstance(res.exception, SpecError)
    res = CliRunner().invoke(app, ["noise-scale"])
    assert isinstance(res.exception, SpecError)
