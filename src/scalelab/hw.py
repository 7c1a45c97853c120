"""Hardware facts for MFU and forecasts: peak matmul FLOP/s (measured or from a table), memory, energy.

`peak_flops(device, precision)` is the reference for MFU (model FLOP utilisation = achieved model FLOP/s
÷ peak). On a GPU listed in `KNOWN_PEAK_FLOPS` the vendor's dense peak is used; otherwise the peak is
measured with a square-matmul micro-benchmark and cached per machine (hostname, CPU/GPU model, torch
threads, torch version) in `<cache dir>/hw.json`, cache dir = $SCALELAB_CACHE_DIR or ~/.cache/scalelab.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import resource
import socket
import sys
import time
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

#: vendor dense peaks (no structured sparsity), FLOP/s; matched as substrings of the CUDA device name,
#: first match wins. fp32 is plain FP32 (not TF32).
KNOWN_PEAK_FLOPS: list[tuple[str, dict[str, float]]] = [
    ("H200", {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}),
    ("H100 PCIe", {"bf16": 756e12, "fp16": 756e12, "fp32": 51e12}),
    ("H100", {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}),
    ("A100", {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12}),
    ("L40S", {"bf16": 362e12, "fp16": 362e12, "fp32": 91.6e12}),
    ("L4", {"bf16": 121e12, "fp16": 121e12, "fp32": 30.3e12}),
    ("A10", {"bf16": 125e12, "fp16": 125e12, "fp32": 31.2e12}),
    ("V100", {"fp16": 125e12, "fp32": 15.7e12}),
    ("RTX 4090", {"bf16": 165e12, "fp16": 165e12, "fp32": 82.6e12}),
]

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def cache_dir() -> Path:
    """$SCALELAB_CACHE_DIR or ~/.cache/scalelab."""
    return Path(os.environ.get("SCALELAB_CACHE_DIR") or Path.home() / ".cache" / "scalelab")


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


def machine_key(device: torch.device) -> str:
    """Cache key: what changes the measured peak."""
    threads = torch.get_num_threads() if device.type == "cpu" else 0
    return f"{socket.gethostname()}|{device.type}|{device_name(device)}|threads={threads}|torch={torch.__version__}"


def known_peak(device: torch.device, precision: str) -> float | None:
    """The table's peak for this CUDA device, None for CPUs and unlisted GPUs."""
    if device.type != "cuda":
        return None
    return peak_for_name(device_name(device), precision)


def peak_for_name(name: str, precision: str) -> float | None:
    """Vendor peak FLOP/s of the first `KNOWN_PEAK_FLOPS` entry contained in the device name."""
    for pattern, peaks in KNOWN_PEAK_FLOPS:
        if pattern in name:
            return peaks.get(precision)
    return None


def measure_matmul_flops(
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    size: int | None = None,
    min_seconds: float = 0.2,
) -> float:
    """Achieved FLOP/s of an n×n by n×n matmul (2n³ FLOPs), best of repeated timings."""
    device = torch.device(device)
    n = size or (4096 if device.type == "cuda" else 512)
    dtype = _DTYPES[precision]
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(2):
        a @ b
    sync()
    best = float("inf")
    reps = 1
    spent = 0.0
    while spent < min_seconds:
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync()
        dt = (time.perf_counter() - t0) / reps
        spent += dt * reps
        best = min(best, dt)
        reps = min(reps * 2, 64)
    return 2.0 * n**3 / best


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_cache(path: Path, data: dict[str, Any]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError as err:  # a read-only cache must not break training
        log.warning("cannot write hardware cache %s: %s", path, err)


def peak_flops(device: torch.device | str = "cpu", precision: str = "fp32") -> tuple[float, str]:
    """(peak FLOP/s, source) for MFU: the vendor table for known GPUs, else a cached measurement."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    table = known_peak(device, precision)
    if table is not None:
        return table, f"table:{device_name(device)}"
    path = cache_dir() / "hw.json"
    key = machine_key(device)
    cache = _read_cache(path)
    entry = cache.get(key, {})
    if precision in entry:
        return float(entry[precision]), "measured (cached)"
    value = measure_matmul_flops(device, precision)
    if device.type == "cpu" and precision != "fp32":
        # CPUs without native bf16/fp16 matmul units emulate them slower than fp32, while autocast runs
        # part of the model in fp32: the faster of the two is the honest ceiling.
        value = max(value, peak_flops(device, "fp32")[0])
    cache = _read_cache(path)  # another process may have written meanwhile
    cache.setdefault(key, {})[precision] = value
    cache[key]["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    _write_cache(path, cache)
    log.info("measured %s matmul peak on %s: %.3g FLOP/s", precision, key, value)
    return value, "measured"


# ------------------------------------------------------------------------------------- memory
def peak_memory_bytes(device: torch.device | str = "cpu") -> int:
    """Peak allocated memory: the CUDA allocator's on a GPU, else the process's peak RSS."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux


# ------------------------------------------------------------------------------------- energy
class EnergyMeter:
    """GPU energy from NVML's cumulative counter (Volta and newer); None with a reason elsewhere."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.note: str | None = None
        self._handle: Any = None
        self._nvml: Any = None
        self._start_mj: int | None = None

    def start(self) -> None:
        if self.device.type != "cuda":
            self.note = "no GPU: energy is only measured through NVML on CUDA devices"
            return
        try:
            import pynvml  # lazy: optional dependency

            pynvml.nvmlInit()
            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            self._start_mj = int(pynvml.nvmlDeviceGetTotalEnergyConsumption(self._handle))
            self._nvml = pynvml
        except ImportError:
            self.note = "pynvml is not installed (pip install nvidia-ml-py)"
        except Exception as err:  # noqa: BLE001 — NVML errors are many and vendor-specific
            self.note = f"NVML energy counter unavailable: {err}"

    def joules(self) -> float | None:
        """Energy since `start()` in joules, or None (see `note`)."""
        if self._nvml is None or self._start_mj is None:
            return None
        try:
            now = int(self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle))
        except Exception as err:  # noqa: BLE001
            self.note = f"NVML energy counter failed: {err}"
            return None
        self.note = "NVML total energy consumption of the GPU (whole device, all processes)"
        return (now - self._start_mj) / 1000.0
