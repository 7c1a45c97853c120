"""One training run, end to end: `run_training(spec, out_dir)` → record.json (see docs/contracts.md).

The run directory:
  config.json      canonical RunSpec (the run id is its hash)
  provenance.json  code, packages, hardware, data fingerprint, seeds
  metrics.jsonl    one JSON object per step / eval (train/observe.py)
  checkpoint/      step-NNNNNN/ directories, written atomically (train/checkpoint.py)
  record.json      the result, written atomically — also when the run fails or diverges

`train.strategy` "ddp"/"fsdp" runs go to `scalelab.train.parallel.engine.run_distributed` (under
torchrun, or as a world of one), which writes the same files with sharded checkpoints.

`snapshot_steps` keeps a checkpoint for good at those steps (in snapshots/, for WSD branches), and
`branch_from` starts a run without checkpoints of its own from another run's snapshot after checking
that training from scratch would pass through it (train/branch.py); record.json's "branch" says so.

With `resume=True` a run continues from its newest valid checkpoint and ends bitwise identical to an
uninterrupted run (same weights, optimizer, loader position and RNG); with `resume=False` previous
checkpoints and metrics in `out_dir` are discarded.

Failures never escape: an exception ends the run with status "failed" and `error` = "Type: message";
a diverged loss ends it with status "diverged". `exit_code(record)` maps the status to the CLI's exit
code (done 0, diverged 3, failed 1).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from scalelab.errors import CheckpointError, TrainingError
from scalelab.hw import EnergyMeter, model_gemms, peak_flops, peak_memory_bytes
from scalelab.io import atomic_write_json, atomic_write_text
from scalelab.models.flops import ModelShape
from scalelab.models.gpt import build_model
from scalelab.models.parametrization import apply_parametrization
from scalelab.spec import RunSpec, TrainSpec, config_hash
from scalelab.train.branch import SNAPSHOT_DIR
from scalelab.train.checkpoint import Checkpoint, clean_stale, load_latest, save_checkpoint
from scalelab.train.controls import build_controls, resolve_micro_batch
from scalelab.train.observe import MetricsLogger
from scalelab.train.sinks import hyperparameters
from scalelab.train.trainer import Callback, DivergenceGuard, Trainer

log = logging.getLogger(__name__)

EXIT_CODES = {"done": 0, "diverged": 3, "failed": 1}

#: builds a loader: (store, split, block_tokens, global_batch_size, seed) → iterable of LongTensor batches
LoaderFactory = Callable[[Any, str, int, int, int], Any]


def exit_code(record: dict[str, Any]) -> int:
    """The `scalelab train` exit code of a record: done 0, diverged 3, anything else 1."""
    return EXIT_CODES.get(str(record.get("status")), 1)


def _utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise TrainingError("train.device: 'cuda' requested but no CUDA device is available")
    return torch.device(device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def _torch_settings(threads: int | None, deterministic: bool) -> Iterator[None]:
    """Set torch threads / deterministic algorithms for the run and restore them afterwards."""
    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    old_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    if threads:
        torch.set_num_threads(threads)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_det, warn_only=old_warn)


def default_loader_factory(
    store: Any, split: str, block_tokens: int, global_batch_size: int, seed: int
) -> Any:
    from scalelab.data.loader import BlockLoader

    return BlockLoader(
        store,
        split=split,
        block_tokens=block_tokens,
        global_batch_size=global_batch_size,
        seed=seed,
        rank=0,
        world_size=1,
        num_workers=0,
        prefetch=2,
    )


def blank_record(spec: RunSpec, chash: str, started: str) -> dict[str, Any]:
    """record.json before anything ran: status "failed" until training proves otherwise (docs/contracts.md)."""
    return {
        "run_id": spec.run_id,
        "config_hash": chash,
        "status": "failed",
        "error": None,
        "n_params": None,
        "n_params_total": None,
        "tokens": 0,
        "flops": 0.0,
        "steps": 0,
        "final_train_loss": None,
        "eval_loss": None,
        "wall_seconds": 0.0,
        "tokens_per_second": None,
        "peak_memory_bytes": None,
        "energy_joules": None,
        "energy_note": None,
        "branch": None,
        "micro_batch_size": None,
        "batch_changes": None,
        "started_at": started,
        "finished_at": None,
    }


def fit_into_record(trainer: Trainer, controls: Any, energy: Any, record: dict[str, Any]) -> None:
    """Train to the end (energy metered) and put the outcome — status, error, batch changes — in `record`."""
    energy.start()
    state = trainer.fit()
    record["status"] = state.status
    record["error"] = state.message if state.status != "done" else None
    record.update(controls.record())


def finish_record(
    record: dict[str, Any], trainer: Any, shape: Any, device: Any, energy: Any, wall_seconds: float
) -> None:
    """Fill a run's record from the trainer's final state, the FLOP count, memory, energy and time."""
    if trainer is not None:
        st = trainer.state
        record["steps"] = st.step
        record["tokens"] = st.tokens
        record["final_train_loss"] = _finite(st.loss)
        record["eval_loss"] = _finite(st.eval_loss)
        record["tokens_per_second"] = st.tokens / st.train_seconds if st.train_seconds > 0 else None
    if shape is not None:
        record["flops"] = shape.training_flops(record["tokens"])
    record["peak_memory_bytes"] = peak_memory_bytes(device)
    record["energy_joules"] = energy.joules()
    record["energy_note"] = energy.note
    record["wall_seconds"] = wall_seconds
    record["finished_at"] = _utc_now()


def heldout_batches(
    loader_factory: LoaderFactory, store: Any, context_tokens: int, tokens: int, batch_size: int, seed: int
) -> list[torch.Tensor]:
    """A fixed held-out set: ceil(tokens / context) sequences of context+1 tokens from the store's held-out
    split in the loader's seeded order, read once (batches of at most `batch_size`)."""
    n_seqs = max(1, math.ceil(tokens / context_tokens))
    loader = loader_factory(store, "heldout", context_tokens + 1, min(n_seqs, batch_size), seed)
    batches, have = [], 0
    it = iter(loader)
    try:
        for batch in it:
            batches.append(batch[: n_seqs - have].clone())
            have += batches[-1].shape[0]
            if have >= n_seqs:
                break
    finally:
        close = getattr(it, "close", None)  # stops a prefetch thread
        if close is not None:
            close()
    return batches


def eval_batches_for(
    loader_factory: LoaderFactory, store: Any, spec: RunSpec, seed: int
) -> list[torch.Tensor]:
    """The run's held-out set: train.eval_tokens tokens in micro-batch-sized batches."""
    batch = spec.train.micro_batch_size or spec.train.global_batch_size
    return heldout_batches(
        loader_factory, store, spec.model.context_tokens, spec.train.eval_tokens, batch, seed
    )


@dataclass
class PreparedRun:
    """A run's pieces, built the same way by every training entry point (run_training, in-process sweeps,
    distillation): the seeded model with its parametrization, optimizer groups, loaders, held-out set."""

    train: TrainSpec  # spec.train with micro_batch_size "auto" resolved
    shape: ModelShape
    raw_model: nn.Module
    model: nn.Module  # torch.compile(raw_model) when train.compile
    groups: list[dict[str, Any]]
    total_steps: int
    train_loader: Any
    eval_batches: list[torch.Tensor]


def prepare_run(
    spec: RunSpec, store: Any, loader_factory: LoaderFactory, device: torch.device
) -> PreparedRun:
    """Build `spec`'s model (seeded by train.seed, re-initialised by its parametrization), loaders and
    held-out set on `device`; raises TrainingError when model.vocab_size is smaller than the store's."""
    vocab = spec.model.vocab_size or int(store.vocab_size)
    if vocab < int(store.vocab_size):
        raise TrainingError(
            f"model.vocab_size={vocab} is smaller than the tokenizer's vocabulary "
            f"({store.vocab_size}); leave it unset to use the tokenizer's"
        )
    shape = ModelShape.from_spec(spec.model, vocab)
    data_seed = spec.train.data_seed if spec.train.data_seed is not None else spec.train.seed
    seed_everything(spec.train.seed)
    raw_model = build_model(spec.model, vocab)
    groups = apply_parametrization(raw_model, spec.model)
    raw_model.to(device)
    model = torch.compile(raw_model) if spec.train.compile else raw_model
    train = resolve_micro_batch(spec.train, shape, device, raw_model)
    t = spec.model.context_tokens
    return PreparedRun(
        train=train,
        shape=shape,
        raw_model=raw_model,
        model=model,
        groups=groups,
        total_steps=spec.train.tokens // (spec.train.global_batch_size * t),
        train_loader=loader_factory(store, "train", t + 1, spec.train.global_batch_size, data_seed),
        eval_batches=eval_batches_for(
            loader_factory, store, spec.model_copy(update={"train": train}), data_seed
        ),
    )


def _capture_provenance(spec: RunSpec, store: Any) -> dict[str, Any]:
    try:
        from scalelab.provenance import capture_provenance

        return capture_provenance(spec, store=store)
    except Exception as err:  # noqa: BLE001 — provenance is best effort; it must not fail the run
        log.warning("provenance capture failed: %s", err)
        return {"error": f"{type(err).__name__}: {err}"}


def _existing_config_hash(path: Path) -> str | None:
    """Config hash of the run whose config.json is at `path` (None when there is none or it is unreadable)."""
    try:
        return config_hash(RunSpec.model_validate_json(path.read_text()))
    except (OSError, ValueError):
        return None


def _finite(x: float | None) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


def _branch_point(
    snapshot: Path | str, spec: RunSpec, device: torch.device, metrics_path: Path, record: dict[str, Any]
) -> Checkpoint | None:
    """The trunk snapshot this run starts from; None (train from scratch) when the snapshot does not
    verify. A snapshot of an incompatible run is an error (BranchError), not a silent fallback."""
    from scalelab.train.branch import BranchError, copy_trunk_metrics, load_branch_point

    try:
        point = load_branch_point(Path(snapshot), spec, device)
    except BranchError:
        raise
    except CheckpointError as err:
        log.error("cannot branch, training from scratch: %s", err)
        return None
    copy_trunk_metrics(point, metrics_path)
    record["branch"] = point.describe()
    log.info("branching from %s (run %s, step %d)", snapshot, point.trunk.run_id, point.checkpoint.step)
    return point.checkpoint


def torchrun_world_size() -> int:
    """WORLD_SIZE as torchrun sets it (1 when not under torchrun or when it is not a number)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def under_torchrun(spec: RunSpec) -> RunSpec:
    """`spec` as it trains here: a plain spec (train.strategy 'none') started by torchrun with WORLD_SIZE
    > 1 trains as DDP, like `scalelab launch` does (its run id is that of the ddp spec); other specs, and a
    plain spec that cannot be DDP (noise_scale), are returned as they are."""
    if spec.train.strategy != "none" or torchrun_world_size() <= 1:
        return spec
    data = spec.model_dump()
    data["train"]["strategy"] = "ddp"
    try:
        return RunSpec.model_validate(data)
    except ValueError as err:
        log.warning("cannot train %s as DDP under torchrun: %s", spec.run_id, err)
        return spec


def run_training(
    spec: RunSpec,
    out_dir: Path | str,
    resume: bool = True,
    *,
    store: Any = None,
    loader_factory: LoaderFactory | None = None,
    callbacks: Sequence[Callback] = (),
    snapshot_steps: Sequence[int] = (),
    branch_from: Path | str | None = None,
) -> dict[str, Any]:
    """Train `spec` in `out_dir` and return the record (also written to out_dir/record.json).

    `store` (default: `ensure_store(spec.data)`), `loader_factory` (default: `BlockLoader`) and extra
    `callbacks` are for tests and embedding; the contract is `run_training(spec, out_dir, resume)`.
    `snapshot_steps` / `branch_from`: WSD trunks and branches (module docstring).
    """
    spec = under_torchrun(spec)
    if spec.train.strategy != "none":  # ddp/fsdp: the multi-rank engine (also as a world of one)
        from scalelab.train.parallel.engine import run_distributed

        if snapshot_steps or branch_from is not None:
            log.warning("WSD snapshots and branching are single-process only; %s trains whole", spec.run_id)

        return run_distributed(spec, out_dir, resume, store=store, callbacks=callbacks)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    chash = config_hash(spec)
    record = blank_record(spec, chash, _utc_now())
    existing = _existing_config_hash(out / "config.json")
    if resume and existing is not None and existing != chash:
        # Another config's run directory: refuse without touching any of its files.
        record["error"] = (
            f"CheckpointError: {out} holds the run of config {existing}, not of this config {chash}; "
            "use another output directory or resume=False"
        )
        record["finished_at"] = _utc_now()
        log.error("%s", record["error"])
        return record
    (out / "record.json").unlink(missing_ok=True)
    atomic_write_text(out / "config.json", spec.canonical_json() + "\n")
    device = torch.device("cpu")
    trainer: Trainer | None = None
    shape: ModelShape | None = None
    prior_wall = 0.0
    energy = EnergyMeter("cpu")
    metrics: MetricsLogger | None = None
    controls = None
    try:
        with _torch_settings(spec.train.threads, deterministic=True):
            if torchrun_world_size() > 1:  # under_torchrun could not make it DDP
                raise TrainingError(
                    f"train.strategy='none' with WORLD_SIZE={os.environ['WORLD_SIZE']}: every process would "
                    "train the same run into the same directory, and this spec cannot train as DDP "
                    "(see the warning above); train it in one process"
                )
            device = resolve_device(spec.train.device)
            if device.type == "cuda":
                torch.use_deterministic_algorithms(False)  # costly on GPU; CPU runs stay bitwise exact
            energy = EnergyMeter(device)
            if store is None:
                from scalelab.data.store import ensure_store

                store = ensure_store(spec.data)
            loader_factory = loader_factory or default_loader_factory
            atomic_write_json(
                out / "provenance.json", _capture_provenance(spec, store), indent=1, allow_nan=False
            )

            prepared = prepare_run(spec, store, loader_factory, device)
            shape, raw_model, train = prepared.shape, prepared.raw_model, prepared.train
            record["n_params"], record["n_params_total"] = shape.non_embedding_params, shape.total_params
            record["micro_batch_size"] = train.micro_batch_size or train.global_batch_size
            controls = build_controls(train, out, spec.run_id, params=hyperparameters(spec))
            gemms = model_gemms(
                record["micro_batch_size"] * shape.context_tokens,
                shape.width,
                shape.mlp_hidden,
                shape.vocab_size,
            )
            peak, peak_source = peak_flops(device, spec.train.precision, gemms)
            log.info("MFU reference: %.3g FLOP/s (%s)", peak, peak_source)
            metrics = MetricsLogger(
                out / "metrics.jsonl",
                flops_per_token=shape.training_flops_per_token,
                peak_flops=peak,
                device=device,
                log_interval_steps=spec.train.log_interval_steps,
            )
            ckpt_dir = out / "checkpoint"

            def save_to(directory: Path, keep: int) -> Callable[[Trainer], Path]:
                def save(tr: Trainer) -> Path:
                    js = tr.json_state()
                    js["wall_seconds"] = prior_wall + (time.time() - t_start)
                    js["branch"] = record["branch"]
                    return save_checkpoint(
                        directory,
                        step=tr.state.step,
                        model=raw_model,
                        tensor_state=tr.tensor_state(),
                        json_state=js,
                        config_hash=chash,
                        keep=keep,
                    )

                return save

            trainer = Trainer(
                prepared.model,
                prepared.groups,
                train,
                train_loader=prepared.train_loader,
                total_steps=prepared.total_steps,
                context_tokens=spec.model.context_tokens,
                device=device,
                eval_batches=prepared.eval_batches,
                debug=spec.debug,
                callbacks=[
                    DivergenceGuard(spec.train.divergence_factor),
                    *controls.before_metrics,
                    metrics,
                    *controls.sinks,
                    *callbacks,
                ],
                checkpoint_fn=save_to(ckpt_dir, spec.train.keep_checkpoints),
                raw_model=raw_model,
                snapshot_fn=save_to(out / SNAPSHOT_DIR, len(snapshot_steps) + 1),
                snapshot_steps=snapshot_steps,
            )

            resumed_step = 0
            ckpt = None
            if resume:
                clean_stale(ckpt_dir)
                ckpt = load_latest(ckpt_dir, chash, map_location=device)
            else:
                shutil.rmtree(ckpt_dir, ignore_errors=True)
            if ckpt is not None:
                prior_wall = float(ckpt.json_state.get("wall_seconds", 0.0))
                record["branch"] = ckpt.json_state.get("branch")
                log.info("resuming from %s", ckpt.path)
            elif branch_from is not None:
                ckpt = _branch_point(branch_from, spec, device, metrics.path, record)
            if ckpt is not None:
                ckpt.restore(raw_model)
                trainer.load_state(ckpt.tensor_state, ckpt.json_state)
                resumed_step = ckpt.step
            metrics.truncate_after(resumed_step)

            fit_into_record(trainer, controls, energy, record)
    except Exception as err:  # noqa: BLE001 — every failure becomes a record
        # one paragraph; the traceback only with --debug (docs/trust.md: exit codes)
        log.error("run %s failed: %s", spec.run_id, err, exc_info=log.isEnabledFor(logging.DEBUG))
        record["status"] = "failed"
        record["error"] = f"{type(err).__name__}: {err}"
    finally:
        if metrics is not None:
            metrics.close()
        if controls is not None:
            controls.close_sinks()
    finish_record(record, trainer, shape, device, energy, prior_wall + (time.time() - t_start))
    atomic_write_json(out / "record.json", record, indent=1, allow_nan=False)
    return record
