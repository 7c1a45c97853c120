"""Sharded checkpoints of distributed runs: `torch.distributed.checkpoint` (DCP), committed atomically.

Layout of `<run>/checkpoint/step-000123/`:
  dcp/           DCP files: model and optimizer state by parameter name, each rank writing its shards
  state.json     plain values: step, tokens, loader position (world-size independent), callbacks, scaler,
                 python/numpy RNG
  rng.pt         torch RNG states (rank 0's; every rank is seeded alike and draws alike)
  manifest.json  format "dcp", step, config hash, world size, the size of every file and the sha256 of the
                 small ones — written last

Commit protocol: rank 0 names a temporary directory `.tmp-step-…` and broadcasts it; every rank writes its
shards with `dcp.save`; after a barrier rank 0 writes state.json, rng.pt and the manifest, fsyncs, and
renames the directory to `step-NNNNNN` (os.replace, then fsync of checkpoint/). A directory that does not
start with `step-` is never read, so a checkpoint being written when a rank is killed is never loaded;
`load_latest_sharded` (rank 0 decides, every rank follows) takes the newest step directory whose manifest
verifies and skips damaged ones.

Resharding: DCP stores tensors by name with their global shapes, so a checkpoint written by K ranks
loads at any other world size and strategy layout (DDP replicas, FSDP shards); the loader position is a
count of global batches, so the data order continues unchanged.
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
from torch import nn

from scalelab.errors import CheckpointError
from scalelab.io import fsync_dir, sha256_file
from scalelab.train.checkpoint import (
    CheckpointConfigMismatch,
    capture_rng,
    clean_stale,
    list_checkpoints,
    read_manifest,
    restore_rng,
    step_dir_name,
)

log = logging.getLogger(__name__)

FORMAT = "dcp"
FORMAT_VERSION = 1
#: files up to this size get a sha256 in the manifest; larger ones (DCP shards) are checked by size
HASH_LIMIT_BYTES = 1 << 20


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(Path(dirpath) / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(dirpath)


def _file_table(root: Path) -> dict[str, dict[str, Any]]:
    table: dict[str, dict[str, Any]] = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        size = path.stat().st_size
        entry: dict[str, Any] = {"bytes": size}
        if size <= HASH_LIMIT_BYTES:
            entry["sha256"] = sha256_file(path)
        table[rel] = entry
    return table


def _state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optimizer)
    return {"model": msd, "optim": osd}


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

    ckpt_dir = Path(ckpt_dir)
    final = ckpt_dir / step_dir_name(step)
    name = f".tmp-{step_dir_name(step)}-{os.getpid()}-{time.monotonic_ns()}" if ctx.is_main else None
    name = ctx.broadcast(name)
    tmp = ckpt_dir / name
    if ctx.is_main:
        tmp.mkdir(parents=True)
    ctx.barrier()
    dcp.save(_state_dicts(model, optimizer), checkpoint_id=str(tmp / "dcp"))
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
    torch.save(rng_tensors, tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps({**json_state, "rng": rng_plain}, allow_nan=True))
    _fsync_tree(tmp)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "step": step,
        "config_hash": config_hash,
        "world_size": ctx.world_size,
        "files": _file_table(tmp),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
    _fsync_tree(tmp)
    if final.exists():  # re-saving a step after a resume: move the old one out of the way first
        trash = final.parent / f".old-{final.name}-{time.monotonic_ns()}"
        os.replace(final, trash)
        shutil.rmtree(trash, ignore_errors=True)
    os.replace(tmp, final)
    fsync_dir(final.parent)


def verify_sharded(path: Path, config_hash: str) -> dict[str, Any]:
    """The manifest of a committed sharded checkpoint after checking files, sizes and small-file hashes."""
    manifest = read_manifest(path, config_hash, expected_format=FORMAT)
    files = manifest["files"]
    for rel, entry in files.items():
        f = path / rel
        if not f.is_file() or f.stat().st_size != entry["bytes"]:
            raise CheckpointError(f"{f}: missing or of the wrong size (truncated checkpoint)")
        if "sha256" in entry and sha256_file(f) != entry["sha256"]:
            raise CheckpointError(f"{f}: sha256 does not match the manifest (corrupted)")
    return manifest


def latest_committed(ckpt_dir: Path, config_hash: str) -> Path | None:
    """Newest committed checkpoint that verifies (damaged ones are logged and skipped; another config
    raises CheckpointConfigMismatch)."""
    for _, path in reversed(list_checkpoints(Path(ckpt_dir))):
        try:
            verify_sharded(path, config_hash)
            return path
        except CheckpointConfigMismatch:
            raise
        except CheckpointError as err:
            log.error("skipping checkpoint: %s", err)
    return None


@dataclass
class LoadedSharded:
    """What `load_latest_sharded` restored: model and optimizer are loaded in place."""

    path: Path
    step: int
    json_state: dict[str, Any]


def load_latest_sharded(
    ctx: Any, ckpt_dir: Path, config_hash: str, model: nn.Module, optimizer: torch.optim.Optimizer
) -> LoadedSharded | None:
    """Collective: restore model, optimizer and RNG from the newest committed checkpoint (None if none).

    Rank 0 removes stale temporary directories and chooses; the others follow its choice.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    choice: tuple[str | None, str | None] = (None, None)
    if ctx.is_main:
        try:
            clean_stale(Path(ckpt_dir))
            found = latest_committed(Path(ckpt_dir), config_hash)
            choice = (str(found) if found else None, None)
        except CheckpointError as err:
            choice = (None, str(err))
    path_str, error = ctx.broadcast(choice)
    if error:
        raise CheckpointConfigMismatch(error)
    if path_str is None:
        return None
    path = Path(path_str)
    state = _state_dicts(model, optimizer)
    dcp.load(state, checkpoint_id=str(path / "dcp"))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    json_state = json.loads((path / "state.json").read_text())
    rng_tensors = torch.load(path / "rng.pt", map_location="cpu", weights_only=True)
    restore_rng(json_state["rng"], rng_tensors)
    manifest = json.loads((path / "manifest.json").read_text())
    log.info("resumed from %s (written by %s ranks)", path, manifest.get("world_size"))
    return LoadedSharded(path, int(manifest["step"]), json_state)
