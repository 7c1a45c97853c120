"""Observability as callbacks: the metrics.jsonl sink, MFU and memory (other sinks: train/sinks.py).

metrics.jsonl holds one JSON object per logged step —
  {"step", "tokens", "loss", "lr", "grad_norm", "tokens_per_second", "step_seconds", "mfu",
   "peak_memory_bytes"}
plus whatever callbacks put in `state.extra["metrics"]` (distributed runs: world_size,
grad_norm_min/max/std, step_seconds_min/max/std — see train/distributed.py)
— and one per evaluation — {"step", "tokens", "eval_loss"}. The file is line buffered and flushed after
every line, so a killed run loses at most the line being written. On resume, lines after the checkpoint's
step (written by the run that was killed) are dropped, so the file reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import IO, Any

import torch

from scalelab.hw import peak_memory_bytes
from scalelab.train.trainer import Callback, Trainer, TrainState

log = logging.getLogger(__name__)


def _finite_or_none(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def _plain(x: Any) -> Any:
    """A metrics value other callbacks put in `state.extra["metrics"]`, JSON-safe (non-finite → None)."""
    return _finite_or_none(x) if isinstance(x, float) else x


def metrics_lines_upto(path: Path, step: int) -> list[str]:
    """The whole JSON lines of metrics file `path` whose step is at most `step` (none if it is missing)."""
    if not path.exists():
        return []
    keep = []
    for line in path.read_text().splitlines():
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict) and int(obj.get("step", 0)) <= step:
            keep.append(line)
    return keep


class MFUError(RuntimeError):
    """An MFU above 1.0: the FLOP count or the peak is wrong (a bug, never user input)."""


def step_mfu(
    flops: float, wall_seconds: float, peak_flops: float, cpu_seconds: float | None = None, threads: int = 1
) -> float:
    """MFU of one step: `flops` ÷ (peak × time), time = max(wall, CPU seconds ÷ threads) when CPU time is given."""
    seconds = wall_seconds if cpu_seconds is None else max(wall_seconds, cpu_seconds / max(threads, 1))
    return flops / (peak_flops * seconds) if seconds > 0 else 0.0


class MetricsLogger(Callback):
    """Writes metrics.jsonl and fills `state.extra` with mfu and peak_memory_bytes every step."""

    def __init__(
        self,
        path: Path,
        *,
        flops_per_token: float,
        peak_flops: float | None,
        device: torch.device | str = "cpu",
        log_interval_steps: int = 1,
    ) -> None:
        self.path = Path(path)
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        self.device = torch.device(device)
        self.log_interval_steps = log_interval_steps
        self._file: IO[str] | None = None
        self.max_peak_memory_bytes = 0
        self._cpu_mark = time.process_time()
        self._warned = False

    def on_fit_start(self, trainer: Trainer) -> None:
        super().on_fit_start(trainer)
        self._cpu_mark = time.process_time()

    def _step_cpu_seconds(self) -> float | None:
        """CPU seconds of this process since the last mark (CPU devices only), and a new mark."""
        now = time.process_time()
        spent, self._cpu_mark = now - self._cpu_mark, now
        return spent if self.device.type == "cpu" else None

    def _mfu(self, state: TrainState) -> float | None:
        cpu = self._step_cpu_seconds()
        if not self.peak_flops:
            return None
        flops = self.flops_per_token * state.tokens_per_second * state.step_seconds
        mfu = step_mfu(flops, state.step_seconds, self.peak_flops, cpu, torch.get_num_threads())
        if mfu > 1.0:
            msg = (
                f"MFU {mfu:.3f} > 1 at step {state.step} ({flops:.4g} FLOPs in {state.step_seconds:.4g} s wall, "
                f"{cpu} s CPU, peak {self.peak_flops:.4g} FLOP/s): the FLOP count or the peak is wrong"
            )
            if os.environ.get("SCALELAB_STRICT_MFU"):
                raise MFUError(msg)
            if not self._warned:
                log.error(msg)
                self._warned = True
        return mfu

    def truncate_after(self, step: int) -> None:
        """Drop lines with a step beyond `step` (and a torn last line): the resumed run rewrites them."""
        if not self.path.exists():
            return
        keep = metrics_lines_upto(self.path, step)
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(k + "\n" for k in keep))
        tmp.replace(self.path)

    def _write(self, obj: dict[str, Any]) -> None:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", buffering=1)  # noqa: SIM115 — closed in on_fit_end
        self._file.write(json.dumps(obj, allow_nan=False, default=str) + "\n")
        self._file.flush()

    def on_step_end(self, state: TrainState) -> None:
        mem = peak_memory_bytes(self.device)
        self.max_peak_memory_bytes = max(self.max_peak_memory_bytes, mem)
        mfu = self._mfu(state)
        state.extra["mfu"] = mfu
        state.extra["peak_memory_bytes"] = mem
        if state.step % self.log_interval_steps and state.step < state.total_steps and not state.stop:
            return
        row = {k: _plain(v) for k, v in state.extra.get("metrics", {}).items()}
        self._write(
            row
            | {
                "step": state.step,
                "tokens": state.tokens,
                "loss": _finite_or_none(state.loss),
                "lr": state.lr,
                "grad_norm": _finite_or_none(state.grad_norm),
                "tokens_per_second": state.tokens_per_second,
                "step_seconds": state.step_seconds,
                "mfu": mfu,
                "peak_memory_bytes": mem,
                "global_batch_size": state.global_batch_size,
            }
        )

    def on_eval_end(self, state: TrainState) -> None:
        self._write(
            {"step": state.step, "tokens": state.tokens, "eval_loss": _finite_or_none(state.eval_loss)}
        )
        self._cpu_mark = time.process_time()  # evaluation is not part of the next step

    def on_checkpoint(self, state: TrainState, path: Path) -> None:
        self._cpu_mark = time.process_time()

    def on_fit_end(self, state: TrainState) -> None:
        self.close()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
