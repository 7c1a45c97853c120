"""One distributed training run: `run_distributed(spec, out_dir)`, the multi-rank twin of `run_training`.

`run_training` hands a spec with `train.strategy` "ddp" or "fsdp" to this function, so `scalelab train
CONFIG` runs unchanged under torchrun (and, without torchrun, as a world of one with the same checkpoint
format). Every rank builds the same model from the same seed, applies the parametrization, is wrapped by
`parallelize`, and reads its share of every global batch from a `BlockLoader(rank=dp_rank,
world_size=dp_size)`, whose global order does not depend on the world size.

Only rank 0 writes config.json, provenance.json, metrics.jsonl and record.json; checkpoints are sharded
(train/parallel/checkpoint.py) and every rank takes part in writing and reading them. Every rank returns
the record (same status on every rank, so exit codes agree).
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch

from scalelab.errors import DistributedError
from scalelab.hw import EnergyMeter, peak_flops
from scalelab.io import atomic_write_json, atomic_write_text
from scalelab.models.flops import ModelShape
from scalelab.models.gpt import build_model
from scalelab.models.parametrization import apply_parametrization
from scalelab.spec import RunSpec, config_hash
from scalelab.train.controls import Controls, build_controls, resolve_micro_batch
from scalelab.train.distributed import (
    CrossRankMetrics,
    DistContext,
    compile_for_training,
    grad_sync,
    init_distributed,
    param_group_index,
    regroup,
)
from scalelab.train.observe import MetricsLogger
from scalelab.train.parallel import parallelize, trainer_hooks, unwrap
from scalelab.train.parallel.checkpoint import load_latest_sharded, save_sharded
from scalelab.train.parallel.gradnorm import local_grad_norm_source
from scalelab.train.sinks import hyperparameters
from scalelab.train.trainer import Callback, DivergenceGuard, Trainer

log = logging.getLogger(__name__)


def _blank_record(spec: RunSpec, chash: str, started: str) -> dict[str, Any]:
    from scalelab.train.run import blank_record

    return {**blank_record(spec, chash, started), "world_size": None, "strategy": spec.train.strategy}


def run_distributed(
    spec: RunSpec,
    out_dir: Path | str,
    resume: bool = True,
    *,
    store: Any = None,
    callbacks: Sequence[Callback] = (),
) -> dict[str, Any]:
    """Train `spec` on every rank of the torchrun job (or as a world of one); returns the record.

    Rank 0 writes out_dir/record.json (docs/contracts.md keys plus `world_size` and `strategy`).
    """
    from scalelab.train import run as single

    out = Path(out_dir)
    t_start = time.time()
    chash = config_hash(spec)
    record = _blank_record(spec, chash, single._utc_now())
    ctx: DistContext | None = None
    trainer: Trainer | None = None
    shape: ModelShape | None = None
    metrics: MetricsLogger | None = None
    controls: Controls | None = None
    prior_wall = 0.0
    device = torch.device("cpu")
    energy = EnergyMeter("cpu")
    try:
        ctx = init_distributed(spec.train)
        device = ctx.device
        record["world_size"] = ctx.world_size
        refusal = None
        if ctx.is_main:
            out.mkdir(parents=True, exist_ok=True)
            existing = single._existing_config_hash(out / "config.json")
            if resume and existing is not None and existing != chash:
                refusal = (
                    f"CheckpointError: {out} holds the run of config {existing}, not of this config "
                    f"{chash}; use another output directory or resume=False"
                )
            else:
                (out / "record.json").unlink(missing_ok=True)
                atomic_write_text(out / "config.json", spec.canonical_json() + "\n")
        refusal = ctx.broadcast(refusal)
        if refusal:
            record["error"] = refusal
            record["finished_at"] = single._utc_now()
            log.error("%s", refusal)
            ctx.close()
            return record
        with single._torch_settings(spec.train.threads, deterministic=True):
            if device.type == "cuda":
                torch.use_deterministic_algorithms(False)
            energy = EnergyMeter(device)
            store = _open_store(ctx, spec, store)
            if ctx.is_main:
                atomic_write_json(
                    out / "provenance.json",
                    single._capture_provenance(spec, store),
                    indent=1,
                    allow_nan=False,
                )
            trainer, shape, metrics, prior_wall, controls = _build(
                ctx, spec, out, store, chash, resume, callbacks
            )
            record["n_params"], record["n_params_total"] = shape.non_embedding_params, shape.total_params
            record["micro_batch_size"] = trainer.micro_batch_size
            single.fit_into_record(trainer, controls, energy, record)
    except Exception as err:  # noqa: BLE001 — every failure becomes a record
        rank = ctx.rank if ctx else "?"  # one paragraph; the traceback only with --debug
        log.error(
            "run %s failed on rank %s: %s", spec.run_id, rank, err, exc_info=log.isEnabledFor(logging.DEBUG)
        )
        record["status"] = "failed"
        record["error"] = f"{type(err).__name__}: {err}"
    finally:
        if metrics is not None:
            metrics.close()
        if controls is not None:
            controls.close_sinks()
    single.finish_record(record, trainer, shape, device, energy, prior_wall + (time.time() - t_start))
    try:
        if ctx is not None and ctx.is_main:
            atomic_write_json(out / "record.json", record, indent=1, allow_nan=False)
    finally:
        if ctx is not None and record["status"] == "done":
            ctx.close()  # on failure the group may be broken; the process exits anyway
    return record


def _open_store(ctx: DistContext, spec: RunSpec, store: Any) -> Any:
    """Rank 0 builds the token store (once); the others open it after a barrier."""
    if store is not None:
        return store
    from scalelab.data.store import ensure_store

    if ctx.is_main:
        store = ensure_store(spec.data)
    ctx.barrier()
    return store if store is not None else ensure_store(spec.data)


def _build(
    ctx: DistContext,
    spec: RunSpec,
    out: Path,
    store: Any,
    chash: str,
    resume: bool,
    extra_callbacks: Sequence[Callback],
) -> tuple[Trainer, ModelShape, MetricsLogger | None, float, Controls]:
    """Model, wrapping, loader, callbacks, trainer; restored from the newest committed checkpoint."""
    from scalelab.data.loader import BlockLoader
    from scalelab.train import run as single

    train = spec.train
    vocab = spec.model.vocab_size or int(store.vocab_size)
    if vocab < int(store.vocab_size):
        raise DistributedError(
            f"model.vocab_size={vocab} is smaller than the tokenizer's vocabulary ({store.vocab_size})"
        )
    shape = ModelShape.from_spec(spec.model, vocab)
    if train.micro_batch_size == "auto":  # rank 0's memory estimate, so every rank accumulates alike
        micro = resolve_micro_batch(train, shape, ctx.device, None, ctx.dp_size).micro_batch_size
        train = train.model_copy(update={"micro_batch_size": ctx.broadcast(micro)})
        spec = spec.model_copy(update={"train": train})
    total_steps = train.tokens // (train.global_batch_size * spec.model.context_tokens)
    data_seed = train.data_seed if train.data_seed is not None else train.seed
    if train.global_batch_size % ctx.dp_size:
        raise DistributedError(
            f"train.global_batch_size={train.global_batch_size} is not divisible by the data-parallel "
            f"size {ctx.dp_size} (WORLD_SIZE={ctx.world_size} / tensor × pipeline parallel)"
        )

    single.seed_everything(train.seed)
    raw_model = build_model(spec.model, vocab)
    groups = apply_parametrization(raw_model, spec.model)
    index = param_group_index(raw_model, groups)
    raw_model.to(ctx.device)
    pipelined = train.pipeline_parallel > 1
    model = parallelize(raw_model, ctx.mesh, train)
    groups = regroup(model, groups, index)
    hooks = trainer_hooks(model, ctx.mesh, train, ctx.device)

    t = spec.model.context_tokens
    loader = BlockLoader(
        store,
        split="train",
        block_tokens=t + 1,
        global_batch_size=train.global_batch_size,
        seed=data_seed,
        rank=ctx.dp_rank,
        world_size=ctx.dp_size,
        num_workers=0,
        prefetch=2,
    )
    eval_batches = single.eval_batches_for(single.default_loader_factory, store, spec, data_seed)
    peak = None
    if ctx.is_main:  # only rank 0 logs MFU; the others need not measure (nor race on the cache file)
        peak, peak_source = peak_flops(ctx.device, train.precision)
        log.info("MFU reference: %.3g FLOP/s per rank (%s)", peak, peak_source)

    controls = build_controls(train, out, spec.run_id, ctx.is_main, hyperparameters(spec))
    callbacks: list[Callback] = [
        CrossRankMetrics(group=None, grad_norm_source=local_grad_norm_source(model)),
        DivergenceGuard(train.divergence_factor),
        *controls.before_metrics,
    ]
    metrics = None
    if ctx.is_main:
        metrics = MetricsLogger(
            out / "metrics.jsonl",
            flops_per_token=shape.training_flops_per_token,
            peak_flops=peak * ctx.world_size if peak else None,
            device=ctx.device,
            log_interval_steps=train.log_interval_steps,
        )
        callbacks.append(metrics)
    callbacks.extend(controls.sinks)
    callbacks.extend(extra_callbacks)

    ckpt_dir = out / "checkpoint"
    clock = {"start": time.time(), "prior_wall": 0.0}

    def save(tr: Trainer) -> Path:
        js = tr.json_state()
        js["scaler"] = tr.scaler.state_dict()
        js["wall_seconds"] = clock["prior_wall"] + (time.time() - clock["start"])
        js["world_size"] = ctx.world_size
        return save_sharded(
            ctx,
            ckpt_dir,
            step=tr.state.step,
            model=model,
            optimizer=tr.optimizer,
            json_state=js,
            config_hash=chash,
            keep=train.keep_checkpoints,
        )

    trainer = Trainer(
        compile_for_training(model, train, pipelined=pipelined),
        groups,
        train,
        train_loader=loader,
        total_steps=total_steps,
        context_tokens=t,
        device=ctx.device,
        eval_batches=eval_batches,
        debug=spec.debug,
        callbacks=callbacks,
        checkpoint_fn=save,
        raw_model=unwrap(model),
        world_size=ctx.dp_size,
        grad_sync=partial(grad_sync, model),
        **hooks,
    )
    prior_wall = 0.0
    resumed_step = 0
    if resume:
        loaded = load_latest_sharded(ctx, ckpt_dir, chash, model, trainer.optimizer)
        if loaded is not None:
            trainer.scaler.load_state_dict(loaded.json_state.get("scaler") or {})
            trainer.load_json_state(loaded.json_state)
            prior_wall = float(loaded.json_state.get("wall_seconds", 0.0))
            resumed_step = loaded.step
    elif ctx.is_main:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    ctx.barrier()
    clock["prior_wall"] = prior_wall
    if metrics is not None:
        metrics.truncate_after(resumed_step)
    return trainer, shape, metrics, prior_wall, controls
