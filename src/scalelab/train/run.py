"""One training run, end to end: `run_training(spec, out_dir)` → record.json (see docs/contracts.md).

The run directory:
  config.json      canonical RunSpec (the run id is its hash)
  provenance.json  code, packages, hardware, data fingerprint, seeds
  metrics.jsonl    one JSON object per step / eval (train/observe.py)
  checkpoint/      step-NNNNNN/ directories, written atomically (train/checkpoint.py)
  record.json      the result, written atomically — also when the run fails or diverges

One lifecycle for 1 or N ranks. `train.strategy` "ddp"/"fsdp" runs (under torchrun, or as a world of
one) go through the same steps on every rank — claim the directory, open the store, assemble the run
(`train/build.py`: the layout applied from outside), train, record — with rank 0 writing the files, the
cross-rank metrics as the first callback, and sharded checkpoints that every rank writes and reads
(train/parallel/checkpoint.py) instead of one file.

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
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch

from scalelab.energy import EnergyMeter
from scalelab.errors import CheckpointError, TrainingError
from scalelab.hw import peak_flops, peak_memory_bytes, step_gemms
from scalelab.io import atomic_write_json, atomic_write_text
from scalelab.models.flops import ModelShape
from scalelab.provenance import utc_now
from scalelab.record import RunRecord
from scalelab.spec import RunSpec, config_hash
from scalelab.train.branch import SNAPSHOT_DIR
from scalelab.train.build import LoaderFactory, PreparedRun, prepare_run, resolve_device
from scalelab.train.checkpoint import Checkpoint, clean_stale, load_latest, save_checkpoint
from scalelab.train.controls import build_controls
from scalelab.train.observe import MetricsLogger
from scalelab.train.sinks import hyperparameters
from scalelab.train.trainer import Callback, DivergenceGuard, Trainer

log = logging.getLogger(__name__)

EXIT_CODES = {"done": 0, "diverged": 3, "failed": 1}


def exit_code(record: dict[str, Any]) -> int:
    """The `scalelab train` exit code of a record: done 0, diverged 3, anything else 1."""
    return EXIT_CODES.get(str(record.get("status")), 1)


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


def fit_into_record(trainer: Trainer, controls: Any, energy: Any, record: RunRecord) -> None:
    """Train to the end (energy metered) and put the outcome — status, error, batch changes — in `record`."""
    energy.start()
    state = trainer.fit()
    record.status = state.status
    record.error = state.message if state.status != "done" else None
    record.batch_changes = controls.record().get("batch_changes", record.batch_changes)


def finish_record(
    record: RunRecord, trainer: Any, shape: Any, device: Any, energy: Any, wall_seconds: float
) -> None:
    """Fill a run's record from the trainer's final state, the FLOP count, memory, energy and time."""
    if trainer is not None:
        st = trainer.state
        record.steps = st.step
        record.tokens = st.tokens
        record.final_train_loss = _finite(st.loss)
        record.eval_loss = _finite(st.eval_loss)
        record.tokens_per_second = st.tokens / st.train_seconds if st.train_seconds > 0 else None
    if shape is not None:
        record.flops = shape.training_flops(record.tokens)
    record.peak_memory_bytes = peak_memory_bytes(device)
    record.energy_joules = energy.joules()  # first: a failed read makes the source "unavailable"
    record.energy_source = energy.energy_source
    record.energy_note = energy.note
    record.wall_seconds = wall_seconds
    record.finished_at = utc_now()


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
    snapshot: Path | str, spec: RunSpec, device: torch.device, metrics_path: Path, record: RunRecord
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
    record.branch = point.describe()
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


class FileCheckpoints:
    """One process: the whole run state in one checkpoint directory per step (train/checkpoint.py)."""

    def __init__(self, prepared: PreparedRun, chash: str, device: torch.device) -> None:
        self.prepared, self.chash, self.device = prepared, chash, device

    def save(self, trainer: Trainer, directory: Path, keep: int, json_state: dict[str, Any]) -> Path:
        return save_checkpoint(
            directory,
            step=trainer.state.step,
            model=self.prepared.raw_model,
            tensor_state=trainer.tensor_state(),
            json_state=json_state,
            config_hash=self.chash,
            keep=keep,
        )

    def latest(self, directory: Path, trainer: Trainer) -> Checkpoint | None:
        clean_stale(directory)
        return load_latest(directory, self.chash, map_location=self.device)

    def restore(self, ckpt: Checkpoint, trainer: Trainer) -> None:
        ckpt.restore(self.prepared.raw_model)
        trainer.load_state(ckpt.tensor_state, ckpt.json_state)


class ShardedCheckpoints:
    """N ranks: every rank writes and reads its shards (train/parallel/checkpoint.py); collective calls.
    Restoring happens while loading (model and optimizer in place)."""

    def __init__(self, prepared: PreparedRun, chash: str, ranks: Any) -> None:
        self.prepared, self.chash, self.ranks = prepared, chash, ranks

    def save(self, trainer: Trainer, directory: Path, keep: int, json_state: dict[str, Any]) -> Path:
        from scalelab.train.parallel.checkpoint import save_sharded

        json_state = {
            **json_state,
            "scaler": trainer.scaler.state_dict(),
            "world_size": self.ranks.world_size,
        }
        return save_sharded(
            self.ranks,
            directory,
            step=trainer.state.step,
            model=self.prepared.parallel_model,
            optimizer=trainer.optimizer,
            json_state=json_state,
            config_hash=self.chash,
            keep=keep,
        )

    def latest(self, directory: Path, trainer: Trainer) -> Any:
        from scalelab.train.parallel.checkpoint import load_latest_sharded

        return load_latest_sharded(
            self.ranks, directory, self.chash, self.prepared.parallel_model, trainer.optimizer
        )

    def restore(self, loaded: Any, trainer: Trainer) -> None:
        trainer.scaler.load_state_dict(loaded.json_state.get("scaler") or {})
        trainer.load_json_state(loaded.json_state)


def _claim(out: Path, spec: RunSpec, chash: str, resume: bool) -> str | None:
    """Take `out` for this run (config.json written, an old record.json removed); the refusal message when
    it holds another config's run and `resume` — then nothing in it is touched."""
    out.mkdir(parents=True, exist_ok=True)
    existing = _existing_config_hash(out / "config.json")
    if resume and existing is not None and existing != chash:
        return (
            f"CheckpointError: {out} holds the run of config {existing}, not of this config {chash}; "
            "use another output directory or resume=False"
        )
    (out / "record.json").unlink(missing_ok=True)
    atomic_write_text(out / "config.json", spec.canonical_json() + "\n")
    return None


def _open_store(ranks: Any, spec: RunSpec, store: Any) -> Any:
    """The run's token store: built once by rank 0 (the others open it after a barrier)."""
    if store is not None:
        return store
    from scalelab.data.store import ensure_store

    if ranks.is_main:
        store = ensure_store(spec.data)
    ranks.barrier()
    return store if store is not None else ensure_store(spec.data)


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
    """Train `spec` in `out_dir` on this process's rank(s) and return the record (rank 0 also writes it to
    out_dir/record.json; every rank returns the same status, so exit codes agree).

    `store` (default: `ensure_store(spec.data)`), `loader_factory` (default: `BlockLoader`; one process
    only) and extra `callbacks` are for tests and embedding; the contract is
    `run_training(spec, out_dir, resume)`. `snapshot_steps` / `branch_from`: WSD trunks and branches
    (module docstring; one process only).
    """
    spec = under_torchrun(spec)
    distributed = spec.train.strategy in ("ddp", "fsdp")  # a process group (also as a world of one)
    if distributed and (snapshot_steps or branch_from is not None):
        log.warning("WSD snapshots and branching are single-process only; %s trains whole", spec.run_id)
        snapshot_steps, branch_from = (), None
    out = Path(out_dir)
    t_start = time.time()
    chash = config_hash(spec)
    record = RunRecord(spec.run_id, chash, strategy=spec.train.strategy, started_at=utc_now())
    if not distributed:
        refusal = _claim(out, spec, chash, resume)
        if refusal:
            return _refused(record, refusal)
    ranks: Any = None
    claimed = not distributed
    device = torch.device("cpu")
    prepared: PreparedRun | None = None
    trainer: Trainer | None = None
    energy = EnergyMeter("cpu")
    metrics: MetricsLogger | None = None
    controls = None
    wall = {"prior": 0.0}
    try:
        if distributed:
            from scalelab.train.distributed import init_distributed

            ranks = init_distributed(spec.train)
            record.world_size = ranks.world_size
            refusal = ranks.broadcast(_claim(out, spec, chash, resume) if ranks.is_main else None)
            if refusal:
                ranks.close()
                return _refused(record, refusal)
            claimed = True
        with _torch_settings(spec.train.threads, deterministic=True):
            if not distributed:
                from scalelab.train.distributed import SingleProcess

                if torchrun_world_size() > 1:  # under_torchrun could not make it DDP
                    raise TrainingError(
                        f"train.strategy='none' with WORLD_SIZE={os.environ['WORLD_SIZE']}: every process "
                        "would train the same run into the same directory, and this spec cannot train as "
                        "DDP (see the warning above); train it in one process"
                    )
                ranks = SingleProcess(resolve_device(spec.train.device))
            device = ranks.device
            if device.type == "cuda":
                torch.use_deterministic_algorithms(False)  # costly on GPU; CPU runs stay bitwise exact
            energy = EnergyMeter(device)
            store = _open_store(ranks, spec, store)
            if ranks.is_main:
                provenance = _capture_provenance(spec, store)
                atomic_write_json(out / "provenance.json", provenance, indent=1, allow_nan=False)

            prepared = prepare_run(spec, store, loader_factory, device, ranks if distributed else None)
            shape, train = prepared.shape, prepared.train
            record.n_params, record.n_params_total = shape.non_embedding_params, shape.total_params
            record.micro_batch_size = train.micro_batch_size or train.global_batch_size
            controls = build_controls(train, out, spec.run_id, ranks.is_main, hyperparameters(spec))
            if ranks.is_main:  # only rank 0 logs MFU; the others need not measure (nor race on the cache)
                metrics = _metrics_logger(out, spec, shape, record.micro_batch_size, device, ranks)
            checkpoints: Any = (
                ShardedCheckpoints(prepared, chash, ranks)
                if distributed
                else FileCheckpoints(prepared, chash, device)
            )

            def save_to(directory: Path, keep: int) -> Callable[[Trainer], Path]:
                def save(tr: Trainer) -> Path:
                    js = tr.json_state()
                    js["wall_seconds"] = wall["prior"] + (time.time() - t_start)
                    js["branch"] = record.branch
                    return checkpoints.save(tr, directory, keep, js)

                return save

            first: list[Callback] = []
            extra: dict[str, Any] = dict(prepared.trainer_kwargs)
            if distributed:
                from scalelab.train.distributed import CrossRankMetrics, grad_sync
                from scalelab.train.parallel.gradnorm import local_grad_norm_source

                first = [CrossRankMetrics(grad_norm_source=local_grad_norm_source(prepared.parallel_model))]
                extra |= {
                    "world_size": ranks.dp_size,
                    "grad_sync": partial(grad_sync, prepared.parallel_model),
                }
            ckpt_dir = out / "checkpoint"
            trainer_cls: Any = Trainer
            if spec.train.strategy == "async_ps":  # updates on Ray actors (train/parallel/async_ps.py)
                from scalelab.train.parallel.async_ps import AsyncPSTrainer

                trainer_cls = partial(AsyncPSTrainer, spec=spec, vocab=shape.vocab_size)
                record.world_size = spec.train.async_ps.workers
            trainer = trainer_cls(
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
                    *first,
                    DivergenceGuard(spec.train.divergence_factor),
                    *controls.before_metrics,
                    *([metrics] if metrics is not None else []),
                    *controls.sinks,
                    *callbacks,
                ],
                checkpoint_fn=save_to(ckpt_dir, spec.train.keep_checkpoints),
                raw_model=prepared.raw_model,
                snapshot_fn=save_to(out / SNAPSHOT_DIR, len(snapshot_steps) + 1),
                snapshot_steps=snapshot_steps,
                **extra,
            )
            resumed = _resume(checkpoints, ckpt_dir, trainer, resume, ranks, record, wall)
            if resumed is None and branch_from is not None:
                point = _branch_point(branch_from, spec, device, out / "metrics.jsonl", record)
                if point is not None:
                    checkpoints.restore(point, trainer)
                    resumed = point.step
            if metrics is not None:
                metrics.truncate_after(resumed or 0)
            fit_into_record(trainer, controls, energy, record)
    except Exception as err:  # noqa: BLE001 — every failure becomes a record
        # one paragraph; the traceback only with --debug (docs/trust.md: exit codes)
        rank = f" on rank {ranks.rank}" if distributed and ranks is not None else ""
        log.error("run %s failed%s: %s", spec.run_id, rank, err, exc_info=log.isEnabledFor(logging.DEBUG))
        record.status = "failed"
        record.error = f"{type(err).__name__}: {err}"
    finally:
        if metrics is not None:
            metrics.close()
        if controls is not None:
            controls.close_sinks()
    shape = prepared.shape if prepared is not None else None
    finish_record(record, trainer, shape, device, energy, wall["prior"] + (time.time() - t_start))
    if distributed and ranks is not None and record.status == "done":  # a collective: healthy groups only
        _energy_of_all_ranks(record, energy, ranks)
    try:
        if claimed and (ranks is None or ranks.is_main):
            atomic_write_json(out / "record.json", record.to_json(), indent=1, allow_nan=False)
    finally:
        if distributed and ranks is not None and record.status == "done":
            ranks.close()  # on failure the group may be broken; the process exits anyway
    return record.to_json()


def _refused(record: RunRecord, refusal: str) -> dict[str, Any]:
    """The record of a run refused its directory: nothing written there."""
    record.error = refusal
    record.finished_at = utc_now()
    log.error("%s", refusal)
    return record.to_json()


def _energy_of_all_ranks(record: RunRecord, energy: EnergyMeter, ranks: Any) -> None:
    """The record's energy as the sum of every rank's meter: each process or device once, a node-wide
    counter (RAPL) once per node; unavailable when any rank has none."""
    mine = (record.energy_joules, energy.scope, ranks.local_rank, record.energy_source)
    counted = [m for m in ranks.gather(mine) if m[1] != "node" or m[2] == 0]
    if any(joules is None for joules, *_ in counted):
        record.energy_joules, record.energy_source = None, "unavailable"
        return
    record.energy_joules = float(sum(joules for joules, *_ in counted))
    sources = {source for *_, source in counted}
    record.energy_source = "estimated" if "estimated" in sources else sources.pop()
    record.energy_note = f"sum over {len(counted)} meters ({energy.scope}): {record.energy_note}"


def _metrics_logger(
    out: Path, spec: RunSpec, shape: ModelShape, micro_batch: int, device: torch.device, ranks: Any
) -> MetricsLogger:
    """metrics.jsonl, with MFU against the peak measured on the run's own GEMM shapes (× world size)."""
    peak, peak_source = peak_flops(device, spec.train.precision, step_gemms(shape, micro_batch))
    log.info("MFU reference: %.3g FLOP/s per rank (%s)", peak, peak_source)
    return MetricsLogger(
        out / "metrics.jsonl",
        flops_per_token=shape.training_flops_per_token,
        peak_flops=peak * ranks.world_size if peak else None,
        device=device,
        log_interval_steps=spec.train.log_interval_steps,
    )


def _resume(
    checkpoints: Any,
    ckpt_dir: Path,
    trainer: Trainer,
    resume: bool,
    ranks: Any,
    record: RunRecord,
    wall: dict[str, float],
) -> int | None:
    """Restore the newest checkpoint when resuming (its step), or discard old ones (None)."""
    found = None
    if resume:
        found = checkpoints.latest(ckpt_dir, trainer)
    elif ranks.is_main:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    ranks.barrier()
    if found is None:
        return None
    wall["prior"] = float(found.json_state.get("wall_seconds", 0.0))
    record.branch = found.json_state.get("branch")
    log.info("resuming from %s", found.path)
    checkpoints.restore(found, trainer)
    return int(found.step)
