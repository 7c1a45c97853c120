"""Sharded checkpoints of distributed runs: `torch.distributed.checkpoint` (DCP) in safetensors, committed
atomically, read without unpickling anything.

Layout of `<run>/checkpoint/step-000123/`:
  weights/       DCP through its safetensors storage (`HuggingFaceStorageWriter(save_distributed=True)`):
                 one `shard-0000R-model-00001-of-00001.safetensors` per writing rank, holding model and
                 optimizer tensors by path ("model/<param>", "optim/state/<param>/exp_avg", …) with each
                 shard's offsets in its JSON header. There is no pickled `.metadata`: the reader rebuilds
                 DCP's metadata from the safetensors headers, and tensors are read with `safe_open`.
  state.json     plain values: step, tokens, loader position (world-size independent), callbacks, scaler,
                 python/numpy RNG
  rng.safetensors  torch RNG states (rank 0's; every rank is seeded alike and draws alike)
  manifest.json  format "dcp", step, config hash, world size, bytes and sha256 of every file, and its own
                 sha256 — written last

Optimizer hyper-parameters (param_groups: lr, betas, …) are not stored: they follow from the config,
which the manifest's config hash pins, and the trainer sets the learning rate from the step.

Commit protocol: rank 0 names a temporary directory `.tmp-step-…` and broadcasts it; every rank writes its
shards with `dcp.save`; after a barrier rank 0 writes state.json, rng.safetensors and the manifest, fsyncs,
and renames the directory to `step-NNNNNN` (os.replace, then fsync of checkpoint/). A directory that does
not start with `step-` is never read, so a checkpoint being written when a rank is killed is never loaded;
`load_latest_sharded` (rank 0 verifies every file's sha256 and chooses, every rank follows) takes the
newest step directory that verifies and skips damaged ones.

Resharding: DCP stores tensors by name with their global shapes and offsets, so a checkpoint written by K
ranks loads at any other world size and strategy layout (DDP replicas, FSDP shards), and into a plain
model in one process without a process group (`read_full_weights`, used to serve a sharded run); the
loader position is a count of global batches, so the data order continues unchanged.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from scalelab.errors import CheckpointError
from scalelab.io import fsync_dir
from scalelab.train.checkpoint import (
    CheckpointConfigMismatch,
    capture_rng,
    clean_stale,
    file_table,
    list_checkpoints,
    read_manifest,
    restore_rng,
    step_dir_name,
    verify_files,
    write_manifest,
)
from scalelab.train.tensorstate import contiguous_cpu, join_tensors, split_tensors, unique_tensors

log = logging.getLogger(__name__)

FORMAT = "dcp"
FORMAT_VERSION = 2  # 1 had DCP's pickled .metadata and torch.save'd shards; it is not read any more
WEIGHTS_DIR = "weights"
_REQUIRED = ("state.json", "rng.safetensors")


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(Path(dirpath) / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(dirpath)


def _state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optimizer)
    return {"model": msd, "optim": osd}


def _weights_dir(path: Path) -> str:
    return str(path / WEIGHTS_DIR)


def _dcp_load(tensors: dict[str, torch.Tensor], path: Path, *, local: bool = False) -> None:
    """Fill `tensors` (plain or DTensor, by key) in place from the safetensors shards under `path`;
    `local`: this process alone (no collective), into full tensors."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

    try:
        dcp.load(tensors, storage_reader=HuggingFaceStorageReader(_weights_dir(path)), no_dist=local)
    except (Exception, CheckpointException) as err:  # noqa: BLE001 — any rank's failure, wrapped by DCP
        raise CheckpointError(
            f"{path / WEIGHTS_DIR}: the sharded weights do not fit this model ({type(err).__name__}: "
            f"{str(err)[:400]})"
        ) from None


def save_sharded(
    ctx: Any,
    ckpt_dir: Path,
    *,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    json_state: dict[str, Any],
    config_hash: str,
    keep: int = 2,
) -> Path:
    """Collective: every rank calls it. Writes `step-NNNNNN/` atomically (see module docstring)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    ckpt_dir = Path(ckpt_dir)
    final = ckpt_dir / step_dir_name(step)
    name = f".tmp-{step_dir_name(step)}-{os.getpid()}-{time.monotonic_ns()}" if ctx.is_main else None
    name = ctx.broadcast(name)
    tmp = ckpt_dir / name
    if ctx.is_main:
        tmp.mkdir(parents=True)
    ctx.barrier()
    tensors, _ = unique_tensors(split_tensors(_state_dicts(model, optimizer))[1])  # tied weights once
    dcp.save(tensors, storage_writer=HuggingFaceStorageWriter(_weights_dir(tmp), save_distributed=True))
    ctx.barrier()
    error = None
    if ctx.is_main:
        try:
            _commit(tmp, final, step=step, json_state=json_state, config_hash=config_hash, ctx=ctx)
            for _, old in list_checkpoints(ckpt_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
        except Exception as err:  # noqa: BLE001 — re-raised on every rank below
            shutil.rmtree(tmp, ignore_errors=True)
            error = f"{final}: commit failed ({type(err).__name__}: {err})"
    error = ctx.broadcast(error)
    if error:
        raise CheckpointError(error)
    log.info("sharded checkpoint %s written", final)
    return final


def _commit(
    tmp: Path, final: Path, *, step: int, json_state: dict[str, Any], config_hash: str, ctx: Any
) -> None:
    rng_plain, rng_tensors = capture_rng()
    skeleton, flat = split_tensors(rng_tensors)
    save_file(contiguous_cpu(flat), str(tmp / "rng.safetensors"))
    state = {**json_state, "rng": rng_plain, "rng_skeleton": skeleton}
    (tmp / "state.json").write_text(json.dumps(state, allow_nan=True))
    _fsync_tree(tmp)
    names = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "step": step,
        "config_hash": config_hash,
        "world_size": ctx.world_size,
        "files": file_table(tmp, names),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_manifest(tmp / "manifest.json", manifest)
    _fsync_tree(tmp)
    if final.exists():  # re-saving a step after a resume: move the old one out of the way first
        trash = final.parent / f".old-{final.name}-{time.monotonic_ns()}"
        os.replace(final, trash)
        shutil.rmtree(trash, ignore_errors=True)
    os.replace(tmp, final)
    fsync_dir(final.parent)


def verify_sharded(path: Path, config_hash: str) -> dict[str, Any]:
    """The manifest of a committed sharded checkpoint after checking every file's size and sha256.

    Every file under weights/ must be in the manifest: the DCP reader reads all shard files there, so an
    unlisted one (planted, or left over) would be read unchecked."""
    manifest = read_manifest(path, config_hash, expected_format=FORMAT, format_version=FORMAT_VERSION)
    files = manifest["files"]
    verify_files(path, files, required=_REQUIRED)
    present = {p.relative_to(path).as_posix() for p in (path / WEIGHTS_DIR).rglob("*")}
    unlisted = sorted(present - set(files))
    if unlisted or not any(name.startswith(f"{WEIGHTS_DIR}/") for name in files):
        raise CheckpointError(
            f"{path / WEIGHTS_DIR}: files not covered by the manifest ({', '.join(unlisted[:3]) or 'no shards'})"
        )
    return manifest


def committed_candidates(ckpt_dir: Path, config_hash: str) -> list[Path]:
    """Committed checkpoints that verify, newest first (damaged ones are logged and skipped; another
    config raises CheckpointConfigMismatch)."""
    out = []
    for _, path in reversed(list_checkpoints(Path(ckpt_dir))):
        try:
            verify_sharded(path, config_hash)
            out.append(path)
        except CheckpointConfigMismatch:
            raise
        except CheckpointError as err:
            log.error("skipping checkpoint: %s", err)
    return out


def latest_committed(ckpt_dir: Path, config_hash: str) -> Path | None:
    """Newest committed checkpoint that verifies (see `committed_candidates`)."""
    found = committed_candidates(ckpt_dir, config_hash)
    return found[0] if found else None


@dataclass
class LoadedSharded:
    """What `load_latest_sharded` restored: model and optimizer are loaded in place."""

    path: Path
    step: int
    json_state: dict[str, Any]


def _read_small_state(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(json_state, torch RNG tensors) of a verified checkpoint; CheckpointError if undecodable."""
    try:
        json_state = json.loads((path / "state.json").read_text())
        rng = join_tensors(json_state.pop("rng_skeleton"), load_file(str(path / "rng.safetensors")))
        json_state["rng"]  # noqa: B018 — must be present
    except Exception as err:  # noqa: BLE001 — any decoding failure makes this checkpoint unusable
        raise CheckpointError(f"{path}: cannot be decoded ({type(err).__name__}: {err})") from None
    return json_state, rng


def load_latest_sharded(
    ctx: Any, ckpt_dir: Path, config_hash: str, model: nn.Module, optimizer: torch.optim.Optimizer
) -> LoadedSharded | None:
    """Collective: restore model, optimizer and RNG from the newest committed checkpoint (None if none).

    Rank 0 removes stale temporary directories and lists the checkpoints that verify; every rank tries
    them newest first. One that verifies but cannot be decoded (a forged manifest) fails on every rank
    alike (DCP reports any rank's failure to all), so all ranks move on to the previous one together;
    when a load failed part-way and no older checkpoint loads, the model is no longer pristine and the
    run is refused instead of silently starting over.
    """
    from torch.distributed.checkpoint.state_dict import set_state_dict

    choice: tuple[list[str], str | None] = ([], None)
    if ctx.is_main:
        try:
            clean_stale(Path(ckpt_dir))
            choice = ([str(p) for p in committed_candidates(Path(ckpt_dir), config_hash)], None)
        except CheckpointError as err:
            choice = ([], str(err))
    paths, error = ctx.broadcast(choice)
    if error:
        raise CheckpointConfigMismatch(error)
    failures = []
    for path_str in paths:
        path = Path(path_str)
        try:
            json_state, rng_tensors = _read_small_state(path)
            state = _state_dicts(model, optimizer)
            tensors, _ = unique_tensors(split_tensors(state)[1])  # aliases share storage with their target
            _dcp_load(tensors, path)  # fills the tensors of `state` in place
        except CheckpointError as err:
            log.error("skipping checkpoint: %s", err)
            failures.append(str(err))
            continue
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        restore_rng(json_state["rng"], rng_tensors)
        manifest = json.loads((path / "manifest.json").read_text())
        log.info("resumed from %s (written by %s ranks)", path, manifest.get("world_size"))
        return LoadedSharded(path, int(manifest["step"]), json_state)
    if failures:
        raise CheckpointError(
            f"{ckpt_dir}: no verified checkpoint could be decoded ({failures[-1][:300]}); move the "
            "checkpoint directory away to start over"
        )
    return None


def read_full_weights(
    path: Path, config_hash: str, template: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The model weights of sharded checkpoint `path`, consolidated into full tensors in this process
    (no process group needed): `template` is a plain model's state dict (names, shapes, dtypes); the
    manifest and every file's sha256 are verified first."""
    verify_sharded(path, config_hash)
    unique, aliases = unique_tensors(template)
    tensors = {f"model/{k}": torch.empty_like(t, device="cpu") for k, t in unique.items()}
    _dcp_load(tensors, path, local=True)
    weights = {key.removeprefix("model/"): t for key, t in tensors.items()}
    return {**weights, **{alias: weights[kept] for alias, kept in aliases.items()}}
