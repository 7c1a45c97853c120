"""The optional training controls a TrainSpec asks for, built once for single-process and distributed runs.

* `train.micro_batch_size = "auto"` → `resolve_micro_batch`: the largest micro-batch that fits
  (train/batching.py), fixed before training starts and recorded in record.json.
* `train.noise_scale` → the gradient-noise-scale estimator (train/noise_scale.py) writing noise_scale_tokens,
  noise_g2 and noise_trace into every metrics.jsonl line (small batches: micro-batches in one process,
  `noise_scale_shards` shards of the step, or the data-parallel ranks under DDP/FSDP).
* `train.batch_schedule` / `train.max_global_batch_size` → a batch-size controller growing the global
  batch by schedule, or growing and (`noise_scale_shrink_below`) shrinking it from the noise scale; its
  changes and their reasons go into record.json ("batch_changes") and the log.
* `train.reference_run` → convergence_lag (loss gap at equal training time against that run, train/lag.py)
  in every metrics.jsonl line.
* `train.sinks` → TensorBoard, MLflow and W&B sinks (train/sinks.py), logging `params` when the run starts.

Callbacks that add to a step's metrics or change the batch run before the metrics logger; sinks after it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from scalelab.models.flops import ModelShape
from scalelab.spec import TrainSpec
from scalelab.train.batching import BatchSizeController, NoiseScaleBatchController, find_micro_batch
from scalelab.train.sinks import Params, build_sinks
from scalelab.train.trainer import Callback

log = logging.getLogger(__name__)


def resolve_micro_batch(
    train: TrainSpec, shape: ModelShape, device: torch.device, model: nn.Module | None, dp_size: int = 1
) -> TrainSpec:
    """`train` with an "auto" micro-batch replaced by the largest divisor of the per-rank batch that fits
    (a real forward+backward probe on CUDA, a memory estimate on CPU); other specs are returned as they are."""
    if train.micro_batch_size != "auto":
        return train
    local = train.global_batch_size // dp_size
    micro = find_micro_batch(shape, local, device=device, precision=train.precision, model=model)
    log.info("micro_batch_size auto → %d of %d sequences per rank", micro, local)
    return train.model_copy(update={"micro_batch_size": micro})


@dataclass
class Controls:
    """The callbacks a TrainSpec asks for, in the order they must run around the metrics logger."""

    before_metrics: list[Callback] = field(default_factory=list)
    sinks: list[Callback] = field(default_factory=list)
    growth: Any = None  # the batch-size controller, if any

    def close_sinks(self) -> None:
        """End the sinks' runs as failed if they are still open (a crash skipped on_fit_end)."""
        for sink in self.sinks:
            close = getattr(sink, "close", None)
            if close is not None:
                close()

    def record(self) -> dict[str, Any]:
        """What record.json says about them."""
        return {"batch_changes": list(self.growth.changes)} if self.growth is not None else {}


def build_controls(
    train: TrainSpec, out_dir: Path, run_name: str, is_main: bool = True, params: Params | None = None
) -> Controls:
    """Noise-scale estimator, batch-size controller and metrics sinks for `train` (sinks on rank 0 only);
    the sinks log `params` (default: just the run id) as the run's hyperparameters."""
    controls = Controls()
    noise = None
    if train.noise_scale:
        from scalelab.train.noise_scale import GradientNoiseCallback

        noise = GradientNoiseCallback(shards=train.noise_scale_shards)
        controls.before_metrics.append(noise)
    base = train.global_batch_size
    if train.batch_schedule:
        controls.growth = BatchSizeController(
            [(tokens, size // base) for tokens, size in train.batch_schedule]
        )
    elif train.max_global_batch_size is not None and noise is not None:
        controls.growth = NoiseScaleBatchController(
            noise,
            train.max_global_batch_size // base,
            headroom=train.noise_scale_headroom,
            shrink_below=train.noise_scale_shrink_below,
            min_measurements=train.noise_scale_min_measurements,
            min_steps=train.noise_scale_min_steps,
        )
    if controls.growth is not None:
        controls.before_metrics.append(controls.growth)
    if train.reference_run is not None:
        from scalelab.train.lag import ConvergenceLagCallback, read_reference

        controls.before_metrics.append(ConvergenceLagCallback(read_reference(train.reference_run)))
    if is_main:
        params = params or {"run_id": run_name}
        controls.sinks = build_sinks(train.sinks, Path(out_dir), params, train.log_interval_steps)
    return controls
