"""Validated specs for runs and studies, loaded from TOML, and the canonical hash that is a run's id.

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

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from scalelab.errors import SpecError

RUN_ID_LENGTH = 12


class _Spec(BaseModel):
    """Base for all specs: unknown keys are errors, values are immutable, NaN/inf are rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, validate_default=True)


# --------------------------------------------------------------------------------------------- run
class ModelSpec(_Spec):
    """A decoder-only transformer, sized by width and depth."""

    n_heads: int = Field(4, ge=1, description="attention heads; width must be a multiple of it")
    width: int = Field(64, ge=8, description="residual stream width d_model")
    depth: int = Field(2, ge=1, description="number of transformer blocks")
    context_tokens: int = Field(128, ge=8, description="sequence length the model is trained on")
    mlp_ratio: float = Field(4.0, gt=0, description="MLP hidden width / model width")
    vocab_size: int | None = Field(None, ge=2, description="None: taken from the tokenizer")
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
    strategy: Literal["none", "ddp", "fsdp"] = "none"
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
    seed: int = Field(0, ge=0)
    data_seed: int | None = Field(None, ge=0, description="loader order seed; None: same as seed")
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
    sinks: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(
        default_factory=list,
        description="metrics sinks besides metrics.jsonl (optional extras, checked before a run starts)",
    )
    divergence_factor: float = Field(10.0, gt=1, description="loss above this × its best so far ⇒ diverged")

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
            if not isinstance(micro, int) or micro >= g:
                raise ValueError(
                    "noise_scale: needs at least two micro-batches per step (an integer micro_batch_size "
                    f"below global_batch_size={g}), got micro_batch_size={micro!r}"
                )
            if self.strategy != "none":
                raise ValueError("noise_scale: single-process runs only (strategy='none') for now")
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


class RunSpec(_Spec):
    """Everything that determines one training run's result. Its canonical hash is the run id."""

    model: ModelSpec = Field(default_factory=ModelSpec)
    data: DataSpec = Field(default_factory=DataSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    debug: DebugSpec = Field(default_factory=DebugSpec)

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

    def canonical_json(self) -> str:
        data = self.model_dump(mode="json")
        for (section, name), default in HASH_OMITTED_AT_DEFAULT.items():
            if data[section].get(name, default) == default:
                data[section].pop(name, None)
        return canonical_json(data)


#: Fields added after run ids were in use: hashed only when set off their default, so adding them did not
#: change the id of any existing run (a spec that sets one gets a new id, as it should).
HASH_OMITTED_AT_DEFAULT: dict[tuple[str, str], Any] = {
    ("model", "output_multiplier"): 1.0,
    ("train", "warmup_tokens"): None,
    ("train", "batch_schedule"): [],
    ("train", "noise_scale"): False,
    ("train", "max_global_batch_size"): None,
    ("train", "sinks"): [],
}


# ------------------------------------------------------------------------------------------- study
def _check_axes(axes: dict[str, list[Any]], reserved: tuple[str, ...] = ()) -> dict[str, list[Any]]:
    """Every axis has values; `reserved` paths are set by the design itself and may not be axes."""
    for path, values in axes.items():
        if not values:
            raise ValueError(f"axis '{path}' has no values")
        if path in reserved:
            raise ValueError(f"axis '{path}' is set by the design itself")
    return axes


class GridDesign(_Spec):
    """Cartesian product of axes (dotted RunSpec paths → values) × seeds."""

    kind: Literal["grid"] = "grid"
    axes: dict[str, list[Any]] = Field(default_factory=dict)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)

    @field_validator("axes")
    @classmethod
    def _axes_nonempty(cls, axes: dict[str, list[Any]]) -> dict[str, list[Any]]:
        return _check_axes(axes)


class ListDesign(_Spec):
    """Explicit runs, each a set of overrides (dotted RunSpec paths → value) of the base run, × seeds."""

    kind: Literal["list"] = "list"
    runs: list[dict[str, Any]] = Field(min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)


class IsoFLOPDesign(_Spec):
    """For each compute budget, K model shapes spanning the expected optimum; D follows from C."""

    kind: Literal["isoflop"] = "isoflop"
    budgets_flops: list[Annotated[float, Field(gt=0)]] = Field(min_length=1)
    models_per_budget: int = Field(5, ge=3)
    widths: list[int] = Field(min_length=3, description="candidate widths the planner picks shapes from")
    depth_per_width: float = Field(
        0.0, ge=0, description="depth = max(1, round(width × this)); 0 keeps model.depth"
    )
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)


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
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)

    @field_validator("axes")
    @classmethod
    def _axes_nonempty(cls, axes: dict[str, list[Any]]) -> dict[str, list[Any]]:
        return _check_axes(
            axes, reserved=("train.tokens", "train.seed", "train.schedule", "train.warmup_tokens")
        )


class FitSpec(_Spec):
    """How the study's runs are fitted (see scalelab.fit)."""

    law: Literal["chinchilla", "kaplan", "power"] = "chinchilla"
    n_params: Literal["total", "non_embedding"] = "non_embedding"
    loss: Literal["eval", "train"] = "eval"
    huber_delta: float = Field(1e-3, gt=0)
    bootstrap: int = Field(200, ge=0)
    holdout_largest: int = Field(0, ge=0, description="leave the K largest-compute runs out for a backtest")
    seed: int = 0


class TargetSpec(_Spec):
    """The decision the study informs: a compute budget or a target loss."""

    compute_flops: float | None = Field(None, gt=0)
    loss: float | None = Field(None, gt=0)


class StudySpec(_Spec):
    """A base run plus a design that varies it; fit settings and the target for the report."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    description: str = ""
    model: ModelSpec = Field(default_factory=ModelSpec)
    data: DataSpec = Field(default_factory=DataSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    debug: DebugSpec = Field(default_factory=DebugSpec)
    design: Annotated[GridDesign | ListDesign | IsoFLOPDesign | WSDDesign, Field(discriminator="kind")] = (
        Field(default_factory=GridDesign)
    )
    fit: FitSpec = Field(default_factory=FitSpec)
    target: TargetSpec = Field(default_factory=TargetSpec)
    hypotheses: list[str] = Field(default_factory=list)

    def base_run(self) -> RunSpec:
        return RunSpec(model=self.model, data=self.data, train=self.train, debug=self.debug)


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
    """Full SHA-256 of the canonical RunSpec (defaults filled in)."""
    return hashlib.sha256(spec.canonical_json().encode()).hexdigest()


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
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise SpecError(f"{source}: not valid TOML: {err}") from None
    except (RecursionError, ValueError, TypeError) as err:
        raise SpecError(f"{source}: not valid TOML: {err}") from None


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
    base = {k: getattr(study, k).model_dump(mode="json") for k in ("model", "data", "train", "debug")}
    _validate(RunSpec, base, source, "study")
    # Every run the design makes must itself be valid: check now, before anything runs.
    from scalelab.study.plan import expand_runs

    expand_runs(study, source=source)
    return study


def load_study(path: str | Path, overrides: Iterable[str] = ()) -> StudySpec:
    """Read and validate a study spec (TOML) with optional `--set` overrides."""
    path = Path(path)
    data = apply_overrides(read_toml(path), overrides, root="study")
    return study_from_dict(data, path.name)


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
        except (OSError, ValueError) as err:
            raise SpecError(f"{path}: cannot read run config ({err})") from None
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
