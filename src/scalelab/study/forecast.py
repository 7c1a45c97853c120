"""Forecast a run's wall time and peak memory from throughput measured on this machine.

For each distinct shape (model, batch, precision, device, threads) a few real optimizer steps are timed
on random tokens and cached per machine in `<cache>/forecast.json`, so a plan costs seconds once and
nothing after. A run's forecast = start-up + training tokens / measured tokens-per-second + held-out
evaluations (a forward pass costs about a third of a training step). Energy and cost follow from the time:
devices × forecast hours × price per device-hour (`[forecast]` in the spec, or `--price`), and devices ×
forecast seconds × busy power per device (`energy.busy_watts`, or `forecast.watts_per_device`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from scalelab.energy import busy_watts
from scalelab.hw import cache_dir, load_changed, load_per_cpu, machine_key, peak_memory_bytes
from scalelab.io import atomic_write_json
from scalelab.spec import ForecastSpec, RunSpec
from scalelab.study.plan import PlannedRun, planning_vocab

log = logging.getLogger(__name__)

#: process start, imports, data store open and model build, measured on this kind of machine (seconds).
STARTUP_SECONDS = 4.0
EVAL_COST_RATIO = 1.0 / 3.0  # forward-only vs forward+backward+update


@dataclass(frozen=True)
class Throughput:
    tokens_per_second: float
    peak_memory_bytes: int
    step_seconds: float


@dataclass(frozen=True)
class Forecast:
    seconds: float
    peak_memory_bytes: int
    tokens_per_second: float


@dataclass(frozen=True)
class Pricing:
    """Price of a device-hour and power of a busy device (None: from the device) for energy/cost forecasts."""

    price_per_device_hour: float | None = None
    currency: str = "USD"
    watts_per_device: float | None = None
    devices_per_run: int = 1

    @classmethod
    def from_spec(cls, spec: ForecastSpec, price: float | None = None, devices_per_run: int = 1) -> Pricing:
        """The spec's `[forecast]` section; `price` (the `--price` flag) overrides its price."""
        return cls(
            price if price is not None else spec.price_per_device_hour,
            spec.currency,
            spec.watts_per_device,
            devices_per_run,
        )

    def watts(self, spec: RunSpec) -> float | None:
        if self.watts_per_device is not None:
            return self.watts_per_device
        return busy_watts(_device(spec), spec.train.threads)[0]

    def energy_and_cost(self, spec: RunSpec, seconds: float | None) -> tuple[float | None, float | None]:
        """(joules, cost) of a run forecast to take `seconds` on `devices_per_run` devices."""
        if seconds is None:
            return None, None
        watts = self.watts(spec)
        joules = None if watts is None else watts * seconds * self.devices_per_run
        price = self.price_per_device_hour
        cost = None if price is None else price * self.devices_per_run * seconds / 3600.0
        return joules, cost


def _sum_known(values: list[float | None]) -> float | None:
    """Sum of the values, None when any is unknown (a partial total would read as the whole)."""
    return None if not values or any(v is None for v in values) else sum(v for v in values if v is not None)


def shape_key(spec: RunSpec) -> str:
    """What decides speed and memory: the model (family and shape), batch, precision, compile, device,
    threads."""
    m, t = spec.model, spec.train
    fields = {
        "family": m.family,
        "kv_heads": m.n_kv_heads,
        "qk_norm": m.qk_norm,
        "width": m.width,
        "depth": m.depth,
        "n_heads": m.n_heads,
        "context": m.context_tokens,
        "mlp_ratio": m.mlp_ratio,
        "vocab": planning_vocab(spec),
        "tie": m.tie_embeddings,
        "global_batch": t.global_batch_size,
        "micro_batch": t.micro_batch_size or t.global_batch_size,
        "precision": t.precision,
        "compile": t.compile,
        "device": t.device,
        "threads": t.threads,
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def _device(spec: RunSpec) -> torch.device:
    if spec.train.device == "cuda" or (spec.train.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def measure_throughput(spec: RunSpec, steps: int = 5, warmup: int = 2) -> Throughput:
    """Time `steps` real optimizer steps (after `warmup`) of this run's model on random tokens."""
    from scalelab.train.build import build_parametrized
    from scalelab.train.precision import autocast
    from scalelab.train.trainer import make_optimizer

    device = _device(spec)
    old_threads = torch.get_num_threads()
    if spec.train.threads and device.type == "cpu":
        torch.set_num_threads(spec.train.threads)
    try:
        gen = torch.Generator().manual_seed(0)
        torch.manual_seed(spec.train.seed)
        raw, groups = build_parametrized(spec.model, planning_vocab(spec), device)
        model = torch.compile(raw) if spec.train.compile else raw
        opt = make_optimizer(groups, spec.train, device)
        micro = spec.train.micro_batch_size or spec.train.global_batch_size
        n_micro = spec.train.global_batch_size // micro
        vocab = planning_vocab(spec)
        T = spec.model.context_tokens
        x = torch.randint(0, vocab, (micro, T + 1), generator=gen).to(device)
        times = []
        for i in range(warmup + steps):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(n_micro):
                with autocast(device.type, spec.train.precision):
                    loss = model(x[:, :-1], x[:, 1:])
                (loss / n_micro).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        step = statistics.median(times)
        return Throughput(spec.train.global_batch_size * T / step, peak_memory_bytes(device), step)
    finally:
        torch.set_num_threads(old_threads)


class Forecaster:
    """Measured-throughput forecasts, cached per machine and shape."""

    def __init__(self, cache_path: Path | None = None, measure: bool = True):
        self.path = cache_path or cache_dir() / "forecast.json"
        self.measure = measure
        self._cache: dict[str, Any] | None = None

    def _load(self) -> dict[str, Any]:
        if self._cache is None:
            try:
                self._cache = json.loads(self.path.read_text())
            except (OSError, ValueError):
                self._cache = {}
        return self._cache

    def throughput(self, spec: RunSpec) -> Throughput | None:
        """Cached throughput of this shape, measured now when absent or taken under a different machine load."""
        machine = machine_key(_device(spec))
        key = shape_key(spec)
        entry = self._load().get(machine, {}).get(key)
        if entry is not None and (not self.measure or not load_changed(entry.get("load_per_cpu"))):
            return Throughput(entry["tokens_per_second"], entry["peak_memory_bytes"], entry["step_seconds"])
        if not self.measure:
            return None
        tp = measure_throughput(spec)
        cache = self._load()
        cache.setdefault(machine, {})[key] = {
            **tp.__dict__,
            "measured_at": time.time(),
            "load_per_cpu": load_per_cpu(),
        }
        try:
            atomic_write_json(self.path, cache)
        except OSError as err:
            log.warning("cannot write forecast cache %s: %s", self.path, err)
        return tp

    def forecast(self, planned: PlannedRun) -> Forecast | None:
        """Forecast of one planned run, or None when measuring is off and nothing is cached."""
        tp = self.throughput(planned.spec)
        if tp is None:
            return None
        t = planned.spec.train
        step_tokens = t.global_batch_size * planned.spec.model.context_tokens
        steps = max(1, planned.tokens_to_train // step_tokens)  # a WSD branch trains its cooldown only
        n_evals = steps // t.eval_interval_steps + 1
        eval_tokens = n_evals * t.eval_tokens
        seconds = (
            STARTUP_SECONDS
            + steps * step_tokens / tp.tokens_per_second
            + EVAL_COST_RATIO * eval_tokens / tp.tokens_per_second
        )
        return Forecast(seconds, tp.peak_memory_bytes, tp.tokens_per_second)


def total_wall_seconds(
    forecasts: list[Forecast | None], parallel: int, after: list[int | None] | None = None
) -> float | None:
    """Wall time of the whole study with `parallel` runs at once: longest-first list scheduling, where
    run i may not start before run `after[i]` has finished (a WSD branch waits for its trunk)."""
    after = after or [None] * len(forecasts)
    known = [i for i, f in enumerate(forecasts) if f is not None and math.isfinite(f.seconds)]
    if not known:
        return None
    seconds = {i: f.seconds for i, f in enumerate(forecasts) if i in known and f is not None}
    lanes = [0.0] * max(1, parallel)
    end: dict[int, float] = {}
    first = sorted((i for i in known if after[i] not in seconds), key=lambda i: -seconds[i])
    for i in [*first, *sorted((i for i in known if after[i] in seconds), key=lambda i: -seconds[i])]:
        lane = lanes.index(min(lanes))
        dep = after[i]
        start = max(lanes[lane], end[dep] if dep is not None and dep in end else 0.0)
        end[i] = lanes[lane] = start + seconds[i]
    return max(lanes)


def _trunk_index(runs: list[PlannedRun]) -> list[int | None]:
    """For each run, the index of the run it must wait for (its WSD trunk), or None."""
    index = {r.run_id: i for i, r in enumerate(runs)}
    return [index.get(r.branch_of) if r.branch_of else None for r in runs]


def plan_rows(
    runs: list[PlannedRun], forecaster: Forecaster | None, parallel: int = 1, pricing: Pricing | None = None
) -> dict[str, Any]:
    """Rows of `study plan` (id, shape, N, D, FLOPs, forecast time, memory, energy, cost) and the totals."""
    rows, forecasts = [], []
    pricing = pricing or Pricing()
    for r in runs:
        fc = forecaster.forecast(r) if forecaster else None
        forecasts.append(fc)
        joules, cost = pricing.energy_and_cost(r.spec, None if fc is None else fc.seconds)
        rows.append(
            {
                "run_id": r.run_id,
                "point": r.point,
                "width": r.spec.model.width,
                "depth": r.spec.model.depth,
                "seed": r.spec.train.seed,
                "n_params": r.n_params,
                "n_params_total": r.n_params_total,
                "tokens": r.tokens,
                "flops": r.flops,
                "tokens_to_train": r.tokens_to_train,
                "flops_to_spend": r.flops_to_spend,
                "branch_of": r.branch_of,
                "branch_step": r.branch_step or None,
                "forecast_seconds": None if fc is None else fc.seconds,
                "forecast_peak_memory_bytes": None if fc is None else fc.peak_memory_bytes,
                "forecast_energy_joules": joules,
                "forecast_cost": cost,
            }
        )
    total = {
        "runs": len(rows),
        "flops": sum(r["flops"] for r in rows),
        "tokens": sum(r["tokens"] for r in rows),
        "flops_to_spend": sum(r["flops_to_spend"] for r in rows),
        "tokens_to_train": sum(r["tokens_to_train"] for r in rows),
        "forecast_run_seconds": sum(f.seconds for f in forecasts if f) if forecaster else None,
        "forecast_wall_seconds": total_wall_seconds(forecasts, parallel, _trunk_index(runs))
        if forecaster
        else None,
        "parallel": parallel,
        "forecast_energy_joules": _sum_known([r["forecast_energy_joules"] for r in rows]),
        "forecast_cost": _sum_known([r["forecast_cost"] for r in rows]),
        "currency": pricing.currency,
        "price_per_device_hour": pricing.price_per_device_hour,
    }
    return {"runs": rows, "total": total}
