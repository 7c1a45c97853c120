"""Hardware peaks (measured + cached, vendor table), memory, and the metrics.jsonl sink (energy: test_energy)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from scalelab import hw
from scalelab.hw import model_gemms, peak_flops, peak_for_name, peak_memory_bytes
from scalelab.train.observe import MetricsLogger, MFUError, step_mfu
from scalelab.train.trainer import TrainState

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SCALELAB_CACHE_DIR", str(tmp_path / "cache"))


def test_cpu_peak_is_measured_once_and_cached(tmp_path):
    value, source = peak_flops("cpu", "fp32")
    assert value > 1e8 and source == "measured"
    cache = json.loads((tmp_path / "cache" / "hw.json").read_text())
    (entry,) = cache.values()
    assert entry["fp32"]["value"] == value and entry["fp32"]["clock"] == "cpu"
    again, source2 = peak_flops("cpu", "fp32")
    assert again == value and source2 == "measured (cached)"


def test_cpu_peak_is_remeasured_when_the_load_changed(tmp_path, monkeypatch):
    gemms = [(64, 32, 96)]
    value, _ = peak_flops("cpu", "fp32", gemms)
    path = tmp_path / "cache" / "hw.json"
    cache = json.loads(path.read_text())
    (entry,) = cache.values()
    entry["fp32|64x32x96"] |= {"value": 1.0, "load_per_cpu": 0.0}  # a peak "measured" on a starved machine
    path.write_text(json.dumps(cache))
    monkeypatch.setattr(hw, "load_per_cpu", lambda: 0.2)
    assert peak_flops("cpu", "fp32", gemms) == (1.0, "measured (cached)")  # same load: the cache stands
    monkeypatch.setattr(hw, "load_per_cpu", lambda: 0.2 + 2 * hw.LOAD_TOLERANCE)
    again, source = peak_flops("cpu", "fp32", gemms)
    assert source == "measured" and again > 1e8


def test_cpu_peak_covers_the_model_gemms_and_squares():
    gemms = model_gemms(4096, 4096, 16384, 50_000)
    assert all(m <= hw.MAX_ROWS and k <= hw.MAX_DIM and n <= hw.MAX_DIM for m, k, n in gemms)
    with_model, _ = peak_flops("cpu", "fp32", [(256, 256, 768)])
    squares = hw.measure_matmul_flops("cpu", "fp32", size=512, cpu_time=True) * torch.get_num_threads()
    assert with_model >= 0.5 * squares  # the best over shapes includes the 512² square (timing noise aside)


def test_step_mfu_takes_the_longer_of_wall_and_cpu_time():
    assert step_mfu(100.0, 1.0, 200.0) == 0.5
    assert step_mfu(100.0, 1.0, 200.0, cpu_seconds=4.0, threads=2) == 0.25  # CPU time beyond wall
    assert step_mfu(100.0, 1.0, 200.0, cpu_seconds=0.5, threads=1) == 0.5  # idle waits do not count less


def test_mfu_above_one_raises_in_tests(tmp_path, monkeypatch):
    monkeypatch.setenv("SCALELAB_STRICT_MFU", "1")
    ml = MetricsLogger(tmp_path / "m.jsonl", flops_per_token=1e6, peak_flops=1e6)
    state = TrainState(step=1, total_steps=2, step_seconds=0.5, tokens_per_second=20.0)
    with pytest.raises(MFUError, match="MFU 20.000 > 1 at step 1"):
        ml.on_step_end(state)
    monkeypatch.delenv("SCALELAB_STRICT_MFU")
    ml.on_step_end(state)  # outside tests: logged, not raised
    assert state.extra["mfu"] == pytest.approx(20.0)
    ml.close()


def test_vendor_table():
    assert peak_for_name("NVIDIA H100 80GB HBM3", "bf16") == 989e12
    assert peak_for_name("NVIDIA H100 PCIe", "bf16") == 756e12
    assert peak_for_name("NVIDIA A100-SXM4-80GB", "fp32") == 19.5e12
    assert peak_for_name("Some Future GPU", "bf16") is None


def test_memory_on_cpu():
    assert peak_memory_bytes("cpu") > 10 * 2**20


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.gpu
def test_peak_on_gpu():
    value, source = peak_flops("cuda", "bf16")
    assert value > 1e12


def test_metrics_logger_lines_and_truncation(tmp_path):
    path = tmp_path / "metrics.jsonl"
    ml = MetricsLogger(path, flops_per_token=100.0, peak_flops=1e6)
    for step in range(1, 5):
        s = TrainState(
            step=step,
            total_steps=4,
            tokens=10 * step,
            loss=1.0 / step,
            lr=0.1,
            grad_norm=2.0,
            step_seconds=0.5,
            tokens_per_second=20.0,
        )
        ml.on_step_end(s)
        assert s.extra["mfu"] == pytest.approx(100 * 20 / 1e6)
    s.eval_loss = 0.7
    ml.on_eval_end(s)
    ml.close()
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 4] and rows[-1] == {
        "step": 4,
        "tokens": 40,
        "eval_loss": 0.7,
    }
    assert set(rows[0]) >= {
        "step",
        "tokens",
        "loss",
        "lr",
        "grad_norm",
        "tokens_per_second",
        "step_seconds",
        "mfu",
        "peak_memory_bytes",
    }
    with open(path, "a") as f:
        f.write('{"step": 5, "tok')  # a line torn by a kill
    ml.truncate_after(2)
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2]


def test_nan_loss_is_logged_as_null(tmp_path):
    ml = MetricsLogger(tmp_path / "m.jsonl", flops_per_token=1.0, peak_flops=None)
    ml.on_step_end(TrainState(step=1, total_steps=1, loss=math.nan, grad_norm=math.inf))
    ml.close()
    row = json.loads((tmp_path / "m.jsonl").read_text())
    assert row["loss"] is None and row["grad_norm"] is None and row["mfu"] is None
