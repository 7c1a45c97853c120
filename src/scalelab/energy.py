"""Energy of a run: measured where the hardware has a counter (NVML on GPUs, RAPL on CPUs), else estimated.

`EnergyMeter(device).start()` … `.joules()`; `.energy_source` says how the figure was obtained:
`"measured"` (a hardware counter: NVML's total-energy counter of the GPU, or the CPU packages' RAPL
counters under /sys/class/powercap, both whole-device, i.e. including other processes), `"estimated"`
(power spec × utilisation, see below) or `"unavailable"` (`joules()` is None; `note` says why).

Estimates, each an assumption stated in `note`:
- CPU: this process's CPU time (all threads, `time.process_time`) × watts per logical CPU, where the watts
  are the package power limit (RAPL's `constraint_0_power_limit_uw`, i.e. the TDP, when readable) ÷ logical
  CPUs, else `DEFAULT_WATTS_PER_CPU` (a typical server part: 200–300 W over 32–64 logical CPUs), overridable
  by $SCALELAB_WATTS_PER_CPU. Idle power and memory/uncore power of other processes are not counted.
- GPU without NVML: the board power from `BOARD_WATTS` × wall time, i.e. the device assumed busy throughout
  (an upper bound for a run that leaves the GPU idle part of the time).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from pathlib import Path
from typing import Literal, Protocol

import torch

from scalelab.hw import device_name

log = logging.getLogger(__name__)

EnergySource = Literal["measured", "estimated", "unavailable"]
ENERGY_SOURCES: tuple[EnergySource, ...] = ("measured", "estimated", "unavailable")

POWERCAP_ROOT = Path("/sys/class/powercap")
#: watts per logical CPU when no power limit is readable (typical server CPU: ~250 W TDP / ~48 threads)
DEFAULT_WATTS_PER_CPU = 5.0
#: RAPL counters are polled this often so that a counter wrapping more than once between reads is not missed
#: (the smallest ranges, 2^32 µJ ≈ 4.3 kJ, wrap after ~14 s at 300 W; most are 2^38 µJ or more)
RAPL_POLL_SECONDS = 5.0
#: board power (W) by device-name substring, first match wins: the vendors' TDP/TBP figures
BOARD_WATTS: list[tuple[str, float]] = [
    ("H200", 700.0),
    ("H100 PCIe", 350.0),
    ("H100", 700.0),
    ("A100-PCIE", 250.0),
    ("A100", 400.0),
    ("L40S", 350.0),
    ("L4", 72.0),
    ("A10", 150.0),
    ("V100", 300.0),
    ("RTX 4090", 450.0),
]


class _Counter(Protocol):
    source: EnergySource
    scope: str
    note: str

    def joules(self) -> float: ...


def board_watts(name: str) -> float | None:
    """The `BOARD_WATTS` entry contained in a GPU's name, None when unlisted."""
    return next((watts for pattern, watts in BOARD_WATTS if pattern in name), None)


# ------------------------------------------------------------------------------------- NVML
class _Nvml:
    """NVML's cumulative total-energy counter of one GPU (mJ; Volta and newer)."""

    source: EnergySource = "measured"
    scope = "device"
    note = "NVML total energy consumption of the GPU (whole device, all processes)"

    def __init__(self, index: int) -> None:
        import pynvml  # lazy: the `gpu` extra (nvidia-ml-py)

        pynvml.nvmlInit()
        self._nvml = pynvml
        self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        self._start_mj = int(pynvml.nvmlDeviceGetTotalEnergyConsumption(self._handle))

    def joules(self) -> float:
        now = int(self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle))
        return (now - self._start_mj) / 1000.0


# ------------------------------------------------------------------------------------- RAPL
def rapl_packages(root: Path = POWERCAP_ROOT) -> list[Path]:
    """The top-level RAPL package domains (`intel-rapl:N` named `package-*`; AMD's too) under `root`."""
    found = []
    for zone in sorted(root.glob("intel-rapl:*")):
        if zone.name.count(":") != 1:  # intel-rapl:0:1 is a sub-domain (core, uncore, dram) of a package
            continue
        try:
            name = (zone / "name").read_text().strip()
        except OSError:
            continue
        if name.startswith("package"):
            found.append(zone)
    return found


def _read_int(path: Path) -> int:
    return int(path.read_text().strip())


class _Rapl:
    """Sum of the CPU packages' RAPL energy counters (µJ), unwrapped; polled by a daemon thread."""

    source: EnergySource = "measured"
    scope = "node"
    note = "RAPL energy counters of the CPU packages (whole packages, all processes)"

    def __init__(self, zones: list[Path], poll_seconds: float = RAPL_POLL_SECONDS) -> None:
        if not zones:
            raise OSError("no RAPL package domain")
        self._zones = zones
        # max_energy_range_uj is the counter's range: it wraps to 0 after it
        self._ranges = [_read_int(z / "max_energy_range_uj") for z in zones]
        self._last = [_read_int(z / "energy_uj") for z in zones]  # raises on unreadable counters
        self._total_uj = 0
        self._lock = threading.Lock()
        stop = threading.Event()
        self._stop = stop
        ref = weakref.ref(self)

        def poll() -> None:
            while not stop.wait(poll_seconds):
                meter = ref()
                if meter is None:
                    return
                try:
                    meter.sample()
                except OSError as err:
                    log.debug("RAPL poll failed: %s", err)
                del meter

        threading.Thread(target=poll, name="rapl-poll", daemon=True).start()
        weakref.finalize(self, stop.set)

    def sample(self) -> None:
        """Add every counter's advance since the last read (one wrap-around per interval is unwrapped)."""
        with self._lock:
            for i, zone in enumerate(self._zones):
                now = _read_int(zone / "energy_uj")
                delta = now - self._last[i]
                if delta < 0:
                    delta += self._ranges[i]
                self._total_uj += delta
                self._last[i] = now

    def joules(self) -> float:
        self.sample()
        return self._total_uj / 1e6


def rapl_power_limit_watts(root: Path = POWERCAP_ROOT) -> float | None:
    """Sum of the packages' long-term power limits (PL1 ≈ TDP) in watts, None if unreadable."""
    total = 0.0
    for zone in rapl_packages(root):
        try:
            total += _read_int(zone / "constraint_0_power_limit_uw") / 1e6
        except (OSError, ValueError):
            return None
    return total or None


# ------------------------------------------------------------------------------------- estimates
def watts_per_cpu(root: Path = POWERCAP_ROOT) -> tuple[float, str]:
    """(watts per logical CPU, where the figure comes from) for the CPU-time estimate (module doc)."""
    env = os.environ.get("SCALELAB_WATTS_PER_CPU")
    if env:
        try:
            return float(env), "$SCALELAB_WATTS_PER_CPU"
        except ValueError:
            log.warning("ignoring SCALELAB_WATTS_PER_CPU=%r: not a number", env)
    limit = rapl_power_limit_watts(root)
    cpus = os.cpu_count() or 1
    if limit is not None:
        return limit / cpus, f"RAPL package power limit {limit:.0f} W / {cpus} CPUs"
    return DEFAULT_WATTS_PER_CPU, "assumed: typical server TDP / threads; $SCALELAB_WATTS_PER_CPU overrides"


def busy_watts(device: torch.device, threads: int | None = None) -> tuple[float | None, str]:
    """(watts, where from) of one busy device, for energy forecasts: a GPU's board power (None when
    unlisted), or a CPU run's threads × watts per CPU."""
    if device.type == "cuda":
        name = device_name(device)
        watts = board_watts(name)
        return watts, f"{name} board power" if watts else f"no board power known for {name!r}"
    per_cpu, origin = watts_per_cpu()
    n = threads or torch.get_num_threads()
    return n * per_cpu, f"{n} CPUs × {per_cpu:.3g} W ({origin})"


class _CpuTimeEstimate:
    """This process's CPU seconds × watts per logical CPU."""

    source: EnergySource = "estimated"
    scope = "process"

    def __init__(self, watts: float, origin: str) -> None:
        self._watts = watts
        self._start = time.process_time()
        self.note = f"estimated: process CPU time × {watts:.3g} W per CPU ({origin})"

    def joules(self) -> float:
        return (time.process_time() - self._start) * self._watts


class _BoardPowerEstimate:
    """Board power × wall time: the GPU assumed busy throughout."""

    source: EnergySource = "estimated"
    scope = "device"

    def __init__(self, watts: float, name: str, why: str) -> None:
        self._watts = watts
        self._start = time.monotonic()
        self.note = f"estimated: {name} board power {watts:g} W × wall time, GPU assumed busy ({why})"

    def joules(self) -> float:
        return (time.monotonic() - self._start) * self._watts


# ------------------------------------------------------------------------------------- the meter
class EnergyMeter:
    """Energy since `start()` of the run's device, with `energy_source` and a `note` saying how (module doc).

    `scope` says what one meter covers, for summing over the ranks of a distributed run: "process" (this
    process's CPU time: sum every rank), "device" (one GPU: sum one rank per GPU), "node" (RAPL counts the
    whole machine: sum one rank per node), None before `start()` or when unavailable.
    """

    def __init__(self, device: torch.device | str = "cpu", *, powercap_root: Path = POWERCAP_ROOT) -> None:
        self.device = torch.device(device)
        self.powercap_root = powercap_root
        self.note: str | None = "not started"
        self.energy_source: EnergySource = "unavailable"
        self.scope: str | None = None
        self._counter: _Counter | None = None

    def start(self) -> None:
        """Open the best counter available (NVML, RAPL) or fall back to an estimate."""
        self._counter = self._gpu_counter() if self.device.type == "cuda" else self._cpu_counter()
        if self._counter is not None:
            self.energy_source, self.note = self._counter.source, self._counter.note
            self.scope = self._counter.scope

    def _gpu_counter(self) -> _Counter | None:
        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        try:
            return _Nvml(index)
        except ImportError:
            why = "nvidia-ml-py is not installed (pip install 'scalelab[gpu]')"
        except Exception as err:  # noqa: BLE001 — NVML errors are many and vendor-specific
            why = f"NVML energy counter unavailable: {err}"
        name = device_name(torch.device("cuda", index))
        watts = board_watts(name)
        if watts is None:
            self.note = f"{why}; no board power known for {name!r} to estimate from"
            return None
        return _BoardPowerEstimate(watts, name, why)

    def _cpu_counter(self) -> _Counter:
        try:
            return _Rapl(rapl_packages(self.powercap_root))
        except (OSError, ValueError) as err:
            log.debug("RAPL unreadable (%s): estimating CPU energy", err)
        return _CpuTimeEstimate(*watts_per_cpu(self.powercap_root))

    def joules(self) -> float | None:
        """Energy since `start()` in joules, or None with `energy_source` "unavailable" (see `note`)."""
        if self._counter is None:
            self.energy_source = "unavailable"
            return None
        try:
            return self._counter.joules()
        except Exception as err:  # noqa: BLE001 — a counter failing at the end must not fail the run
            self.note = f"{self._counter.note}; read failed: {err}"
            self.energy_source = "unavailable"
            return None
