"""Hardware facts for MFU and forecasts: peak matmul FLOP/s (measured or from a table), memory.

`peak_flops(device, precision, gemms)` is the reference for MFU (model FLOP utilisation = achieved model
FLOP/s ÷ peak). On a GPU listed in `KNOWN_PEAK_FLOPS` the vendor's dense peak is used. Elsewhere the
peak is measured, and so that a busy machine can never inflate it (a peak timed under load makes every
later MFU too high): on a CPU in CPU time (`time.process_time`, all threads), the best FLOP per
CPU-second over square 512/1024 matmuls and the model's own GEMM shapes, at the current torch thread
count, reported as FLOP/s with every thread busy (× threads). A measurement is cached per machine
(hostname, CPU/GPU model, torch threads, torch version), precision and shapes in `<cache dir>/hw.json`
(cache dir = $SCALELAB_CACHE_DIR or ~/.cache/scalelab) together with the load it was taken under, and
re-taken when the machine's load per CPU differs by more than `LOAD_TOLERANCE`. MFU itself is computed in
`train/observe.py`.
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
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

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


#: a GEMM as (m, k, n): an m×k by k×n matmul, 2·m·k·n FLOPs
Gemm = tuple[int, int, int]

#: square sizes always measured on CPUs besides the model's shapes (the peak is the best of all)
CPU_SQUARES: tuple[int, ...] = (512, 1024)
#: a model GEMM is measured with m capped here (rows only repeat the same work) and k, n at `MAX_DIM`
MAX_ROWS, MAX_DIM = 1024, 2048
#: a cached CPU peak is re-measured when the 1-minute load per CPU differs by more than this from when it
#: was measured (the same tolerance as the throughput forecasts' cache)
LOAD_TOLERANCE = 0.5


def load_per_cpu() -> float | None:
    """The 1-minute load average per CPU, or None where the OS does not report it."""
    try:
        return os.getloadavg()[0] / (os.cpu_count() or 1)
    except (OSError, AttributeError):
        return None


def model_gemms(tokens: int, width: int, mlp_hidden: int, vocab_size: int) -> list[Gemm]:
    """The forward GEMMs of a GPT block stack and its output layer on `tokens` rows, capped in size."""
    m = min(tokens, MAX_ROWS)
    shapes = [(m, width, 3 * width), (m, width, width), (m, width, mlp_hidden), (m, mlp_hidden, width)]
    shapes.append((m, width, vocab_size))
    return sorted({(m, min(k, MAX_DIM), min(n, MAX_DIM)) for m, k, n in shapes})


class _Shape(Protocol):
    width: int
    mlp_hidden: int
    vocab_size: int
    context_tokens: int


def step_gemms(shape: _Shape, sequences: int) -> list[Gemm]:
    """`model_gemms` of a model shape (`models.flops.ModelShape`) run on `sequences` sequences a micro-step:
    the shapes to hand `peak_flops` wherever a run's MFU is measured."""
    return model_gemms(sequences * shape.context_tokens, shape.width, shape.mlp_hidden, shape.vocab_size)


def measure_matmul_flops(
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    size: int | None = None,
    min_seconds: float = 0.2,
    gemm: Gemm | None = None,
    cpu_time: bool = False,
) -> float:
    """Achieved FLOP/s of an n×n by n×n matmul (or of `gemm` = (m, k, n)), best of repeated timings.

    With `cpu_time` the clock is this process's CPU time (all its threads): the result is FLOP per
    CPU-second, which other processes competing for the cores cannot lower by descheduling it.
    """
    device = torch.device(device)
    n = size or (4096 if device.type == "cuda" else 512)
    m, k, n = gemm or (n, n, n)
    dtype = _DTYPES[precision]
    a = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(k, n, device=device).to(dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    clock = time.process_time if cpu_time else time.perf_counter
    for _ in range(2):
        a @ b
    sync()
    best = float("inf")
    reps = 1
    spent = 0.0
    t_end = time.perf_counter() + 10 * min_seconds  # a starved process still finishes
    while (spent < min_seconds and time.perf_counter() < t_end) or best == float("inf"):
        t0 = clock()
        for _ in range(reps):
            a @ b
        sync()
        dt = (clock() - t0) / reps
        spent += dt * reps
        if dt > 0:
            best = min(best, dt)
        reps = min(reps * 2, 64)
    return 2.0 * m * k * n / best


def cpu_peak_per_cpu_second(precision: str, gemms: Iterable[Gemm] = (), min_seconds: float = 0.1) -> float:
    """Best matmul FLOP per CPU-second of this process over `CPU_SQUARES` and `gemms`."""
    shapes = sorted({(s, s, s) for s in CPU_SQUARES} | set(gemms))
    return max(
        measure_matmul_flops("cpu", precision, gemm=g, min_seconds=min_seconds, cpu_time=True) for g in shapes
    )


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


def load_changed(measured: float | None) -> bool:
    """Whether the load per CPU now differs by more than `LOAD_TOLERANCE` from `measured` (None: unknown)."""
    now = load_per_cpu()
    if now is None:
        return False
    return measured is None or abs(now - measured) > LOAD_TOLERANCE


def peak_flops(
    device: torch.device | str = "cpu", precision: str = "fp32", gemms: Iterable[Gemm] = ()
) -> tuple[float, str]:
    """(peak FLOP/s, source) for MFU: the vendor table for known GPUs, else a measurement (module doc).

    On a CPU the value is (best FLOP per CPU-second) × torch threads; pass the model's GEMM shapes
    (`model_gemms`) so that the peak is at least what the model's own matmuls can reach.
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    table = known_peak(device, precision)
    if table is not None:
        return table, f"table:{device_name(device)}"
    gemms = sorted(set(gemms))
    path = cache_dir() / "hw.json"
    key = machine_key(device)
    name = precision + "".join(f"|{m}x{k}x{n}" for m, k, n in gemms)
    entry = _read_cache(path).get(key, {}).get(name)
    if isinstance(entry, dict) and "value" in entry and not load_changed(entry.get("load_per_cpu")):
        return float(entry["value"]), "measured (cached)"
    if device.type == "cpu":
        value = cpu_peak_per_cpu_second(precision, gemms) * torch.get_num_threads()
        if precision != "fp32":
            # CPUs without native bf16/fp16 matmul units emulate them slower than fp32, while autocast runs
            # part of the model in fp32: the faster of the two is the honest ceiling.
            value = max(value, cpu_peak_per_cpu_second("fp32", gemms) * torch.get_num_threads())
    else:
        shapes: list[Gemm | None] = [*gemms] or [None]
        value = max(measure_matmul_flops(device, precision, gemm=g) for g in shapes)
    cache = _read_cache(path)  # another process may have written meanwhile
    cache.setdefault(key, {})[name] = {
        "value": value,
        "load_per_cpu": load_per_cpu(),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "clock": "cpu" if device.type == "cpu" else "wall",
    }
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
