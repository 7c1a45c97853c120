"""The one place a run is assembled — seeded model, parametrization, parallel layout, optimizer groups,
loaders and held-out set — for training (1 or N ranks), in-process sweeps, distillation and benchmarks.

`prepare_run(spec, store, device)` gives a `PreparedRun`; under a distributed context (`ranks` with a
device mesh) the model is also made parallel from outside (`scalelab.train.parallel.parallelize`), the
optimizer groups are carried over by parameter name, every rank reads its share of each global batch,
and an "auto" micro-batch is rank 0's choice. The held-out set is the same on every rank.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from scalelab.errors import TrainingError
from scalelab.models.flops import ModelShape
from scalelab.models.parametrization import apply_parametrization
from scalelab.models.registry import build_model
from scalelab.spec import ModelSpec, RunSpec, TrainSpec
from scalelab.train.controls import resolve_micro_batch

#: builds a loader: (store, split, block_tokens, global_batch_size, seed) → iterable of LongTensor batches
LoaderFactory = Callable[[Any, str, int, int, int], Any]


def resolve_device(device: str) -> torch.device:
    """`train.device` as a torch device ("auto": CUDA when available); TrainingError when CUDA is missing."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise TrainingError("train.device: 'cuda' requested but no CUDA device is available")
    return torch.device(device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def block_loader_factory(rank: int = 0, world_size: int = 1) -> LoaderFactory:
    """A `LoaderFactory` of `BlockLoader`s reading rank `rank`'s share of every global batch."""

    def make(store: Any, split: str, block_tokens: int, global_batch_size: int, seed: int) -> Any:
        from scalelab.data.loader import BlockLoader

        return BlockLoader(
            store,
            split=split,
            block_tokens=block_tokens,
            global_batch_size=global_batch_size,
            seed=seed,
            rank=rank,
            world_size=world_size,
            num_workers=0,
            prefetch=2,
        )

    return make


#: the single-process loader (rank 0 of 1): whole global batches
default_loader_factory: LoaderFactory = block_loader_factory()


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
    """A run's pieces, built the same way by every entry point."""

    train: TrainSpec  # spec.train with micro_batch_size "auto" resolved
    shape: ModelShape
    raw_model: nn.Module  # the parameters' owner (whole model, or this rank's pipeline stage): saved
    parallel_model: nn.Module  # what `parallelize` returned (= raw_model in one process): grad sync
    model: nn.Module  # what the trainer calls: parallel_model, compiled when train.compile
    groups: list[dict[str, Any]]
    total_steps: int
    train_loader: Any
    eval_batches: list[torch.Tensor]
    trainer_kwargs: dict[str, Any] = field(default_factory=dict)  # what the layout changes in a step


def build_parametrized(
    model_spec: ModelSpec, vocab: int, device: torch.device
) -> tuple[nn.Module, list[dict[str, Any]]]:
    """The spec's model with its parametrization applied (init, multipliers) on `device`, and its optimizer
    groups; seed first for reproducible weights. Used by runs and by throughput forecasts alike."""
    model = build_model(model_spec, vocab)
    groups = apply_parametrization(model, model_spec)
    return model.to(device), groups


def check_vocab(spec: RunSpec, store: Any) -> int:
    """The model's vocabulary size (the tokenizer's unless the spec fixes a larger one)."""
    vocab = spec.model.vocab_size or int(store.vocab_size)
    if vocab < int(store.vocab_size):
        raise TrainingError(
            f"model.vocab_size={vocab} is smaller than the tokenizer's vocabulary "
            f"({store.vocab_size}); leave it unset to use the tokenizer's"
        )
    return vocab


def prepare_run(
    spec: RunSpec,
    store: Any,
    loader_factory: LoaderFactory | None,
    device: torch.device,
    ranks: Any = None,
) -> PreparedRun:
    """Build `spec`'s run on `device`: model seeded by train.seed and re-initialised by its parametrization,
    made parallel over `ranks.mesh` when `ranks` is a distributed context, loaders and held-out set.
    `loader_factory` (single process only; default `BlockLoader`) is for tests and embedding."""
    distributed = ranks is not None and getattr(ranks, "mesh", None) is not None
    vocab = check_vocab(spec, store)
    shape = ModelShape.from_spec(spec.model, vocab)
    train = spec.train
    if distributed:
        from scalelab.errors import DistributedError

        if train.global_batch_size % ranks.dp_size:
            raise DistributedError(
                f"train.global_batch_size={train.global_batch_size} is not divisible by the data-parallel "
                f"size {ranks.dp_size} (WORLD_SIZE={ranks.world_size} / tensor × pipeline parallel)"
            )
        if train.micro_batch_size == "auto":  # rank 0's estimate, so every rank accumulates alike
            micro = resolve_micro_batch(train, shape, device, None, ranks.dp_size).micro_batch_size
            train = train.model_copy(update={"micro_batch_size": ranks.broadcast(micro)})
    data_seed = train.data_seed if train.data_seed is not None else train.seed
    seed_everything(train.seed)
    raw_model, groups = build_parametrized(spec.model, vocab, device)
    parallel_model, hooks = raw_model, {}
    if distributed:
        from scalelab.train.distributed import compile_for_training, param_group_index, regroup
        from scalelab.train.parallel import parallelize, trainer_hooks, unwrap

        index = param_group_index(raw_model, groups)
        parallel_model = parallelize(raw_model, ranks.mesh, train)
        groups = regroup(parallel_model, groups, index)
        hooks = trainer_hooks(parallel_model, ranks.mesh, train, device)
        raw_model = unwrap(parallel_model)
        model = compile_for_training(parallel_model, train, pipelined=train.pipeline_parallel > 1)
        train_factory = block_loader_factory(ranks.dp_rank, ranks.dp_size)
    else:
        model = torch.compile(raw_model) if train.compile else raw_model
        train = resolve_micro_batch(train, shape, device, raw_model)
        train_factory = loader_factory or default_loader_factory
    eval_factory = default_loader_factory if distributed else train_factory
    t = spec.model.context_tokens
    return PreparedRun(
        train=train,
        shape=shape,
        raw_model=raw_model,
        parallel_model=parallel_model,
        model=model,
        groups=groups,
        total_steps=train.tokens // (train.global_batch_size * t),
        train_loader=train_factory(store, "train", t + 1, train.global_batch_size, data_seed),
        eval_batches=eval_batches_for(
            eval_factory, store, spec.model_copy(update={"train": train}), data_seed
        ),
        trainer_kwargs=hooks,
    )
