"""Energy: RAPL counters (wrap-around, unreadable files), the CPU-time estimate, NVML on GPUs, and records."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from scalelab.energy import ENERGY_SOURCES, EnergyMeter, board_watts, rapl_packages, watts_per_cpu
from scalelab.spec import RunSpec
from scalelab.train.run import run_training
from train_synthetic import SyntheticStore, synthetic_factory


def _zone(root: Path, name: str, label: str, energy_uj: int, max_uj: int = 1000_000_000) -> Path:
    zone = root / name
    zone.mkdir(parents=True)
    (zone / "name").write_text(label + "\n")
    (zone / "energy_uj").write_text(f"{energy_uj}\n")
    (zone / "max_energy_range_uj").write_text(f"{max_uj}\n")
    (zone / "constraint_0_power_limit_uw").write_text("120000000\n")
    return zone


def _burn(seconds: float) -> None:
    end = time.process_time() + seconds
    x = 0
    while time.process_time() < end:
        x += 1


def test_rapl_packages_skip_subdomains_and_psys(tmp_path):
    _zone(tmp_path, "intel-rapl:0", "package-0", 10)
    _zone(tmp_path, "intel-rapl:0:0", "core", 5)
    _zone(tmp_path, "intel-rapl:1", "psys", 7)
    _zone(tmp_path, "intel-rapl:2", "package-1", 3)
    assert [z.name for z in rapl_packages(tmp_path)] == ["intel-rapl:0", "intel-rapl:2"]


def test_rapl_sums_packages_and_unwraps_the_counter(tmp_path):
    p0 = _zone(tmp_path, "intel-rapl:0", "package-0", 999_000_000)
    p1 = _zone(tmp_path, "intel-rapl:1", "package-1", 0)
    meter = EnergyMeter("cpu", powercap_root=tmp_path)
    meter.start()
    assert meter.energy_source == "measured" and meter.scope == "node" and "RAPL" in meter.note
    (p0 / "energy_uj").write_text("500000\n")  # wrapped past 1e9 µJ: 1e6 + 5e5 µJ advanced
    (p1 / "energy_uj").write_text("2000000\n")
    assert meter.joules() == pytest.approx(1.5 + 2.0)
    (p0 / "energy_uj").write_text("1500000\n")
    assert meter.joules() == pytest.approx(2.5 + 2.0)


def test_unreadable_rapl_falls_back_to_the_cpu_time_estimate(tmp_path, monkeypatch):
    monkeypatch.delenv("SCALELAB_WATTS_PER_CPU", raising=False)
    zone = _zone(tmp_path, "intel-rapl:0", "package-0", 10)
    (zone / "energy_uj").unlink()
    (zone / "energy_uj").mkdir()  # reading it fails with an OSError, as a root-only counter does
    meter = EnergyMeter("cpu", powercap_root=tmp_path)
    meter.start()
    assert meter.energy_source == "estimated" and meter.scope == "process"
    watts, origin = watts_per_cpu(tmp_path)
    assert "power limit 120 W" in origin and watts > 0
    t0 = time.process_time()
    _burn(0.2)
    spent = time.process_time() - t0
    joules = meter.joules()
    assert spent * watts <= joules <= (spent + 0.2) * watts
    assert "CPU time" in meter.note


def test_watts_per_cpu_from_the_environment_else_the_stated_default(tmp_path, monkeypatch):
    monkeypatch.setenv("SCALELAB_WATTS_PER_CPU", "12.5")
    assert watts_per_cpu(tmp_path) == (12.5, "$SCALELAB_WATTS_PER_CPU")
    monkeypatch.delenv("SCALELAB_WATTS_PER_CPU")
    watts, origin = watts_per_cpu(tmp_path)  # an empty powercap tree: no limit to divide
    assert watts > 0 and "assumed" in origin


def test_this_machine_measures_or_estimates_never_nothing():
    meter = EnergyMeter("cpu")
    assert meter.joules() is None and meter.energy_source == "unavailable"  # not started
    meter.start()
    _burn(0.05)
    joules = meter.joules()
    assert meter.energy_source in ("measured", "estimated"), meter.note
    assert joules is not None and joules > 0


def test_board_power_table():
    assert board_watts("NVIDIA H100 80GB HBM3") == 700.0
    assert board_watts("NVIDIA H100 PCIe") == 350.0
    assert board_watts("Some Future GPU") is None


def test_cpu_run_record_has_energy(tmp_path, monkeypatch):
    monkeypatch.setenv("SCALELAB_CACHE_DIR", str(tmp_path / "cache"))
    spec = RunSpec.model_validate(
        {
            "model": {"width": 32, "depth": 1, "n_heads": 4, "context_tokens": 32},
            "train": {
                "tokens": 32 * 4 * 3,
                "global_batch_size": 4,
                "threads": 1,
                "eval_interval_steps": 100,
                "eval_tokens": 128,
            },
        }
    )
    rec = run_training(spec, tmp_path / "run", store=SyntheticStore(), loader_factory=synthetic_factory)
    assert rec["status"] == "done", rec["error"]
    assert rec["energy_joules"] is not None and rec["energy_joules"] > 0, rec["energy_note"]
    assert rec["energy_source"] in ENERGY_SOURCES[:2]


def _nvml_works() -> bool:
    try:
        import pynvml

        pynvml.nvmlInit()
        return True
    except Exception:  # noqa: BLE001 — no library, no driver, no device
        return False


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.gpu
def test_gpu_record_energy_is_measured_when_nvml_is_present(tmp_path, monkeypatch):
    """Fails when NVML works but a GPU run still records no energy (the bug this issue fixed)."""
    monkeypatch.setenv("SCALELAB_CACHE_DIR", str(tmp_path / "cache"))
    meter = EnergyMeter("cuda")
    meter.start()
    a = torch.randn(4096, 4096, device="cuda")
    for _ in range(20):
        a = a @ a / 64
    torch.cuda.synchronize()
    joules = meter.joules()
    spec = RunSpec.model_validate(
        {
            "model": {"width": 32, "depth": 1, "n_heads": 4, "context_tokens": 32},
            "train": {
                "tokens": 32 * 4 * 4,
                "global_batch_size": 4,
                "device": "cuda",
                "eval_interval_steps": 100,
                "eval_tokens": 128,
            },
        }
    )
    rec = run_training(spec, tmp_path / "run", store=SyntheticStore(), loader_factory=synthetic_factory)
    assert rec["status"] == "done", rec["error"]
    if not _nvml_works():
        assert meter.energy_source in ("estimated", "unavailable"), meter.note
        pytest.skip(f"NVML not usable here: {meter.note}")
    assert meter.energy_source == "measured" and joules is not None and joules >= 0, meter.note
    assert rec["energy_joules"] is not None, rec["energy_note"]
    assert rec["energy_source"] == "measured"
