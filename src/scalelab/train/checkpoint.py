"""Atomic, verified checkpoints of everything a run needs to continue bitwise identically.

Layout of `<run>/checkpoint/step-000123/`:
  model.safetensors  model weights (tied weights stored once; `manifest.json` lists the aliases)
  state.pt           tensors: optimizer, grad scaler, torch CPU/CUDA RNG (loaded with weights_only=True)
  state.json         plain values: step, tokens, loader position, callbacks, python/numpy RNG
  manifest.json      step, config hash, sha256 of each file above — written last

Writing: everything goes into a temporary directory inside checkpoint/, each file and then the directory
are fsync'ed, and the directory is renamed to `step-NNNNNN` with os.replace, so a reader never sees a
half-written checkpoint; older ones beyond `keep` are deleted afterwards.

Loading: the newest checkpoint whose manifest and checksums verify is used; a corrupted or truncated one
is logged (as a CheckpointError) and skipped in favour of the previous one. A checkpoint written for a
different config is refused with a CheckpointError naming both config hashes.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from scalelab.errors import CheckpointError
from scalelab.io import fsync_dir, sha256_file

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step-(\d{6,})$")
_FILES = ("model.safetensors", "state.pt", "state.json")


class CheckpointConfigMismatch(CheckpointError):
    """The checkpoint was written by a run with a different config hash."""


# ------------------------------------------------------------------------------------------- RNG
def capture_rng() -> tuple[dict[str, Any], dict[str, Any]]:
    """(plain-value part, tensor part) of every RNG state: python, numpy, torch CPU, CUDA (if present)."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    plain = {
        "python": [version, list(internal), gauss],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    tensors: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["cuda"] = torch.cuda.get_rng_state_all()
    return plain, tensors


def restore_rng(plain: dict[str, Any], tensors: dict[str, Any]) -> None:
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(tensors["cuda"])


# ------------------------------------------------------------------------------------- helpers


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, tuple | set):
        return list(obj)
    raise TypeError(f"cannot store {type(obj).__name__} in state.json")


def _unique_weights(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """State dict without aliases (tied weights once) + {alias: stored name}."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    by_ptr: dict[tuple[int, int, tuple[int, ...]], str] = {}
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in by_ptr:
            aliases[name] = by_ptr[key]
            continue
        by_ptr[key] = name
        tensors[name] = t.detach().contiguous().cpu()
    return tensors, aliases


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def list_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of complete checkpoint directories, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    out = []
    for p in ckpt_dir.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir():
            out.append((int(m.group(1)), p))
    return sorted(out)


# ------------------------------------------------------------------------------------------ save
def save_checkpoint(
    ckpt_dir: Path,
    *,
    step: int,
    model: nn.Module,
    tensor_state: dict[str, Any],
    json_state: dict[str, Any],
    config_hash: str,
    keep: int = 2,
) -> Path:
    """Write `step-NNNNNN/` atomically (see module docstring); keep the newest `keep`; returns its path."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    tmp = ckpt_dir / f".tmp-{step_dir_name(step)}-{os.getpid()}-{time.monotonic_ns()}"
    tmp.mkdir()
    try:
        weights, aliases = _unique_weights(model)
        save_file(weights, str(tmp / "model.safetensors"))
        rng_plain, rng_tensors = capture_rng()
        torch.save({**tensor_state, "rng": rng_tensors}, tmp / "state.pt")
        payload = {**json_state, "rng": rng_plain}
        (tmp / "state.json").write_text(json.dumps(payload, default=_json_default, allow_nan=True))
        for name in _FILES:
            _fsync_file(tmp / name)
        manifest = {
            "format_version": FORMAT_VERSION,
            "step": step,
            "config_hash": config_hash,
            "aliases": aliases,
            "files": {name: sha256_file(tmp / name) for name in _FILES},
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
        _fsync_file(tmp / "manifest.json")
        fsync_dir(tmp)
        final = ckpt_dir / step_dir_name(step)
        if final.exists():  # re-saving a step (e.g. after a resume): move the old one out of the way first
            trash = ckpt_dir / f".old-{final.name}-{time.monotonic_ns()}"
            os.replace(final, trash)
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(tmp, final)
        fsync_dir(ckpt_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for _, old in list_checkpoints(ckpt_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    log.info("checkpoint %s written", final)
    return final


def clean_stale(ckpt_dir: Path) -> None:
    """Remove temporary directories left by a writer that was killed mid-save."""
    if ckpt_dir.is_dir():
        for p in ckpt_dir.iterdir():
            if p.name.startswith((".tmp-", ".old-")):
                shutil.rmtree(p, ignore_errors=True)


# ------------------------------------------------------------------------------------------ load
@dataclass
class Checkpoint:
    """A verified checkpoint, loaded into memory."""

    path: Path
    step: int
    weights: dict[str, torch.Tensor]
    tensor_state: dict[str, Any]
    json_state: dict[str, Any]

    def restore(self, model: nn.Module) -> None:
        """Load weights into `model` and restore all RNG states (the trainer restores the rest)."""
        model.load_state_dict(self.weights, strict=True)
        restore_rng(self.json_state["rng"], self.tensor_state["rng"])


def read_manifest(path: Path, config_hash: str, expected_format: str | None = None) -> dict[str, Any]:
    """The manifest of checkpoint `path`, refused when unreadable, of another format or of another config."""
    manifest_path = path / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
        manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{manifest_path}: missing or unreadable manifest ({err})") from None
    if expected_format is not None and manifest.get("format") != expected_format:
        raise CheckpointError(
            f"{path}: not a {expected_format} checkpoint (format {manifest.get('format')!r}); it was written "
            "by the other kind of run (single-process checkpoints are not sharded DCP ones, and back)"
        )
    if manifest.get("config_hash") != config_hash:
        raise CheckpointConfigMismatch(
            f"{path}: checkpoint belongs to config {manifest.get('config_hash')}, not to this run's "
            f"config {config_hash}; use a fresh output directory or resume=False"
        )
    return manifest


def verify_checkpoint(path: Path, config_hash: str) -> dict[str, Any]:
    """The manifest of `path` after checking it is complete, uncorrupted and of this config."""
    manifest = read_manifest(path, config_hash)
    files = manifest["files"]
    for name, digest in files.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{f}: file listed in the manifest is missing")
        if sha256_file(f) != digest:
            raise CheckpointError(f"{f}: sha256 does not match the manifest (corrupted or truncated)")
    return manifest


def load_checkpoint(path: Path, config_hash: str, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Verify and load one checkpoint directory (CheckpointError if it does not verify)."""
    manifest = verify_checkpoint(path, config_hash)
    try:
        weights = load_file(str(path / "model.safetensors"), device=str(map_location))
        for alias, target in manifest.get("aliases", {}).items():
            weights[alias] = weights[target]
        tensor_state = torch.load(path / "state.pt", map_location=map_location, weights_only=True)
        json_state = json.loads((path / "state.json").read_text())
    except Exception as err:  # noqa: BLE001 — any decoding failure means this checkpoint is unusable
        raise CheckpointError(f"{path}: cannot be loaded ({type(err).__name__}: {err})") from None
    return Checkpoint(path, int(manifest["step"]), weights, tensor_state, json_state)


def load_latest(
    ckpt_dir: Path, config_hash: str, map_location: str | torch.device = "cpu"
) -> Checkpoint | None:
    """The newest checkpoint that verifies, or None when there is none.

    Corrupted/truncated checkpoints are logged and skipped; one from another config raises.
    """
    for _, path in reversed(list_checkpoints(Path(ckpt_dir))):
        try:
            return load_checkpoint(path, config_hash, map_location)
        except CheckpointConfigMismatch:
            raise
        except CheckpointError as err:
            log.error("skipping checkpoint: %s", err)
    return None
