"""WSD branching: a run starts from another run's stable-phase snapshot instead of from step 0.

Two warmup–stable–decay runs that differ only in their token budget follow the same trajectory until
the shorter one starts its cooldown: same weights, optimizer state, data order and learning rate at every
step. So the shorter one (a branch) can load the longer one's (the trunk's) snapshot at that step and
train only its cooldown, ending bitwise identical (on CPU) to training it from scratch. `check_branch`
proves the premise for a given pair instead of assuming it: the specs must be equal apart from
`train.tokens` and the learning-rate multiplier of every step before the branch point must be equal.

Snapshots are ordinary verified checkpoints kept in the trunk's `snapshots/step-NNNNNN/`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from scalelab.errors import CheckpointError
from scalelab.io import atomic_write_text
from scalelab.spec import RunSpec, config_hash
from scalelab.train.checkpoint import Checkpoint, load_checkpoint, step_dir_name
from scalelab.train.observe import metrics_lines_upto
from scalelab.train.schedule import make_schedule, warmup_steps, wsd_decay_start

log = logging.getLogger(__name__)

SNAPSHOT_DIR = "snapshots"


class BranchError(CheckpointError):
    """A snapshot cannot serve as this run's starting point (another config, past the branch point)."""


def step_tokens(spec: RunSpec) -> int:
    return spec.train.global_batch_size * spec.model.context_tokens


def total_steps(spec: RunSpec) -> int:
    return spec.train.tokens // step_tokens(spec)


def branch_step(spec: RunSpec) -> int:
    """The step at which a WSD run's cooldown starts: where it can branch from a longer run's snapshot."""
    if spec.train.schedule != "wsd":
        raise ValueError(f"branch_step: run {spec.run_id} uses schedule {spec.train.schedule!r}, not 'wsd'")
    steps = total_steps(spec)
    warmup = warmup_steps(spec.train, steps, step_tokens(spec))
    return wsd_decay_start(steps, warmup, spec.train.decay_fraction)


def snapshot_path(trunk_run_dir: Path, step: int) -> Path:
    return Path(trunk_run_dir) / SNAPSHOT_DIR / step_dir_name(step)


def _without_tokens(spec: RunSpec) -> dict[str, Any]:
    data = json.loads(spec.canonical_json())
    data["train"].pop("tokens")
    return data


def branch_key(spec: RunSpec) -> str:
    """Equal for runs that differ at most in train.tokens (candidates to share a WSD trunk)."""
    return json.dumps(_without_tokens(spec), sort_keys=True)


def check_branch(trunk: RunSpec, branch: RunSpec, step: int) -> None:
    """Raise BranchError unless `branch` trained from scratch would pass through `trunk`'s state at `step`."""
    a, b = _without_tokens(trunk), _without_tokens(branch)
    if a != b:
        differing = sorted(
            f"{section}.{key}"
            for section in a
            for key in set(a[section]) | set(b[section])
            if a[section].get(key) != b[section].get(key)
        )
        raise BranchError(
            f"run {branch.run_id} cannot branch from run {trunk.run_id}: their specs differ in "
            f"{', '.join(differing)} (only train.tokens may differ)"
        )
    for spec in (trunk, branch):
        if spec.train.batch_schedule or spec.train.max_global_batch_size:
            raise BranchError(
                f"run {spec.run_id} grows its batch during training: WSD branching needs a fixed batch"
            )
    if step > total_steps(branch):
        raise BranchError(f"branch point step {step} is past run {branch.run_id}'s last step")
    lr_trunk = make_schedule(trunk.train, total_steps(trunk), step_tokens(trunk))
    lr_branch = make_schedule(branch.train, total_steps(branch), step_tokens(branch))
    for i in range(step):
        if lr_trunk(i) != lr_branch(i):
            raise BranchError(
                f"run {branch.run_id} cannot branch from run {trunk.run_id} at step {step}: their learning "
                f"rates differ at step {i} ({lr_trunk(i):.6g} vs {lr_branch(i):.6g}); a WSD branch needs "
                "the same absolute warmup (train.warmup_tokens) and its decay to start at or after the step"
            )


@dataclass(frozen=True)
class BranchPoint:
    """A verified trunk snapshot a branch starts from."""

    checkpoint: Checkpoint
    trunk: RunSpec
    path: Path

    def describe(self) -> dict[str, Any]:
        """What record.json says about where the run started."""
        return {
            "trunk_run_id": self.trunk.run_id,
            "step": self.checkpoint.step,
            "tokens": self.checkpoint.step * step_tokens(self.trunk),
            "snapshot": str(self.path),
        }


def load_branch_point(snapshot: Path, branch: RunSpec, map_location: str | torch.device) -> BranchPoint:
    """Verify the trunk snapshot at `snapshot` (checksums and config) and that `branch` may start there."""
    snapshot = Path(snapshot)
    trunk_config = snapshot.parent.parent / "config.json"
    try:
        trunk = RunSpec.model_validate_json(trunk_config.read_text())
    except (OSError, ValueError) as err:
        raise BranchError(f"{trunk_config}: cannot read the trunk run's config ({err})") from None
    ckpt = load_checkpoint(snapshot, config_hash(trunk), map_location)
    check_branch(trunk, branch, ckpt.step)
    return BranchPoint(ckpt, trunk, snapshot)


def copy_trunk_metrics(point: BranchPoint, metrics_path: Path) -> None:
    """Start the branch's metrics.jsonl with the trunk's lines up to the branch point, so it reads as one run."""
    lines = metrics_lines_upto(point.path.parent.parent / "metrics.jsonl", point.checkpoint.step)
    atomic_write_text(metrics_path, "".join(line + "\n" for line in lines))
