"""int8 quantization: smaller weights, held-out loss within the stated tolerance of fp32, the quantized
model still serves, and `serve --quantize int8 --report` prints the comparison and exits."""

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
    LOSS_TOLERANCE_NATS,
    LOSS_TOLERANCE_RELATIVE,
    Int8WeightOnlyLinear,
    model_size_bytes,
    quantization_report,
    quantize_model,
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


def test_quantized_model_serves_through_the_kv_cache(run_dir: Path) -> None:
    run = load_run(run_dir)
    quant = quantize_model(run.model, "int8")
    ids = [run.tokenizer.eod_id, *run.tokenizer.encode("from email import ").tolist()]
    with torch.no_grad():
        full = quant(torch.tensor([ids]))[0, -1]
    engine = Engine(quant, max_batch=2)  # type: ignore[arg-type]
    job = Job("generate", ids, SamplingParams(max_tokens=5, temperature=0.0))
    engine.admit([job])
    assert job.generated[0] == int(torch.argmax(full))
    while engine.active:
        engine.decode()
    assert len(job.generated) == 5


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
    result = CliRunner().invoke(app, ["serve", str(run_dir), "--quantize", "int8", "--report", "--json"])
    assert result.exit_code == 0, result.output
    rep = json.loads(result.output)
    assert rep["within_tolerance"] and rep["size_ratio"] < 0.6
    bad = CliRunner().invoke(app, ["serve", str(run_dir), "--report"])
    assert bad.exit_code != 0 and "--quantize" in bad.output
