"""Load a trained run for inference: its config, its newest verified checkpoint, its tokenizer.

The one loader behind `serve`, `distill --teacher`, quantization and export. It reads the weights of any
run scalelab trains: a single-process checkpoint (`model.safetensors`) or a sharded one written by DDP,
FSDP, tensor or pipeline parallel ranks (DCP safetensors shards, consolidated here into full tensors in
one process; a tensor-parallel run's regrouped `qkv` rows are put back in the plain order). Either way the manifest's own hash, the config hash and the SHA-256 of every file are
verified first, nothing is unpickled, and the optimizer state is never read. A checkpoint that does not
verify is skipped (logged) in favour of the previous one, as the trainer does.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from scalelab.data.tokenize import ByteTokenizer, Tokenizer
from scalelab.errors import CheckpointError, SpecError
from scalelab.models.parametrization import apply_parametrization
from scalelab.models.registry import build_model
from scalelab.spec import RunSpec, config_hash
from scalelab.train.checkpoint import CheckpointConfigMismatch, list_checkpoints, verify_checkpoint
from scalelab.train.parallel.checkpoint import FORMAT as SHARDED_FORMAT
from scalelab.train.parallel.checkpoint import read_full_weights

log = logging.getLogger(__name__)


@dataclass
class LoadedRun:
    """A run ready to serve: the model (eval mode, no grads), its tokenizer and where it came from."""

    run_dir: Path
    spec: RunSpec
    model: nn.Module  # any family (models/protocol.py)
    tokenizer: Tokenizer
    checkpoint: Path
    step: int

    @property
    def context_tokens(self) -> int:
        return self.model.shape.context_tokens

    def store(self) -> Any:
        """The run's token store (held-out tokens for evaluation); built on first use if missing."""
        from scalelab.data.store import ensure_store

        return ensure_store(self.spec.data)


def read_run_spec(run_dir: Path) -> RunSpec:
    """The canonical RunSpec in `run_dir/config.json` (SpecError naming the file when absent/invalid)."""
    path = Path(run_dir) / "config.json"
    try:
        return RunSpec.model_validate_json(path.read_text())
    except OSError as err:
        raise SpecError(
            f"{path}: cannot read the run's config ({err.strerror or err}); is this a run directory?"
        ) from None
    except ValueError as err:
        raise SpecError(f"{path}: not a valid run config ({err})") from None


def _manifest_format(path: Path) -> str | None:
    """The "format" a checkpoint's manifest claims (only to pick the verifier, which checks it again)."""
    try:
        return json.loads((path / "manifest.json").read_text()).get("format")
    except (OSError, ValueError, AttributeError, RecursionError):
        return None


def _plain_rows(weights: dict[str, torch.Tensor], spec: RunSpec, model: nn.Module) -> dict[str, torch.Tensor]:
    """A tensor-parallel run stores every fused weight of its model's `tp_plan` ([q; k; v]) with its rows
    regrouped rank-major (train/parallel/tensor.py); put them back in the plain model's order."""
    tp = spec.train.tensor_parallel
    if tp <= 1:
        return weights
    from scalelab.train.parallel.tensor import plain_order, tp_plan_of

    return plain_order(weights, tp_plan_of(model), tp)


def _read_weights(path: Path, chash: str, model: nn.Module, spec: RunSpec) -> dict[str, torch.Tensor]:
    if _manifest_format(path) == SHARDED_FORMAT:
        return _plain_rows(read_full_weights(path, chash, model.state_dict()), spec, model)
    manifest = verify_checkpoint(path, chash)
    weights = load_file(str(path / "model.safetensors"), device="cpu")
    for alias, target in manifest.get("aliases", {}).items():
        weights[alias] = weights[target]
    return weights


def load_weights(run_dir: Path, spec: RunSpec, model: nn.Module) -> tuple[Path, int, dict[str, torch.Tensor]]:
    """(checkpoint path, step, weights) of the newest checkpoint of `run_dir` (whose config is `spec`)
    that verifies; `model` (the run's model, freshly built) gives names and shapes to sharded checkpoints
    and its tensor-parallel plan. Weights come back in the plain model's layout."""
    chash = config_hash(spec)
    ckpt_dir = Path(run_dir) / "checkpoint"
    candidates = list_checkpoints(ckpt_dir)
    if not candidates:
        raise CheckpointError(f"{ckpt_dir}: no checkpoint (step-*/) to serve; train the run first")
    for step, path in reversed(candidates):
        try:
            weights = _read_weights(path, chash, model, spec)
        except CheckpointConfigMismatch:
            raise
        except CheckpointError as err:
            log.error("skipping checkpoint: %s", err)
            continue
        except Exception as err:  # noqa: BLE001 — an undecodable file makes this checkpoint unusable
            log.error("skipping checkpoint %s: %s: %s", path, type(err).__name__, err)
            continue
        return path, step, weights
    raise CheckpointError(f"{ckpt_dir}: no checkpoint verifies (all corrupted or truncated); see the log")


def run_tokenizer(spec: RunSpec, run_dir: Path) -> Tokenizer:
    """The run's tokenizer: bytes need nothing; BPE comes from the run's token store."""
    if spec.data.tokenizer == "byte":
        tok: Tokenizer = ByteTokenizer()
    else:
        from scalelab.data.store import ensure_store

        tok = ensure_store(spec.data).tokenizer
    prov = Path(run_dir) / "provenance.json"
    try:
        expected = json.loads(prov.read_text()).get("data", {}).get("tokenizer_hash")
    except (OSError, ValueError, AttributeError):
        expected = None
    if expected and expected != tok.hash:
        raise SpecError(
            f"{prov}: data.tokenizer_hash {expected[:12]}… does not match the tokenizer found now "
            f"({tok.hash[:12]}…); the run's tokenizer is not available on this machine"
        )
    return tok


def load_run(run_dir: str | Path, device: str | torch.device = "cpu") -> LoadedRun:
    """Load `run_dir` for inference (see module docstring)."""
    run_dir = Path(run_dir)
    spec = read_run_spec(run_dir)
    tokenizer = run_tokenizer(spec, run_dir)
    vocab = spec.model.vocab_size or tokenizer.vocab_size
    model = build_model(spec.model, vocab)
    apply_parametrization(model, spec.model)  # sets attention scale and multipliers (μP, depth-μP)
    path, step, weights = load_weights(run_dir, spec, model)
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as err:
        raise CheckpointError(
            f"{path}: the checkpoint's weights do not fit the run's model ({err})"
        ) from None
    model.to(device).eval().requires_grad_(False)
    log.info("loaded %s step %d (%d parameters)", path, step, sum(p.numel() for p in model.parameters()))
    return LoadedRun(run_dir, spec, model, tokenizer, path, step)
