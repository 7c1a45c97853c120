"""int8 (torchao) and group-wise int4 quantization: smaller weights (int4 ≤ 0.35× fp32), held-out loss
within the stated tolerance of fp32 for int8 and reported for int4, the quantized models still serve
through the KV cache, and `serve --quantize int4 --report` prints the comparison and exits."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from scalelab.serve._testing import train_tiny_run
from scalelab.serve.commands import register
from scalelab.serve.engine import Engine, Job
from scalelab.serve.loading import load_run
from scalelab.serve.quantize import (
    INT4_GROUP,
    LOSS_TOLERANCE_NATS,
    LOSS_TOLERANCE_RELATIVE,
    Int4Embedding,
    Int4WeightOnlyLinear,
    Int8WeightOnlyLinear,
    model_size_bytes,
    pack_int4,
    quantization_report,
    quantize_model,
    unpack_int4,
)
from scalelab.serve.sampling import SamplingParams


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("serve_quant")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SCALELAB_CACHE_DIR", str(root / "cache"))
        yield train_tiny_run(root, **{"model.width": 64})


def test_int8_heldout_loss_within_tolerance_and_smaller(run_dir: Path) -> None:
    rep = quantization_report(run_dir, "int8")
    record = json.loads((run_dir / "record.json").read_text())
    assert rep["fp32_heldout_loss"] == pytest.approx(record["eval_loss"], abs=1e-4)  # the run's own eval set
    tolerance = LOSS_TOLERANCE_NATS + LOSS_TOLERANCE_RELATIVE * rep["fp32_heldout_loss"]
    assert abs(rep["loss_delta"]) <= tolerance and rep["within_tolerance"]
    assert rep["quantized_size_bytes"] < 0.6 * rep["fp32_size_bytes"]


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_model_serves_through_the_kv_cache(run_dir: Path, mode: str) -> None:
    run = load_run(run_dir)
    quant = quantize_model(run.model, mode)  # type: ignore[arg-type]
    ids = [run.tokenizer.eod_id, *run.tokenizer.encode("from email import ").tolist()]
    with torch.no_grad():
        full = quant(torch.tensor([ids]))[0, -1]
    engine = Engine(quant, max_batch=2)  # type: ignore[arg-type]
    assert engine.cached  # the KV-cache path, not the cache-less fallback
    job = Job("generate", ids, SamplingParams(max_tokens=5, temperature=0.0))
    engine.admit([job])
    assert job.generated[0] == int(torch.argmax(full))
    while engine.active:
        engine.decode()
    assert len(job.generated) == 5


def test_int8_goes_through_torchao_when_installed(run_dir: Path) -> None:
    pytest.importorskip("torchao")
    quant = quantize_model(load_run(run_dir).model, "int8")
    linear = quant.blocks[0].attn.qkv  # type: ignore[index,union-attr]
    assert isinstance(linear, torch.nn.Linear) and "torchao" in type(linear.weight).__module__


def test_int4_report_size_and_loss_change(run_dir: Path) -> None:
    rep = quantization_report(run_dir, "int4")
    assert rep["size_ratio"] <= 0.35, rep
    assert rep["quantized_size_bytes"] < quantization_report(run_dir, "int8")["quantized_size_bytes"]
    assert abs(rep["loss_delta"]) < 0.25 * rep["fp32_heldout_loss"], rep  # reported; a sanity bound only


def test_int4_pack_round_trips_grid_values_and_bounds_the_error() -> None:
    torch.manual_seed(0)
    w = torch.randn(8, 4 * INT4_GROUP)
    packed, scale, zero = pack_int4(w)
    assert packed.dtype == torch.uint8 and packed.shape == (8, 2 * INT4_GROUP) and scale.shape == (8, 4)
    deq = unpack_int4(packed, scale, zero)
    step = scale.float().repeat_interleave(INT4_GROUP, dim=1)
    assert bool(((deq - w).abs() <= 0.5 * step + 1e-3 * w.abs().max()).all())  # at most half a step off
    again = unpack_int4(*pack_int4(deq))  # already on the grid: exact up to fp16 scale rounding
    torch.testing.assert_close(again, deq, atol=1e-2 * float(step.max()), rtol=0)
    with pytest.raises(ValueError, match="multiple of the group size"):
        pack_int4(torch.randn(4, INT4_GROUP + 2))


def test_int4_modules_are_close_and_small() -> None:
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 128, bias=False)
    q = Int4WeightOnlyLinear(lin)
    x = torch.randn(3, 5, 64)
    with torch.no_grad():
        assert float((q(x) - lin(x)).abs().max()) < 0.15 * float(lin(x).abs().max())
    assert model_size_bytes(q) < 0.3 * model_size_bytes(lin)
    emb = torch.nn.Embedding(50, 64)
    qe = Int4Embedding(emb, torch.float32)
    idx = torch.tensor([[0, 7, 49]])
    assert qe(idx).shape == (1, 3, 64)
    torch.testing.assert_close(qe(idx)[0, 1], unpack_int4(*pack_int4(emb.weight))[7])


def test_weight_only_int8_linear_is_close_and_small() -> None:
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 128, bias=False)
    q = Int8WeightOnlyLinear(lin)
    x = torch.randn(3, 5, 64)
    torch.testing.assert_close(q(x), lin(x), atol=0.02, rtol=0.02)
    assert model_size_bytes(q) < 0.4 * model_size_bytes(lin)


def test_cli_report_prints_and_exits(run_dir: Path) -> None:
    app = typer.Typer()
    register(app)
    result = CliRunner().invoke(app, ["serve", str(run_dir), "--quantize", "int4", "--report", "--json"])
    assert result.exit_code == 0, result.output
    rep = json.loads(result.output)
    assert rep["mode"] == "int4" and rep["size_ratio"] <= 0.35 and "loss_delta" in rep
    table = CliRunner().invoke(app, ["serve", str(run_dir), "--quantize", "int8", "--report"])
    assert table.exit_code == 0 and "held-out loss" in table.output
    bad = CliRunner().invoke(app, ["serve", str(run_dir), "--report"])
    assert bad.exit_code != 0 and "--quantize" in bad.output
