"""Capture where a run came from: code (git SHA, dirty flag, diff hash), packages, hardware, data, seeds.

Everything here is best effort and never raises: a missing git or GPU is recorded as null with a reason,
because a run must not fail for lack of provenance.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import importlib.metadata as md
import logging
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: packages whose versions decide a run's numbers.
TRACKED_PACKAGES = (
    "scalelab",
    "torch",
    "numpy",
    "scipy",
    "pydantic",
    "tokenizers",
    "safetensors",
    "datasketches",
    "pyarrow",
    "matplotlib",
    "ray",
)


def utc_now() -> str:
    """Current time as ISO-8601 UTC with seconds precision."""
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.decode(errors="replace")


def git_state(path: str | Path | None = None) -> dict[str, Any]:
    """Commit, dirty flag and a hash of the uncommitted diff of the repository holding `path`."""
    start = Path(path) if path else Path(__file__).resolve().parent
    top = _git(["rev-parse", "--show-toplevel"], start)
    if top is None:
        return {"commit": None, "dirty": None, "diff_sha256": None, "reason": "not inside a git repository"}
    root = Path(top.strip())
    commit = (_git(["rev-parse", "HEAD"], root) or "").strip() or None
    status = _git(["status", "--porcelain", "--untracked-files=no"], root) or ""
    diff = _git(["diff", "HEAD"], root) or ""
    return {
        "commit": commit,
        "dirty": bool(status.strip()),
        "diff_sha256": hashlib.sha256(diff.encode()).hexdigest() if diff else None,
        "root": str(root),
    }


def package_versions(names: tuple[str, ...] = TRACKED_PACKAGES) -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    return versions


def hardware() -> dict[str, Any]:
    """CPU, memory and (when torch sees one) GPU model, driver and CUDA versions."""
    from scalelab.hw import cpu_model

    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
    }
    try:
        import psutil

        info["memory_bytes"] = int(psutil.virtual_memory().total)
    except Exception:  # noqa: BLE001 - provenance never fails a run
        info["memory_bytes"] = None
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            n = torch.cuda.device_count()
            info["gpus"] = [torch.cuda.get_device_name(i) for i in range(n)]
            info["cuda_version"] = torch.version.cuda
            info["cudnn_version"] = torch.backends.cudnn.version()
            info["gpu_driver"] = _nvidia_driver()
        else:
            info["gpus"] = []
            info["cuda_version"] = None
    except Exception as err:  # noqa: BLE001
        info["gpus"] = None
        info["gpu_error"] = str(err)
    return info


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            timeout=10,
            check=True,
        )
        return out.stdout.decode().strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def environment() -> dict[str, Any]:
    return {
        "python": sys.version.split()[0],
        "python_implementation": platform.python_implementation(),
        "os": platform.platform(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "command": sys.argv,
        "cwd": os.getcwd(),
        "env": {k: v for k, v in os.environ.items() if k.startswith(("OMP_", "MKL_", "CUDA_", "SCALELAB_"))},
    }


def capture_provenance(spec: Any = None, *, store: Any = None) -> dict[str, Any]:
    """Provenance of one run: config hash and seeds, code, packages, hardware, data and time.

    `spec` is a RunSpec (optional), `store` a TokenStore (optional; its fingerprint and tokenizer hash
    identify the data exactly).
    """
    prov: dict[str, Any] = {"captured_at": utc_now()}
    if spec is not None:
        from scalelab.spec import config_hash

        prov["run_id"] = spec.run_id
        prov["config_hash"] = config_hash(spec)
        prov["seeds"] = {
            "train": spec.train.seed,
            "data": spec.train.data_seed if spec.train.data_seed is not None else spec.train.seed,
        }
    if store is not None:
        prov["data"] = {
            "store": str(getattr(store, "path", "")),
            "fingerprint": getattr(store, "fingerprint", None),
            "tokenizer": getattr(store, "tokenizer_name", None),
            "tokenizer_hash": getattr(store, "tokenizer_hash", None),
        }
    prov["git"] = git_state()
    prov["packages"] = package_versions()
    prov["hardware"] = hardware()
    prov["environment"] = environment()
    return prov
