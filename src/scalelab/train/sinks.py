"""Metrics sinks besides metrics.jsonl (`train.sinks`): TensorBoard, MLflow and Weights & Biases (offline).

Each logs the run's hyperparameters (every model/data/train field by dotted path, plus `run_id`) when the
run starts, then train/loss, train/lr, train/grad_norm, train/tokens_per_second, train/tokens, train/mfu
every `log_interval_steps` steps and eval/loss after each evaluation. Where they write:
  tensorboard  RUN_DIR/tensorboard/ (scalars, hparams plugin data, the run id as text)
  mlflow       $MLFLOW_TRACKING_URI, else MLflow's default (sqlite:///mlflow.db in the working directory);
               one MLflow run named by the run id, tag `scalelab.run_id`; a resumed run continues its
               unfinished MLflow run
  wandb        RUN_DIR/wandb/ in offline mode (`wandb sync` uploads it later); $WANDB_MODE overrides,
               $WANDB_PROJECT names the project (default "scalelab"); the W&B run id is the run id
The packages are optional extras, checked by `scalelab.extras.require_sinks` before anything runs.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from scalelab.extras import require_sinks
from scalelab.spec import RunSpec
from scalelab.train.trainer import Callback, Trainer, TrainState

Params = dict[str, str | int | float | bool]


def hyperparameters(spec: RunSpec) -> Params:
    """The run's fields as flat dotted paths (`model.width`, `train.lr`, …) plus `run_id`; values are
    scalars (None → "None", lists and tables → JSON text), as every sink accepts them."""
    out: Params = {"run_id": spec.run_id}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}.{key}", item)
        elif isinstance(value, bool | int | float | str):
            out[prefix] = value
        elif value is None:
            out[prefix] = "None"
        else:
            out[prefix] = json.dumps(value, sort_keys=True)

    data = spec.model_dump(mode="json")
    for section in ("model", "data", "train"):
        walk(section, data[section])
    return out


def step_metrics(state: TrainState) -> dict[str, float]:
    """The finite training scalars of one step, named as every sink logs them."""
    values = {
        "train/loss": state.loss,
        "train/lr": state.lr,
        "train/grad_norm": state.grad_norm,
        "train/tokens_per_second": state.tokens_per_second,
        "train/tokens": state.tokens,
        "train/mfu": state.extra.get("mfu"),
    }
    return {k: float(v) for k, v in values.items() if v is not None and math.isfinite(v)}


class _Sink(Callback):
    """Shared cadence: step scalars every `log_interval_steps` (and at the last step), eval/loss always."""

    def __init__(self, params: Params, log_interval_steps: int = 1) -> None:
        self.params = params
        self.log_interval_steps = log_interval_steps

    @property
    def run_id(self) -> str:
        return str(self.params.get("run_id", ""))

    def log(self, metrics: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def on_step_end(self, state: TrainState) -> None:
        if state.step % self.log_interval_steps == 0 or state.step >= state.total_steps or state.stop:
            self.log(step_metrics(state), state.step)

    def on_eval_end(self, state: TrainState) -> None:
        if state.eval_loss is not None and math.isfinite(state.eval_loss):
            self.log({"eval/loss": float(state.eval_loss)}, state.step)

    def on_fit_end(self, state: TrainState) -> None:
        self.close(ok=state.status == "done")

    def close(self, ok: bool = False) -> None:
        """Flush and end the sink's run (marked failed unless `ok`); idempotent, so the run's cleanup can
        call it after a crash that skipped on_fit_end."""
        raise NotImplementedError


class TensorBoardSink(_Sink):
    """Scalars, hyperparameters (hparams plugin) and the run id (text) to an event file in `log_dir`."""

    def __init__(self, log_dir: Path, params: Params, log_interval_steps: int = 1) -> None:
        super().__init__(params, log_interval_steps)
        self.log_dir = Path(log_dir)
        self._writer: Any = None

    def on_fit_start(self, trainer: Trainer) -> None:
        super().on_fit_start(trainer)
        from torch.utils.tensorboard import SummaryWriter  # lazy: optional dependency
        from torch.utils.tensorboard.summary import hparams

        self._writer = SummaryWriter(str(self.log_dir))
        for summary in hparams(self.params, {"train/loss": 0.0, "eval/loss": 0.0}):
            self._writer.file_writer.add_summary(summary)
        self._writer.add_text("run_id", self.run_id)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self._writer.add_scalar(key, value, step)

    def on_checkpoint(self, state: TrainState, path: Path) -> None:
        self._writer.flush()  # what a crash would lose otherwise: the writer flushes every 2 minutes

    def close(self, ok: bool = False) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


#: MLflow rejects longer parameter values
_MLFLOW_PARAM_CHARS = 6000


class MLflowSink(_Sink):
    """One MLflow run named by the run id (or the caller's active run, or the unfinished one a resumed
    run started), with params and a run-id tag."""

    def __init__(self, params: Params, log_interval_steps: int = 1) -> None:
        super().__init__(params, log_interval_steps)
        self._mlflow: Any = None
        self._own_run = False

    def on_fit_start(self, trainer: Trainer) -> None:
        super().on_fit_start(trainer)
        import mlflow  # lazy: optional dependency

        self._mlflow = mlflow
        if mlflow.active_run() is None:
            earlier = mlflow.search_runs(
                filter_string=f"tags.`scalelab.run_id` = '{self.run_id}' and attributes.status != 'FINISHED'",
                order_by=["attributes.start_time DESC"],
                max_results=1,
                output_format="list",
            )
            if earlier:  # a resumed run continues the MLflow run it started
                mlflow.start_run(run_id=earlier[0].info.run_id)
            else:
                mlflow.start_run(run_name=self.run_id)
            self._own_run = True
        mlflow.set_tag("scalelab.run_id", self.run_id)
        mlflow.log_params({k: str(v)[:_MLFLOW_PARAM_CHARS] for k, v in self.params.items()})

    def log(self, metrics: dict[str, float], step: int) -> None:
        self._mlflow.log_metrics(metrics, step=step)

    def close(self, ok: bool = False) -> None:
        if self._mlflow is not None and self._own_run:
            self._mlflow.end_run(status="FINISHED" if ok else "FAILED")
            self._own_run = False


class WandbSink(_Sink):
    """A Weights & Biases run (offline unless $WANDB_MODE says otherwise) under `run_dir`/wandb."""

    def __init__(self, run_dir: Path, params: Params, log_interval_steps: int = 1) -> None:
        super().__init__(params, log_interval_steps)
        self.run_dir = Path(run_dir)
        self._run: Any = None

    def on_fit_start(self, trainer: Trainer) -> None:
        super().on_fit_start(trainer)
        import wandb  # lazy: optional dependency

        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._run = wandb.init(
            mode=os.environ.get("WANDB_MODE", "offline"),  # type: ignore[arg-type]
            project=os.environ.get("WANDB_PROJECT", "scalelab"),
            dir=str(self.run_dir),
            id=self.run_id,
            name=self.run_id,
            config=dict(self.params),
            resume="allow",
            settings=wandb.Settings(silent=True, console="off", save_code=False, disable_git=True),
        )

    def log(self, metrics: dict[str, float], step: int) -> None:
        self._run.log(metrics, step=step)

    def close(self, ok: bool = False) -> None:
        if self._run is not None:
            self._run.finish(exit_code=0 if ok else 1)
            self._run = None


def build_sinks(
    names: Sequence[str], run_dir: Path, params: Params, log_interval_steps: int = 1
) -> list[Callback]:
    """The sink callbacks `names` asks for (SpecError first when one's package is missing)."""
    require_sinks(names)
    sinks: list[Callback] = []
    for name in names:
        if name == "tensorboard":
            sinks.append(TensorBoardSink(Path(run_dir) / "tensorboard", params, log_interval_steps))
        elif name == "mlflow":
            sinks.append(MLflowSink(params, log_interval_steps))
        else:
            sinks.append(WandbSink(Path(run_dir), params, log_interval_steps))
    return sinks
