"""Atomic, verified checkpoints of everything a run needs to continue bitwise identically.

Layout of `<run>/checkpoint/step-000123/`:
  model.safetensors  model weights (tied weights stored once; `manifest.json` lists the aliases)
  state.safetensors  tensors: optimizer, grad scaler, torch CPU/CUDA RNG (flat, by path)
  state.json         plain values: step, tokens, loader position, callbacks, python/numpy RNG, and the
                     skeleton that puts the tensors of state.safetensors back into their nesting
  manifest.json      step, config hash, sha256 of each file above, and its own sha256 — written last

Nothing is ever unpickled: tensors are safetensors, everything else JSON (see train/tensorstate.py).

Writing: everything goes into a temporary directory inside checkpoint/, each file and then the directory
are fsync'ed, and the directory is renamed to `step-NNNNNN` with os.replace, so a reader never sees a
half-written checkpoint; older ones beyond `keep` are deleted afterwards.

Loading: the newest checkpoint whose manifest (its own hash first) and checksums verify is used; a
corrupted or truncated one — a flipped bit anywhere, the manifest included — is logged (as a
CheckpointError) and skipped in favour of the previous one. A checkpoint whose intact manifest names a
different config is refused with a CheckpointError naming both config hashes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from scalelab.errors import CheckpointError
from scalelab.io import fsync_dir, sha256_file
from scalelab.train.tensorstate import contiguous_cpu, join_tensors, split_tensors, unique_tensors

log = logging.getLogger(__name__)

FORMAT = "single"
FORMAT_VERSION = 2  # 1 stored state.pt (torch.save); it is not read any more
_STEP_DIR = re.compile(r"^step-(\d{6,})$")
_FILES = ("model.safetensors", "state.safetensors", "state.json")
MANIFEST_HASH_KEY = "manifest_sha256"


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
    tensors, aliases = unique_tensors(model.state_dict())
    return {k: t.detach().contiguous().cpu() for k, t in tensors.items()}, aliases


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
        skeleton, tensors = split_tensors({**tensor_state, "rng": rng_tensors})
        save_file(contiguous_cpu(tensors), str(tmp / "state.safetensors"))
        payload = {**json_state, "rng": rng_plain, "tensor_skeleton": skeleton}
        (tmp / "state.json").write_text(json.dumps(payload, default=_json_default, allow_nan=True))
        for name in _FILES:
            _fsync_file(tmp / name)
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "step": step,
            "config_hash": config_hash,
            "aliases": aliases,
            "files": file_table(tmp, _FILES),
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        write_manifest(tmp / "manifest.json", manifest)
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


def _manifest_digest(manifest: dict[str, Any]) -> str:
    body = {k: v for k, v in manifest.items() if k != MANIFEST_HASH_KEY}
    return hashlib.sha256(json.dumps(body, sort_keys=True, allow_nan=False).encode()).hexdigest()


def write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    """Write `manifest` with its own sha256 (over its canonical JSON) and fsync it."""
    text = json.dumps({**manifest, MANIFEST_HASH_KEY: _manifest_digest(manifest)}, indent=1, sort_keys=True)
    path.write_text(text)
    _fsync_file(path)


def read_manifest(
    path: Path, config_hash: str, expected_format: str | None = None, format_version: int = FORMAT_VERSION
) -> dict[str, Any]:
    """The manifest of checkpoint `path` after checking its own hash; refused (CheckpointError) when
    unreadable, damaged, of another format or version, or (CheckpointConfigMismatch) of another config."""
    manifest_path = path / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
        manifest["files"].items()
        intact = manifest.get(MANIFEST_HASH_KEY) == _manifest_digest(manifest)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as err:
        raise CheckpointError(f"{manifest_path}: missing or unreadable manifest ({err})") from None
    if not intact:
        raise CheckpointError(
            f"{manifest_path}: the manifest's own sha256 does not verify (damaged manifest, or one written "
            "by a scalelab older than format 2)"
        )
    if manifest.get("format_version") != format_version:
        raise CheckpointError(
            f"{manifest_path}: checkpoint format version {manifest.get('format_version')!r}, this scalelab "
            f"reads version {format_version}"
        )
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


def file_table(root: Path, names: Iterable[str]) -> dict[str, dict[str, Any]]:
    """{relative name: {"bytes", "sha256"}} of the files `names` under `root`, for a manifest."""
    return {
        name: {"bytes": (root / name).stat().st_size, "sha256": sha256_file(root / name)} for name in names
    }


def verify_files(path: Path, files: dict[str, Any], required: Iterable[str] = ()) -> None:
    """CheckpointError unless every file of the manifest's table exists with its size and sha256, and
    the table covers every `required` name (a manifest that forgot a file would let it go unchecked)."""
    for name in required:
        if name not in files:
            raise CheckpointError(f"{path / 'manifest.json'}: lists no checksum for {name}")
    for name, entry in files.items():
        f = path / name
        if ".." in Path(name).parts or Path(name).is_absolute():
            raise CheckpointError(
                f"{path / 'manifest.json'}: file name {name!r} points outside the checkpoint"
            )
        if not isinstance(entry, dict) or not {"bytes", "sha256"} <= entry.keys():
            raise CheckpointError(f"{path / 'manifest.json'}: entry for {name} lacks bytes/sha256")
        if not f.is_file() or f.stat().st_size != entry["bytes"]:
            raise CheckpointError(f"{f}: missing or of the wrong size (truncated checkpoint)")
        if sha256_file(f) != entry["sha256"]:
            raise CheckpointError(f"{f}: sha256 does not match the manifest (corrupted)")


def verify_checkpoint(path: Path, config_hash: str) -> dict[str, Any]:
    """The manifest of `path` after checking it is complete, uncorrupted and of this config."""
    manifest = read_manifest(path, config_hash, expected_format=FORMAT)
    verify_files(path, manifest["files"], required=_FILES)
    return manifest


def load_checkpoint(path: Path, config_hash: str, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Verify and load one checkpoint directory (CheckpointError if it does not verify)."""
    manifest = verify_checkpoint(path, config_hash)
    try:
        weights = load_file(str(path / "model.safetensors"), device=str(map_location))
        for alias, target in manifest.get("aliases", {}).items():
            weights[alias] = weights[target]
        json_state = json.loads((path / "state.json").read_text())
        flat = load_file(str(path / "state.safetensors"), device=str(map_location))
        tensor_state = join_tensors(json_state.pop("tensor_skeleton"), flat)
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
