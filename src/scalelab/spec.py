"""Validated specs for runs and studies, loaded from TOML, and the canonical hash that is a run's id.

A run's id hashes what decides its result (model, data, optimisation, seed). How it executes (device,
parallel layout, compile, threads, sinks, log/checkpoint cadence: `EXECUTION_FIELDS`) belongs in the
unhashed `[execution]` table; values given there reach `train.<field>` but never the id. The same fields
written under `[train]` (where they lived before `[execution]` existed) keep being hashed as they always
were, so every existing run id, study directory and config.json stays valid.

Everything is checked before anything runs: a bad value raises `SpecError` naming the file, the dotted
field path and what was expected, e.g. ``quickstart.toml: study.model.width: must be a multiple of
n_heads=4, got 30``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import re
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from scalelab.errors import SpecError

RUN_ID_LENGTH = 12
#: largest size fields accepted (far beyond any model trained today; larger values are typos such as 4e12
#: and would only fail later, deep in allocation)
MAX_WIDTH, MAX_DEPTH, MAX_CONTEXT_TOKENS, MAX_VOCAB = 1 << 20, 1 << 14, 1 << 24, 1 << 24
#: seeds go to torch.manual_seed, which takes at most 64 bits; keep them in int64 for everything else
Seed = Annotated[int, Field(ge=0, lt=1 << 63)]


class _Spec(BaseModel):
    """Base for all specs: unknown keys are errors, values are immutable, NaN/inf are rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, validate_default=True)


# --------------------------------------------------------------------------------------------- run
class ModelSpec(_Spec):
    """A decoder-only transformer, sized by width and depth."""

    n_heads: int = Field(4, ge=1, le=MAX_WIDTH, description="attention heads; width must be a multiple of it")
    width: int = Field(64, ge=8, le=MAX_WIDTH, description="residual stream width d_model")
    depth: int = Field(2, ge=1, le=MAX_DEPTH, description="number of transformer blocks")
    context_tokens: int = Field(
        128, ge=8, le=MAX_CONTEXT_TOKENS, description="sequence length the model is trained on"
    )
    mlp_ratio: float = Field(4.0, gt=0, description="MLP hidden width / model width")
    vocab_size: int | None = Field(None, ge=2, le=MAX_VOCAB, description="None: taken from the tokenizer")
    tie_embeddings: bool = True
    parametrization: Literal["sp", "mup", "depth_mup"] = "sp"
    base_width: int = Field(64, ge=1, description="μP base shape: width the hyperparameters were tuned at")
    base_depth: int = Field(2, ge=1, description="depth-μP base depth")
    init_std: float = Field(0.02, gt=0, description="init std of hidden weights at the base shape")
    output_multiplier: float = Field(
        1.0,
        gt=0,
        description="logit multiplier α_out at the base width (a base hyperparameter; μP scales it by "
        "base_width/width)",
    )
    family: str = Field(
        "gpt2",
        pattern=r"^(gpt2|llama|hf:[a-z0-9_]+|python:[A-Za-z_][\w.]*:[A-Za-z_]\w*)$",
        description="architecture: 'gpt2', 'llama', 'hf:MODEL_TYPE' (a transformers causal LM, e.g. "
        "'hf:llama'; the hf extra) or 'python:pkg.module:build' (a factory of your own model; see "
        "models/protocol.py and examples/custom_model.py)",
    )
    n_kv_heads: int | None = Field(
        None, ge=1, description="key/value heads (grouped-query attention, llama); None: n_heads"
    )
    qk_norm: bool = Field(False, description="RMSNorm on queries and keys per head (llama)")

    @field_validator("n_kv_heads")
    @classmethod
    def _kv_heads_divide_heads(cls, kv: int | None, info: Any) -> int | None:
        n_heads = info.data.get("n_heads")
        if kv is not None and n_heads and n_heads % kv:
            raise ValueError(f"must divide n_heads={n_heads}, got {kv}")
        return kv

    @field_validator("width")
    @classmethod
    def _width_divisible_by_heads(cls, width: int, info: Any) -> int:
        n_heads = info.data.get("n_heads")
        if n_heads and width % n_heads:
            raise ValueError(f"must be a multiple of n_heads={n_heads}, got {width}")
        return width


class SourceSpec(_Spec):
    """One text source: the built-in corpus, text files/globs, a JSONL field or a Parquet column."""

    kind: Literal["builtin", "text", "jsonl", "parquet"] = "builtin"
    path: str | None = Field(None, description="file, directory or glob (not for builtin)")
    field: str | None = Field(None, description="JSONL field / Parquet column holding the text")

    @model_validator(mode="after")
    def _needs_path(self) -> SourceSpec:
        if self.kind != "builtin" and not self.path:
            raise ValueError(f"a '{self.kind}' source needs a path")
        if self.kind in ("jsonl", "parquet") and not self.field:
            raise ValueError(f"a '{self.kind}' source needs `field` (the text field/column)")
        return self


class DataSpec(_Spec):
    """Where tokens come from and how they are split into train and held-out documents."""

    sources: list[SourceSpec] = Field(default_factory=lambda: [SourceSpec()], min_length=1)
    tokenizer: Literal["byte", "bpe"] = "byte"
    bpe_vocab_size: int = Field(4096, ge=260, le=1 << 20)
    heldout_fraction: float = Field(0.02, gt=0, lt=0.5, description="share of documents held out for eval")
    shard_tokens: int = Field(1 << 22, ge=1024, description="tokens per shard file")
    store: str | None = Field(
        None, description="path of a prebuilt token store; default: content-keyed cache"
    )


class AsyncPSSpec(_Spec):
    """Asynchronous data parallelism on Ray actors (train/parallel/async_ps.py): each worker reads its own
    shard of the token store (the rows DDP's rank would) and computes shares on weights up to
    `max_staleness` versions old; each update combines `workers` shares and parameter-server actors apply
    it with the run's optimizer. At bound 0 an update is exactly one global batch (synchronous training)."""

    workers: int = Field(2, ge=1, description="worker actors (and shares per global batch)")
    servers: int = Field(1, ge=1, description="parameter-server actors the parameters are split over")
    max_staleness: int = Field(
        1,
        ge=0,
        description="a share's weights are at most this many versions behind its update; 0: synchronous",
    )
    staleness_lr: Literal["none", "inverse"] = Field(
        "none", description="'inverse': an update's LR × 1 / (1 + its mean staleness)"
    )
    worker_restarts: int = Field(
        2, ge=0, description="dead worker actors replaced per run before it fails with WorkerLostError"
    )
    timeout_seconds: float = Field(
        300.0, gt=0, description="no share finished for this long ⇒ the run fails (never hangs)"
    )


class TrainSpec(_Spec):
    """The optimisation: token budget, batch, schedule, precision, checkpoints."""

    tokens: int = Field(1_000_000, ge=1, description="training token budget D")
    global_batch_size: int = Field(16, ge=1, description="sequences per optimizer step, over all ranks")
    micro_batch_size: Annotated[int, Field(ge=1)] | Literal["auto"] | None = Field(
        None,
        description="sequences per forward (the rest is accumulation); None: the whole batch; 'auto': "
        "the largest that fits in memory (train/batching.py; recorded in record.json)",
    )
    lr: float = Field(3e-3, gt=0, le=10)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    warmup_fraction: float = Field(0.05, ge=0, lt=1)
    warmup_tokens: int | None = Field(
        None, ge=0, description="warmup length in tokens, overriding warmup_fraction (WSD branches share it)"
    )
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    decay_fraction: float = Field(0.2, gt=0, le=1, description="WSD: share of steps in the final decay")
    weight_decay: float = Field(0.1, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    eps: float = Field(1e-8, gt=0)
    grad_clip: float | None = Field(1.0, gt=0)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    compile: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"
    strategy: Literal["none", "ddp", "fsdp", "async_ps"] = "none"
    tensor_parallel: int = Field(
        1, ge=1, description="tensor-parallel degree (DTensor, needs strategy='fsdp'); 1: off"
    )
    pipeline_parallel: int = Field(
        1, ge=1, description="pipeline stages (1F1B over micro-batches, needs strategy='fsdp'); 1: off"
    )
    pipeline_microbatches: int | None = Field(
        None, ge=1, description="pipeline micro-batches per step per data-parallel rank; None: 2 × stages"
    )
    fsdp_reshard_after_forward: bool = Field(
        True, description="FSDP: free gathered weights after forward (less memory, one more all-gather)"
    )
    threads: int | None = Field(None, ge=1, description="torch intra-op threads; None: torch's default")
    seed: Seed = 0
    data_seed: Seed | None = Field(None, description="loader order seed; None: same as seed")
    eval_interval_steps: int = Field(50, ge=1)
    eval_tokens: int = Field(32_768, ge=1)
    checkpoint_interval_steps: int = Field(100, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    log_interval_steps: int = Field(1, ge=1)
    batch_schedule: list[tuple[Annotated[int, Field(ge=0)], Annotated[int, Field(ge=1)]]] = Field(
        default_factory=list,
        description="[[tokens_seen, global_batch_size], ...]: grow the global batch at these token counts",
    )
    noise_scale: bool = Field(
        False,
        description="estimate the gradient noise scale every step into metrics.jsonl (needs micro-batches)",
    )
    max_global_batch_size: int | None = Field(
        None,
        ge=1,
        description="grow the global batch (doubling) up to this while the noise scale says a larger batch "
        "is still efficient; needs noise_scale",
    )
    noise_scale_headroom: float = Field(
        2.0, gt=0, description="double the batch when the noise scale B_simple ≥ this × the batch (tokens)"
    )
    noise_scale_shrink_below: float | None = Field(
        None,
        gt=0,
        description="halve the batch (not below global_batch_size) when B_simple < this × the batch; "
        "None: never shrink; at most noise_scale_headroom / 2",
    )
    noise_scale_min_measurements: int = Field(
        20, ge=1, description="noise-scale estimates averaged before the batch may change"
    )
    noise_scale_min_steps: int = Field(10, ge=1, description="steps between two batch-size changes")
    reference_run: str | None = Field(
        None,
        description="run directory (or metrics.jsonl; absolute, or relative to the training process's "
        "working directory) to measure convergence_lag against: the loss gap at equal training time "
        "(train/lag.py); set it in [execution] to keep the run id",
    )
    noise_scale_shards: int | None = Field(
        None,
        ge=2,
        description="one process: estimate from N data-parallel shards of each step instead of the "
        "micro-batches, deciding as an N-rank DDP/FSDP run on the same data would",
    )
    sinks: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(
        default_factory=list,
        description="metrics sinks besides metrics.jsonl (optional extras, checked before a run starts)",
    )
    divergence_factor: float = Field(10.0, gt=1, description="loss above this × its best so far ⇒ diverged")
    async_ps: AsyncPSSpec = Field(
        default_factory=lambda: AsyncPSSpec(), description="strategy='async_ps' only: Ray workers and servers"
    )

    @model_validator(mode="after")
    def _async_ps_alone(self) -> TrainSpec:
        if self.strategy == "async_ps":
            for name in ("noise_scale", "batch_schedule", "max_global_batch_size", "sinks"):
                if getattr(self, name):
                    raise ValueError(f"{name}: not supported with strategy='async_ps'")
            if self.precision == "fp16" or self.compile:
                raise ValueError("strategy='async_ps': fp16 loss scaling and compile are not supported")
            if self.global_batch_size % self.async_ps.workers:
                raise ValueError(
                    f"async_ps.workers: must divide global_batch_size={self.global_batch_size} (each update "
                    f"is the global batch in {self.async_ps.workers} shares), got {self.async_ps.workers}"
                )
        return self

    @model_validator(mode="after")
    def _model_parallel_needs_fsdp(self) -> TrainSpec:
        for name in ("tensor_parallel", "pipeline_parallel"):
            if getattr(self, name) > 1 and self.strategy != "fsdp":
                raise ValueError(
                    f"{name}: model parallelism composes with strategy='fsdp' only (a data-parallel "
                    f"dimension of size 1 is fine), got strategy={self.strategy!r}"
                )
        return self

    @model_validator(mode="after")
    def _micro_divides_global(self) -> TrainSpec:
        micro = self.micro_batch_size
        if isinstance(micro, int) and self.global_batch_size % micro:
            raise ValueError(
                f"micro_batch_size: must divide global_batch_size={self.global_batch_size}, got {micro}"
            )
        return self

    @model_validator(mode="after")
    def _batch_growth(self) -> TrainSpec:
        g = self.global_batch_size
        tokens = [t for t, _ in self.batch_schedule]
        if tokens != sorted(set(tokens)):
            raise ValueError(f"batch_schedule: token counts must increase, got {tokens}")
        for _, size in self.batch_schedule:
            if size % g:
                raise ValueError(
                    f"batch_schedule: batch sizes must be multiples of global_batch_size={g}, got {size}"
                )
        if self.noise_scale:
            micro = self.micro_batch_size
            if self.tensor_parallel > 1 or self.pipeline_parallel > 1:
                raise ValueError(
                    "noise_scale: data parallelism only (the per-rank local gradients are the small "
                    "batches); tensor_parallel and pipeline_parallel must be 1"
                )
            if self.strategy == "none":
                if not isinstance(micro, int) or micro >= g:
                    raise ValueError(
                        "noise_scale: needs at least two micro-batches per step (an integer "
                        f"micro_batch_size below global_batch_size={g}), got micro_batch_size={micro!r}"
                    )
                shards = self.noise_scale_shards
                if shards is not None and (g % shards or (g // shards) % micro):
                    raise ValueError(
                        f"noise_scale_shards: {shards} must divide global_batch_size={g} into shards of "
                        f"whole micro-batches (micro_batch_size={micro})"
                    )
            elif self.noise_scale_shards is not None:
                raise ValueError(
                    "noise_scale_shards: single-process runs only; under ddp/fsdp the ranks are the shards"
                )
        elif self.noise_scale_shards is not None:
            raise ValueError("noise_scale_shards: needs noise_scale=true")
        shrink = self.noise_scale_shrink_below
        if shrink is not None:
            if self.max_global_batch_size is None:
                raise ValueError("noise_scale_shrink_below: needs max_global_batch_size (the batch control)")
            if shrink > self.noise_scale_headroom / 2:
                raise ValueError(
                    f"noise_scale_shrink_below: must be at most noise_scale_headroom / 2 = "
                    f"{self.noise_scale_headroom / 2:g} (or a doubling would be undone at once), got {shrink}"
                )
        if self.max_global_batch_size is not None:
            if not self.noise_scale:
                raise ValueError(
                    "max_global_batch_size: growing the batch from the noise scale needs noise_scale=true"
                )
            if self.batch_schedule:
                raise ValueError(
                    "max_global_batch_size: use either batch_schedule or the noise scale, not both"
                )
            if self.max_global_batch_size % g:
                raise ValueError(f"max_global_batch_size: must be a multiple of global_batch_size={g}")
        if (self.batch_schedule or self.max_global_batch_size) and self.pipeline_parallel > 1:
            raise ValueError("batch_schedule: a growing batch is not supported with pipeline parallelism")
        return self


class DebugSpec(_Spec):
    """Fault injection, used to test failure handling of trainers and executors. Off by default."""

    crash_at_step: int | None = Field(
        None, ge=0, description="raise at the start of this step (steps count from 1)"
    )
    nan_at_step: int | None = Field(None, ge=0, description="make this step's loss NaN (steps count from 1)")
    sleep_seconds_per_step: float = Field(0.0, ge=0, description="slow every step down (timeouts)")
    slow_worker: int | None = Field(
        None, ge=0, description="async_ps: this worker sleeps (slow_factor - 1) × its compute time per share"
    )
    slow_factor: float = Field(2.0, ge=1, description="async_ps: how much slower slow_worker is")
    kill_worker_at_share: int | None = Field(
        None, ge=1, description="async_ps: worker 0's process exits at its n-th share (once per run)"
    )


#: Fields of `TrainSpec` that say how a run executes, not what it computes: set in `[execution]`, they
#: never enter the run id.
EXECUTION_FIELDS: tuple[str, ...] = (
    "compile",
    "device",
    "strategy",
    "tensor_parallel",
    "pipeline_parallel",
    "pipeline_microbatches",
    "fsdp_reshard_after_forward",
    "threads",
    "checkpoint_interval_steps",
    "keep_checkpoints",
    "log_interval_steps",
    "sinks",
    "reference_run",
)


def _unset_if_absent(name: str) -> Any:
    """The `TrainSpec` field `name`, with its checks, as an optional `[execution]` field (None: unset)."""
    field = TrainSpec.model_fields[name]
    checked = Annotated[field.annotation, *field.metadata] if field.metadata else field.annotation
    return (checked | None, Field(None, description=f"{field.description or name} (None: train's)"))


#: The unhashed `[execution]` table: each field, when set, overrides `train.<field>` (same checks apply).
ExecutionSpec = create_model(  # type: ignore[call-overload]
    "ExecutionSpec",
    __base__=_Spec,
    __doc__="How a run executes (not hashed): values set here override the same fields of [train].",
    **{name: _unset_if_absent(name) for name in EXECUTION_FIELDS},
)


def _as_dict(value: Any) -> Any:
    return value.model_dump() if isinstance(value, BaseModel) else value


def _default(name: str) -> Any:
    return TrainSpec.model_fields[name].get_default(call_default_factory=True)


def _merge_execution(data: Any) -> Any:
    """Raw spec data with the set `execution` values copied into `train` (they win there), and what
    `train` had for them (or their default) kept in `hashed_execution`, which the run id hashes."""
    if not isinstance(data, dict):
        return data
    execution, train = _as_dict(data.get("execution")), _as_dict(data.get("train", {}))
    hashed = _as_dict(data.get("hashed_execution", {}))
    if not isinstance(execution, dict) or not isinstance(train, dict) or not isinstance(hashed, dict):
        return data  # validation reports the wrong type
    settings = {k: v for k, v in execution.items() if k in EXECUTION_FIELDS and v is not None}
    if not settings:
        return data
    hashed = {k: hashed[k] if k in hashed else train.get(k, _default(k)) for k in settings}
    return {**data, "train": {**train, **settings}, "hashed_execution": hashed}


#: Pydantic fields shared by `RunSpec` and `StudySpec`: the execution table and its hashed shadow.
_HASHED_EXECUTION_DOC = (
    "derived, not for editing: for each field set in [execution], the value [train] gave it (or its "
    "default); the run id hashes these, so moving a setting to [execution] keeps the id"
)


class RunSpec(_Spec):
    """Everything that determines one training run's result. Its canonical hash is the run id."""

    model: ModelSpec = Field(default_factory=ModelSpec)
    data: DataSpec = Field(default_factory=DataSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    debug: DebugSpec = Field(default_factory=DebugSpec)
    execution: ExecutionSpec = Field(default_factory=ExecutionSpec)  # type: ignore[valid-type]
    hashed_execution: dict[str, Any] = Field(default_factory=dict, description=_HASHED_EXECUTION_DOC)

    @model_validator(mode="before")
    @classmethod
    def _execution_into_train(cls, data: Any) -> Any:
        return _merge_execution(data)

    @model_validator(mode="after")
    def _async_ps_in_train(self) -> RunSpec:
        if (
            self.train.strategy == "async_ps"
            and self.hashed_execution.get("strategy", "async_ps") != "async_ps"
        ):
            raise ValueError(
                "execution.strategy: 'async_ps' trains on stale gradients (a different result, so a "
                'different run id); set strategy = "async_ps" in [train] instead'
            )
        return self

    @model_validator(mode="after")
    def _batch_fits_context(self) -> RunSpec:
        per_step = self.train.global_batch_size * self.model.context_tokens
        if self.train.tokens < per_step:
            raise ValueError(
                f"train.tokens: must be at least one step (global_batch_size × context_tokens = "
                f"{per_step}), got {self.train.tokens}"
            )
        return self

    @property
    def run_id(self) -> str:
        return run_id(self)

    def identity_json(self) -> str:
        """The canonical form of what decides the run's result: the text hashed into its id."""
        return canonical_json(self._canonical_data(with_execution=False))

    def canonical_json(self) -> str:
        """The whole spec in canonical form (what config.json holds): identity plus `execution` when set."""
        return canonical_json(self._canonical_data(with_execution=True))

    def _canonical_data(self, with_execution: bool) -> dict[str, Any]:
        data = self.model_dump(mode="json")
        execution = {k: v for k, v in data.pop("execution").items() if v is not None}
        data["train"].update(data.pop("hashed_execution"))  # what [train] says, not what [execution] does
        for (section, name), default in HASH_OMITTED_AT_DEFAULT.items():
            if data[section].get(name, default) == default:
                data[section].pop(name, None)
        if with_execution and execution:
            data["execution"] = execution
        return data


#: Fields added after run ids were in use: hashed only when set off their default, so adding them did not
#: change the id of any existing run (a spec that sets one gets a new id, as it should).
HASH_OMITTED_AT_DEFAULT: dict[tuple[str, str], Any] = {
    ("model", "output_multiplier"): 1.0,
    ("model", "family"): "gpt2",
    ("model", "n_kv_heads"): None,
    ("model", "qk_norm"): False,
    ("train", "warmup_tokens"): None,
    ("train", "batch_schedule"): [],
    ("train", "noise_scale"): False,
    ("train", "max_global_batch_size"): None,
    ("train", "noise_scale_headroom"): 2.0,
    ("train", "noise_scale_shrink_below"): None,
    ("train", "noise_scale_min_measurements"): 20,
    ("train", "noise_scale_min_steps"): 10,
    ("train", "noise_scale_shards"): None,
    ("train", "reference_run"): None,
    ("train", "sinks"): [],
    ("train", "async_ps"): AsyncPSSpec().model_dump(mode="json"),
    ("debug", "slow_worker"): None,
    ("debug", "slow_factor"): 2.0,
    ("debug", "kill_worker_at_share"): None,
}


# ------------------------------------------------------------------------------------------- study
def _check_axes(axes: dict[str, list[Any]], reserved: tuple[str, ...] = ()) -> dict[str, list[Any]]:
    """Every axis has values; `reserved` paths are set by the design itself and may not be axes; seeds
    come from `seeds` only (an axis train.seed would be silently replaced by it)."""
    for path, values in axes.items():
        if not values:
            raise ValueError(f"axis '{path}' has no values")
        if path == "train.seed":
            raise ValueError("axis 'train.seed': seeds are set by study.design.seeds; list them there")
        if path in reserved:
            raise ValueError(f"axis '{path}' is set by the design itself")
    return axes


class GridDesign(_Spec):
    """Cartesian product of axes (dotted RunSpec paths → values) × seeds."""

    kind: Literal["grid"] = "grid"
    axes: dict[str, list[Any]] = Field(default_factory=dict)
    seeds: list[Seed] = Field(default_factory=lambda: [0], min_length=1)

    @field_validator("axes")
    @classmethod
    def _axes_nonempty(cls, axes: dict[str, list[Any]]) -> dict[str, list[Any]]:
        return _check_axes(axes)


class ListDesign(_Spec):
    """Explicit runs, each a set of overrides (dotted RunSpec paths → value) of the base run, × seeds."""

    kind: Literal["list"] = "list"
    runs: list[dict[str, Any]] = Field(min_length=1)
    seeds: list[Seed] = Field(default_factory=lambda: [0], min_length=1)

    @field_validator("runs")
    @classmethod
    def _no_seed_in_runs(cls, runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for i, run in enumerate(runs):
            if "train.seed" in run:
                raise ValueError(f"runs[{i}]: 'train.seed' is set by study.design.seeds; list seeds there")
        return runs


class IsoFLOPDesign(_Spec):
    """For each compute budget, K model shapes spanning the expected optimum; D follows from C."""

    kind: Literal["isoflop"] = "isoflop"
    budgets_flops: list[Annotated[float, Field(gt=0)]] = Field(min_length=1)
    models_per_budget: int = Field(5, ge=3)
    widths: list[int] = Field(min_length=3, description="candidate widths the planner picks shapes from")
    depth_per_width: float = Field(
        0.0, ge=0, description="depth = max(1, round(width × this)); 0 keeps model.depth"
    )
    seeds: list[Seed] = Field(default_factory=lambda: [0], min_length=1)


class WSDDesign(_Spec):
    """Warmup–stable–decay branches: for each model size (axes × seeds) one run per token count in `tokens`.

    All runs of a size share warmup and stable phase, so the longest (the trunk) saves a snapshot where each
    shorter one starts its cooldown, and the shorter ones (branches) start from that snapshot and train only
    their cooldown — the same result as training them from scratch, at a fraction of the cost. Every run
    uses `train.schedule = "wsd"` with warmup in absolute tokens (`train.warmup_tokens`, or
    warmup_fraction × the smallest token count when it is unset).
    """

    kind: Literal["wsd"] = "wsd"
    axes: dict[str, list[Any]] = Field(default_factory=dict, description="model-size axes, e.g. model.width")
    tokens: list[Annotated[int, Field(ge=1)]] = Field(min_length=1, description="token counts D per size")
    seeds: list[Seed] = Field(default_factory=lambda: [0], min_length=1)

    @field_validator("axes")
    @classmethod
    def _axes_nonempty(cls, axes: dict[str, list[Any]]) -> dict[str, list[Any]]:
        return _check_axes(
            axes, reserved=("train.tokens", "train.seed", "train.schedule", "train.warmup_tokens")
        )


class OFATDesign(_Spec):
    """One factor at a time: each factor grows alone from the base run while the others stay at the base.

    A factor is a dotted run field (e.g. ``train.tokens`` for data, ``model.width`` for the model) with the
    values it takes, or ``compute`` with multipliers of the base run's compute (width × m^¼ rounded to a
    multiple of n_heads and tokens × m^½, so both N ≈ width² and D grow by about √m). `threshold` is the
    marginal loss gain per doubling under which a factor counts as exhausted (the report's
    diminishing-returns analysis)."""

    kind: Literal["ofat"] = "ofat"
    factors: dict[str, list[Any]] = Field(min_length=1)
    seeds: list[Seed] = Field(default_factory=lambda: [0], min_length=1)
    threshold: float = Field(0.01, gt=0, description="loss gain per doubling below which returns diminish")

    @field_validator("factors")
    @classmethod
    def _factors_nonempty(cls, factors: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for name, values in _check_axes(factors).items():
            if name == "compute" and not all(isinstance(v, int | float) and v > 0 for v in values):
                raise ValueError("factor 'compute': multipliers of the base run's compute must be > 0")
        return factors


class FitSpec(_Spec):
    """How the study's runs are fitted (see scalelab.fit)."""

    law: Literal["chinchilla", "kaplan", "power"] = "chinchilla"
    n_params: Literal["total", "non_embedding"] = "non_embedding"
    loss: Literal["eval", "train"] = "eval"
    huber_delta: float = Field(1e-3, gt=0)
    bootstrap: int = Field(200, ge=0)
    holdout_largest: int = Field(0, ge=0, description="leave the K largest-compute runs out for a backtest")
    seed: int = 0
    prior: str | None = Field(
        None,
        description="MAP fit under a prior: published:chinchilla, published:epoch, or an earlier fit.json",
    )


class TargetSpec(_Spec):
    """The decision the study informs: a compute budget or a target loss."""

    compute_flops: float | None = Field(None, gt=0)
    loss: float | None = Field(None, gt=0)


class ForecastSpec(_Spec):
    """What `study plan` prices its forecast at: money per device-hour and, optionally, watts per device."""

    price_per_device_hour: float | None = Field(
        None,
        gt=0,
        description="price of one device (GPU, or CPU machine) for an hour; None: no cost forecast",
    )
    currency: str = Field("USD", min_length=1, max_length=8)
    watts_per_device: float | None = Field(
        None,
        gt=0,
        description="power draw of one busy device; None: the GPU's board power or the CPU estimate",
    )


class SlurmSpec(_Spec):
    """Slurm resources of each run's job (`study run --executor slurm`); not part of any run's identity."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time_minutes: int | None = Field(
        None, ge=1, description="job time limit; None: twice the run's forecast + 10 minutes (60 unforecast)"
    )
    mem_gb: float | None = Field(None, gt=0, description="memory per node; None: the partition's default")
    nodes: int = Field(
        1, ge=1, description="nodes per ddp/fsdp run (torchrun on each, --nproc-per-run ranks each)"
    )
    gpus_per_node: int | None = Field(
        None, ge=0, description="None: --nproc-per-run for CUDA runs, 0 for CPU runs"
    )
    cpus_per_task: int | None = Field(None, ge=1, description="None: train.threads × ranks per node")
    requeues: int = Field(
        3, ge=0, description="resubmissions of a run whose job was cancelled, preempted or lost its node"
    )
    signal_delay_seconds: int = Field(
        120, ge=10, description="seconds before the time limit that the job is signalled to requeue itself"
    )
    setup: list[str] = Field(default_factory=list, description="shell lines run before srun (module load …)")
    sbatch: dict[str, str | int | bool] = Field(
        default_factory=dict, description="further sbatch options, e.g. {constraint = 'a100'}"
    )


class StudySpec(_Spec):
    """A base run plus a design that varies it; fit settings and the target for the report."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    description: str = ""
    model: ModelSpec = Field(default_factory=ModelSpec)
    data: DataSpec = Field(default_factory=DataSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    debug: DebugSpec = Field(default_factory=DebugSpec)
    execution: ExecutionSpec = Field(default_factory=ExecutionSpec)  # type: ignore[valid-type]
    hashed_execution: dict[str, Any] = Field(default_factory=dict, description=_HASHED_EXECUTION_DOC)
    design: Annotated[
        GridDesign | ListDesign | IsoFLOPDesign | WSDDesign | OFATDesign, Field(discriminator="kind")
    ] = Field(default_factory=GridDesign)
    fit: FitSpec = Field(default_factory=FitSpec)
    target: TargetSpec = Field(default_factory=TargetSpec)
    forecast: ForecastSpec = Field(default_factory=ForecastSpec)
    slurm: SlurmSpec = Field(default_factory=SlurmSpec)
    hypotheses: list[str] = Field(default_factory=list)
    sources: dict[
        Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")],
        Annotated[list[SourceSpec], Field(min_length=1)],
    ] = Field(
        default_factory=dict,
        description="a design axis over data sources: name → data.sources; the design runs once per "
        "name, and each run's group (the fit's `group` column) is that name",
    )
    group_by: str | None = Field(
        None, description="a design axis (dotted path) whose value names each run's group, for grouped fits"
    )

    @model_validator(mode="before")
    @classmethod
    def _execution_into_train(cls, data: Any) -> Any:
        return _merge_execution(data)

    @model_validator(mode="after")
    def _one_group_axis(self) -> StudySpec:
        if self.sources and self.group_by:
            raise ValueError("group_by: the runs are grouped by `sources` already; set one of the two")
        return self

    def base_run(self) -> RunSpec:
        sections = ("model", "data", "train", "debug", "execution", "hashed_execution")
        return RunSpec(**{k: getattr(self, k) for k in sections})


# ------------------------------------------------------------------------------ canonical hashing
def _normalize(value: Any) -> Any:
    """Numbers in one form: integral floats become ints, other floats their shortest repr."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if math.isfinite(value) and value.is_integer() and abs(value) < 2**53:
            return int(value)
        return float(repr(value))
    if isinstance(value, Mapping):
        return {str(k): _normalize(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_normalize(v) for v in value]
    raise TypeError(f"cannot canonicalize {type(value).__name__}")


def canonical_json(obj: Any) -> str:
    """Sorted keys, no whitespace, normalised numbers: equal configs give equal strings."""
    return json.dumps(_normalize(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def config_hash(spec: RunSpec) -> str:
    """Full SHA-256 of the run's canonical identity (defaults filled in; `execution` left out)."""
    return hashlib.sha256(spec.identity_json().encode()).hexdigest()


def run_id(spec: RunSpec) -> str:
    """Short, stable id of a run: the first hex digits of its config hash."""
    return config_hash(spec)[:RUN_ID_LENGTH]


# ----------------------------------------------------------------------------------- TOML loading
def _format_validation_error(err: ValidationError, source: str, prefix: str) -> str:
    lines = []
    for e in err.errors(include_url=False):
        loc = [str(p) for p in e["loc"] if not str(p).startswith("function-")]
        msg = str(e["msg"]).removeprefix("Value error, ")
        # Model-level validators name the field themselves ("field: message"): fold it into the path.
        m = re.match(r"^([A-Za-z_][\w.]*): (.*)$", msg, flags=re.S)
        if m and e["type"] == "value_error":
            loc.append(m.group(1))
            msg = m.group(2)
        path = ".".join([prefix, *loc] if prefix else loc) or "(top level)"
        got = ""
        if e["type"] not in ("value_error", "missing", "extra_forbidden") and "input" in e:
            shown = repr(e["input"])
            got = f", got {shown[:80]}"
        if e["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; see the docs for the allowed fields)"
        lines.append(f"{source}: {path}: {msg}{got}")
    return "\n".join(lines)


def _validate(cls: type[_Spec], data: Any, source: str, prefix: str) -> Any:
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise SpecError(_format_validation_error(err, source, prefix)) from None
    except (TypeError, ValueError, RecursionError) as err:  # pydantic raises these on exotic input
        raise SpecError(f"{source}: {prefix or '(top level)'}: invalid value ({err})") from None


def parse_toml(text: str, source: str = "<string>") -> dict[str, Any]:
    """Parse TOML text; syntax errors become `SpecError` naming the source and line."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise SpecError(f"{source}: not valid TOML: {err}") from None
    except (RecursionError, ValueError, TypeError) as err:
        raise SpecError(f"{source}: not valid TOML: {err}") from None
    _check_depth(data, source)
    return data


#: deepest nesting of tables/arrays a spec may have (real specs need 4; hundreds broke copying later)
MAX_SPEC_DEPTH = 32


def _check_depth(data: Any, source: str) -> None:
    """SpecError when tables or arrays nest deeper than MAX_SPEC_DEPTH (checked without recursion)."""
    stack = [(data, 1, "")]
    while stack:
        node, depth, path = stack.pop()
        if depth > MAX_SPEC_DEPTH:
            raise SpecError(f"{source}: {path[:80]}…: tables nested more than {MAX_SPEC_DEPTH} deep")
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for key, child in items:
            if isinstance(child, dict | list):
                stack.append((child, depth + 1, f"{path}.{key}" if path else str(key)))


def read_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise SpecError(f"{path}: cannot read spec file ({err.strerror or err})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise SpecError(f"{path}: not UTF-8 text (byte {err.start})") from None
    return parse_toml(text, path.name)


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b.c=VALUE` → (["a","b","c"], value); VALUE is read as a TOML value, else as a string."""
    if "=" not in item:
        raise SpecError(f"--set {item!r}: expected dotted.path=value")
    key, _, raw = item.partition("=")
    parts = [p for p in key.strip().split(".") if p]
    if not parts or not all(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", p) for p in parts):
        raise SpecError(f"--set {item!r}: '{key}' is not a dotted field path")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return parts, value


def apply_overrides(
    data: dict[str, Any], overrides: Iterable[str], root: str | None = None
) -> dict[str, Any]:
    """Apply `--set` overrides to raw spec data (before validation, so they are validated like the file)."""
    data = copy.deepcopy(data)
    for item in overrides:
        parts, value = parse_override(item)
        if root and parts[0] == root:
            parts = parts[1:]
        if root:
            parts = [root, *parts]
        node = data
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise SpecError(f"--set {item!r}: '{p}' is a value, not a table")
            node = nxt
        node[parts[-1]] = value
    return data


def study_from_dict(data: Any, source: str = "<study>") -> StudySpec:
    if not isinstance(data, dict) or "study" not in data:
        raise SpecError(f"{source}: a study spec needs a [study] table")
    extra = sorted(set(data) - {"study"})
    if extra:
        raise SpecError(f"{source}: {extra[0]}: unknown top-level table (everything lives under [study])")
    study = _validate(StudySpec, data["study"], source, "study")
    sections = ("model", "data", "train", "debug", "execution", "hashed_execution")
    dumped = study.model_dump(mode="json")
    _validate(RunSpec, {k: dumped[k] for k in sections}, source, "study")
    return study  # the runs its design makes are checked where they are made (study.plan.expand_runs)


def load_study(path: str | Path, overrides: Iterable[str] = ()) -> StudySpec:
    """Read and validate a study spec (TOML) with optional `--set` overrides (its design is expanded, and
    every run it makes checked, by `scalelab.study.plan.expand_runs`).

    `--set design.axes.model.width=[64,128]` replaces (or adds) the design axis "model.width"; a `--set`
    of a field the design itself sets for every run (an axis, a list entry's key, seeds, what IsoFLOP or
    WSD designs set) would be silently ignored, so it is an error naming the axis to override instead.
    """
    path = Path(path)
    plain, axes = [], []
    for item in overrides:
        parts, value = parse_override(item)
        parts = parts[1:] if parts[0] == "study" else parts
        if parts[:2] == ["design", "axes"] and len(parts) > 2:
            axes.append((item, ".".join(parts[2:]), value))
        else:
            plain.append(item)
    data = apply_overrides(read_toml(path), plain, root="study")
    for item, axis, value in axes:
        design = data.get("study", {}).get("design")
        if not isinstance(design, dict) or not isinstance(design.setdefault("axes", {}), dict):
            raise SpecError(f"--set {item!r}: the study's design has no axes table")
        design["axes"][axis] = value
    study = study_from_dict(data, path.name)
    for item in plain:
        parts = parse_override(item)[0]
        field = ".".join(parts[1:] if parts[0] == "study" else parts)
        setter = _design_setter(study.design, field)
        if setter:
            raise SpecError(
                f"--set {item!r}: study.design {setter} sets {field} for every run, so this override would be "
                f"ignored; change the design instead (e.g. --set design.axes.{field}=[...] or --set design.seeds=[...])"
            )
    return study


def _design_setter(design: Any, field: str) -> str | None:
    """What in `design` sets `field` for every run (None when nothing does)."""
    if field == "train.seed":
        return "seeds"
    if field in getattr(design, "axes", {}):
        return f"axis {field!r}"
    for i, run in enumerate(getattr(design, "runs", [])):
        if field in run:
            return f"runs[{i}]"
    by_kind = {
        "isoflop": (
            "model.width",
            "train.tokens",
            *(("model.depth",) if getattr(design, "depth_per_width", 0) else ()),
        ),
        "wsd": ("train.tokens", "train.schedule"),
    }
    return f"of kind {design.kind!r}" if field in by_kind.get(design.kind, ()) else None


def run_from_dict(data: Any, source: str = "<run>") -> RunSpec:
    if not isinstance(data, dict):
        raise SpecError(f"{source}: a run spec must be a table")
    if "run" in data and set(data) == {"run"}:  # allow a [run] wrapper table
        data = data["run"]
        return _validate(RunSpec, data, source, "run")
    return _validate(RunSpec, data, source, "")


def load_run(path: str | Path, overrides: Iterable[str] = ()) -> RunSpec:
    """Read a single-run config: TOML with [model], [data], [train] tables, or a run's config.json."""
    path = Path(path)
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError, RecursionError) as err:
            raise SpecError(f"{path}: cannot read run config ({err})") from None
        _check_depth(data, path.name)
    else:
        data = read_toml(path)
    data = apply_overrides(data, overrides)
    return run_from_dict(data, path.name)


def set_path(spec: RunSpec, dotted: str, value: Any, source: str = "<design>") -> RunSpec:
    """A copy of `spec` with one dotted field replaced, re-validated."""
    data = spec.model_dump(mode="json")
    parts = dotted.split(".")
    node = data
    for p in parts[:-1]:
        if not isinstance(node, dict) or p not in node:
            raise SpecError(f"{source}: '{dotted}': no such field in a run spec")
        node = node[p]
    if not isinstance(node, dict) or parts[-1] not in node:
        raise SpecError(f"{source}: '{dotted}': no such field in a run spec")
    node[parts[-1]] = value
    return _validate(RunSpec, data, source, "")
