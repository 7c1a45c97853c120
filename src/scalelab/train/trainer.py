"""The training loop: micro-steps, accumulation, clipping, schedule, eval, and callbacks at named events.

The loop body stays short; everything optional is a `Callback` (metrics sinks, the divergence guard, the
batch-size controller). Events, in order:
  `on_fit_start(trainer)` → per step `on_step_end(state)` → (every eval_interval_steps and at the end)
  `on_eval_end(state)` → (every checkpoint_interval_steps and at the end) `on_checkpoint(state, path)` →
  `on_fit_end(state)`.
A callback stops the run by setting `state.stop = True` (and `state.status`/`state.message`).

Steps: `train.tokens // (global_batch_size · context_tokens)` optimizer steps of `global_batch_size`
sequences; each is split into micro-batches of `micro_batch_size` whose losses are averaged (scaled by
1/n_micro before backward), so k micro-batches give the same gradient as one batch k× the size.
The LR schedule is evaluated at the training progress measured in base-batch steps (tokens / tokens per
base step), which equals the step index unless the batch-size controller grew the batch.

Optimizer: AdamW with the parametrization's groups: lr = train.lr · schedule · lr_mult,
weight_decay = train.weight_decay · wd_mult (0 for norms and embeddings), eps = train.eps · eps_mult.
The fused implementation is used where the device supports it.

Fault injection (`DebugSpec`): `crash_at_step=s` raises RuntimeError at the start of step s (1-based, s=0
crashes at the first step); `nan_at_step=s` multiplies step s's loss by NaN; `sleep_seconds_per_step`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from scalelab.spec import DebugSpec, TrainSpec
from scalelab.train.precision import autocast, current_loss_scale, make_grad_scaler
from scalelab.train.schedule import make_schedule

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    """What callbacks see after each step; `stop`/`status`/`message` are theirs to set."""

    step: int = 0  # optimizer steps completed
    total_steps: int = 0
    tokens: int = 0  # tokens trained so far (all steps, including before a resume)
    loss: float = math.nan
    lr: float = 0.0
    grad_norm: float = math.nan  # before clipping
    loss_scale: float = 1.0  # the fp16 loss scale this step's backward ran with (1 otherwise)
    step_seconds: float = 0.0
    tokens_per_second: float = 0.0
    train_seconds: float = 0.0  # sum of step_seconds (all steps, including before a resume)
    eval_loss: float | None = None
    global_batch_size: int = 0
    status: str = "running"  # running | done | diverged
    message: str | None = None
    stop: bool = False
    extra: dict[str, Any] = field(default_factory=dict)  # per-step values callbacks add (mfu, memory)


class Callback:
    """Base class: override the events you need. State that must survive a resume goes in state_dict."""

    trainer: Trainer | None = None

    @property
    def name(self) -> str:
        return type(self).__name__

    def on_fit_start(self, trainer: Trainer) -> None:
        self.trainer = trainer

    def on_step_end(self, state: TrainState) -> None:
        pass

    def on_eval_end(self, state: TrainState) -> None:
        pass

    def on_checkpoint(self, state: TrainState, path: Path) -> None:
        pass

    def on_fit_end(self, state: TrainState) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class DivergenceGuard(Callback):
    """Stops the run with status `diverged` when the loss is NaN/inf or exceeds `factor` × its best."""

    def __init__(self, factor: float) -> None:
        self.factor = factor
        self.best = math.inf

    def on_step_end(self, state: TrainState) -> None:
        loss = state.loss
        if not math.isfinite(loss):
            reason = f"loss is {loss} at step {state.step}"
        elif loss > self.factor * self.best:
            reason = (
                f"loss {loss:.4g} at step {state.step} exceeds divergence_factor={self.factor:g} × "
                f"best {self.best:.4g}"
            )
        else:
            self.best = min(self.best, loss)
            return
        log.warning("diverged: %s", reason)
        state.status, state.message, state.stop = "diverged", f"diverged: {reason}", True

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best if math.isfinite(self.best) else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        best = state.get("best")
        self.best = math.inf if best is None else float(best)


def make_optimizer(
    param_groups: Sequence[dict[str, Any]], train: TrainSpec, device: torch.device
) -> torch.optim.AdamW:
    """AdamW over the parametrization's groups (fused when the device supports it)."""
    groups = [
        {
            "params": list(g["params"]),
            "name": g.get("name", f"group{i}"),
            "lr_mult": float(g.get("lr_mult", 1.0)),
            "lr": train.lr * float(g.get("lr_mult", 1.0)),
            "weight_decay": train.weight_decay * float(g.get("wd_mult", 1.0)),
            "eps": train.eps * float(g.get("eps_mult", 1.0)),
        }
        for i, g in enumerate(param_groups)
    ]
    kwargs: dict[str, Any] = {"lr": train.lr, "betas": (train.beta1, train.beta2)}
    try:
        return torch.optim.AdamW(groups, fused=device.type in ("cuda", "cpu"), **kwargs)
    except (RuntimeError, TypeError, ValueError) as err:  # fused unsupported here: foreach/for-loop
        log.info("fused AdamW unavailable on %s (%s); using the default implementation", device, err)
        return torch.optim.AdamW(groups, **kwargs)


def clip_gradients(
    params: Sequence[torch.Tensor], max_norm: float, *, group: Any = None, skip: frozenset[int] = frozenset()
) -> torch.Tensor:
    """Clip to `max_norm` by the global L2 norm and return that norm (before clipping).

    Plain tensors: `clip_grad_norm_`. DTensor gradients (FSDP2 shards, tensor-parallel pieces): the
    norm is computed per mesh layout and combined across ranks, so every rank clips by the same value.
    `group` (pipeline stages): the squared norms of the ranks in it are summed; parameters whose id is in
    `skip` (a second copy of a tied weight) are clipped but not counted.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if group is None and not skip and not any(_is_dtensor(g) for g in grads):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    by_layout: dict[Any, list[torch.Tensor]] = {}  # foreach ops need one mesh and placement per call
    for p in params:
        if p.grad is not None:
            g = p.grad
            key = (g.device_mesh, tuple(g.placements)) if _is_dtensor(g) else None
            by_layout.setdefault(key, []).append(p)
    device = grads[0].device if grads else torch.device("cpu")
    total_sq = torch.zeros((), device=device)
    for layout_params in by_layout.values():
        counted = [p.grad for p in layout_params if id(p) not in skip]
        if not counted:
            continue
        norm = torch.nn.utils.get_total_norm(counted, 2.0)
        if _is_dtensor(norm):
            norm = norm.full_tensor()
        total_sq = total_sq + norm.float() ** 2
    if group is not None:
        import torch.distributed as dist

        dist.all_reduce(total_sq, group=group)
    total = torch.sqrt(total_sq)
    for layout_params in by_layout.values():
        torch.nn.utils.clip_grads_with_norm_(layout_params, max_norm, total)
    return total


def _is_dtensor(t: Any) -> bool:
    return type(t).__name__ == "DTensor"


class Trainer:
    """Runs `total_steps` optimizer steps of `model` on batches from `train_loader`.

    `train_loader` yields LongTensor (global_batch_size, context+1) batches and has state_dict/
    load_state_dict. `eval_batches` is the fixed held-out set evaluated every eval_interval_steps.
    `checkpoint_fn(trainer) -> Path` saves a checkpoint (see train/checkpoint.py); None: no checkpoints.
    `snapshot_fn(trainer)` is called after the step's eval and checkpoint at each of `snapshot_steps`: a
    checkpoint kept for good, from which other runs branch (WSD cooldowns, train/branch.py).
    `model` may be a torch.compile'd wrapper of `raw_model` (whose weights are what gets saved).

    Data parallel (train/distributed.py): `world_size` data-parallel ranks each get `global_batch_size /
    world_size` sequences per loader batch, split into micro-batches of `micro_batch_size` (capped at
    that local share); `grad_sync(enabled)` is entered around every micro-batch, with enabled=False for
    all but a step's last (no gradient all-reduce while accumulating). Gradients held as DTensors
    (FSDP2, tensor parallel) are clipped by their global norm.
    """

    def __init__(
        self,
        model: nn.Module,
        param_groups: Sequence[dict[str, Any]],
        train: TrainSpec,
        *,
        train_loader: Iterable[torch.Tensor],
        total_steps: int,
        context_tokens: int,
        device: torch.device | str = "cpu",
        eval_batches: Sequence[torch.Tensor] = (),
        debug: DebugSpec | None = None,
        callbacks: Sequence[Callback] = (),
        checkpoint_fn: Callable[[Trainer], Path] | None = None,
        raw_model: nn.Module | None = None,
        world_size: int = 1,
        grad_sync: Callable[[bool], AbstractContextManager[Any]] | None = None,
        forward_backward: Callable[[torch.Tensor], torch.Tensor] | None = None,
        eval_fn: Callable[[Sequence[torch.Tensor]], float] | None = None,
        grad_norm_group: Any = None,
        grad_norm_skip: frozenset[int] = frozenset(),
        snapshot_fn: Callable[[Trainer], Path] | None = None,
        snapshot_steps: Iterable[int] = (),
    ) -> None:
        self.model = model
        self.raw_model = raw_model if raw_model is not None else model
        self.train = train
        self.device = torch.device(device)
        self.train_loader = train_loader
        self.eval_batches = list(eval_batches)
        self.debug = debug or DebugSpec()
        self.callbacks = list(callbacks)
        self.checkpoint_fn = checkpoint_fn
        self.snapshot_fn = snapshot_fn
        self.snapshot_steps = frozenset(int(s) for s in snapshot_steps)
        self.context_tokens = context_tokens
        self.optimizer = make_optimizer(param_groups, train, self.device)
        self.scaler = make_grad_scaler(train.precision, self.device.type)
        self.base_total_steps = total_steps
        self.schedule = make_schedule(train, total_steps, train.global_batch_size * context_tokens)
        if world_size < 1 or train.global_batch_size % world_size:
            raise ValueError(
                f"train.global_batch_size={train.global_batch_size} must be divisible by the "
                f"data-parallel world size {world_size}"
            )
        self.world_size = world_size
        self.local_batch_size = train.global_batch_size // world_size
        self.micro_batch_size = min(train.micro_batch_size or train.global_batch_size, self.local_batch_size)
        if self.local_batch_size % self.micro_batch_size:
            raise ValueError(
                f"train.micro_batch_size={self.micro_batch_size} must divide the per-rank batch "
                f"{self.local_batch_size} (global_batch_size / data-parallel world size {world_size})"
            )
        self.grad_sync = grad_sync or (lambda enabled: contextlib.nullcontext())
        self.forward_backward = forward_backward
        self.eval_fn = eval_fn
        self.grad_norm_group = grad_norm_group
        self.grad_norm_skip = grad_norm_skip
        #: loader batches per optimizer step (the batch-size controller may raise it)
        self.batch_multiplier = 1
        self.state = TrainState(total_steps=total_steps, global_batch_size=train.global_batch_size)
        self._iterator: Any = None

    # ------------------------------------------------------------------------- batch bookkeeping
    @property
    def base_step_tokens(self) -> int:
        return self.train.global_batch_size * self.context_tokens

    @property
    def step_tokens(self) -> int:
        return self.base_step_tokens * self.batch_multiplier

    @property
    def token_budget(self) -> int:
        return self.base_total_steps * self.base_step_tokens

    def set_batch_multiplier(self, multiplier: int) -> None:
        """Use `multiplier` loader batches per optimizer step from the next step on."""
        if multiplier < 1:
            raise ValueError(f"batch multiplier must be ≥ 1, got {multiplier}")
        self.batch_multiplier = multiplier
        self._update_total_steps()

    def _update_total_steps(self) -> None:
        remaining = max(0, self.token_budget - self.state.tokens)
        self.state.total_steps = self.state.step + remaining // self.step_tokens
        self.state.global_batch_size = self.train.global_batch_size * self.batch_multiplier

    # ----------------------------------------------------------------------------------- the loop
    def fit(self) -> TrainState:
        """Train until the token budget is spent or a callback stops the run; returns the final state."""
        state = self.state
        for cb in self.callbacks:
            cb.on_fit_start(self)
        self._iterator = iter(self.train_loader)
        self.run_steps()
        self.close()
        if state.status == "running":
            state.status = "done"
        for cb in self.callbacks:
            cb.on_fit_end(state)
        return state

    def run_steps(self) -> None:
        """The optimizer steps, each followed by `after_step` (async_ps runs them on Ray actors instead)."""
        state = self.state
        while state.step < state.total_steps and not state.stop:
            self._step()
            self.after_step()

    def after_step(self) -> None:
        """After a step: its callbacks, then evaluation, checkpoint and snapshot when they are due."""
        state = self.state
        for cb in self.callbacks:
            cb.on_step_end(state)
        if state.stop:
            return
        last = state.step >= state.total_steps
        if self.eval_batches and (last or state.step % self.train.eval_interval_steps == 0):
            state.eval_loss = self.evaluate()
            for cb in self.callbacks:
                cb.on_eval_end(state)
        if self.checkpoint_fn is not None and (
            last or state.step % self.train.checkpoint_interval_steps == 0
        ):
            path = self.checkpoint_fn(self)
            for cb in self.callbacks:
                cb.on_checkpoint(state, path)
        if self.snapshot_fn is not None and state.step in self.snapshot_steps:
            self.snapshot_fn(self)

    def close(self) -> None:
        """Close the training batch iterator (stops a loader's prefetch thread)."""
        close = getattr(self._iterator, "close", None)
        if close is not None:
            close()
        self._iterator = None

    def _step(self) -> None:
        state, debug = self.state, self.debug
        index = state.step + 1
        if debug.crash_at_step is not None and index >= max(1, debug.crash_at_step):
            raise RuntimeError(f"debug.crash_at_step={debug.crash_at_step}: injected crash at step {index}")
        t0 = time.perf_counter()
        progress = state.tokens / self.base_step_tokens
        lr_scale = self.schedule(progress)
        for g in self.optimizer.param_groups:
            g["lr"] = self.train.lr * lr_scale * g.get("lr_mult", 1.0)
        inject_nan = debug.nan_at_step is not None and index == debug.nan_at_step

        n_micro = self.batch_multiplier * (self.local_batch_size // self.micro_batch_size)
        loss_sum = torch.zeros((), device=self.device)
        done = 0
        for _ in range(self.batch_multiplier):
            batch = next(self._iterator).to(self.device, non_blocking=True)
            if self.forward_backward is not None:  # pipeline: the schedule does the micro-batches
                if self.batch_multiplier != 1:
                    raise ValueError("a growing batch (batch multiplier > 1) is not supported with pipelines")
                loss_sum += self.forward_backward(batch).float() * n_micro
                continue
            for mb in batch.split(self.micro_batch_size):
                done += 1
                with self.grad_sync(done == n_micro):
                    with autocast(self.device.type, self.train.precision):
                        loss = self.model(mb[:, :-1], mb[:, 1:])
                    if inject_nan:
                        loss = loss * math.nan
                    self.scaler.scale(loss / n_micro).backward()
                loss_sum += loss.detach().float()
        self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        max_norm = self.train.grad_clip if self.train.grad_clip is not None else math.inf
        grad_norm = clip_gradients(params, max_norm, group=self.grad_norm_group, skip=self.grad_norm_skip)
        loss_scale = current_loss_scale(self.scaler)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        loss_value = float(loss_sum / n_micro)  # syncs the device
        if debug.sleep_seconds_per_step:
            time.sleep(debug.sleep_seconds_per_step)
        dt = time.perf_counter() - t0

        state.step = index
        state.tokens += self.step_tokens
        state.loss = loss_value
        state.lr = self.train.lr * lr_scale
        state.grad_norm = float(grad_norm)
        state.loss_scale = loss_scale
        state.step_seconds = dt
        state.train_seconds += dt
        state.tokens_per_second = self.step_tokens / dt if dt > 0 else 0.0
        state.extra = {}

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over the fixed held-out batches."""
        if self.eval_fn is not None:
            return self.eval_fn(self.eval_batches)
        self.model.eval()
        total = torch.zeros((), device=self.device)
        count = 0
        for batch in self.eval_batches:
            batch = batch.to(self.device, non_blocking=True)
            for mb in batch.split(self.micro_batch_size):
                with autocast(self.device.type, self.train.precision):
                    loss = self.model(mb[:, :-1], mb[:, 1:])
                total += loss.float() * mb.shape[0]
                count += mb.shape[0]
        self.model.train()
        return float(total / max(1, count))

    # --------------------------------------------------------------------------- resumable state
    def tensor_state(self) -> dict[str, Any]:
        """State holding tensors (saved as safetensors plus a JSON skeleton; never pickled)."""
        return {"optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict()}

    def json_state(self) -> dict[str, Any]:
        """Plain-value state (saved as JSON): counters, loader position, callbacks."""
        s = self.state
        loader_state = self.train_loader.state_dict() if hasattr(self.train_loader, "state_dict") else None
        return {
            "step": s.step,
            "tokens": s.tokens,
            "train_seconds": s.train_seconds,
            "last_loss": s.loss if math.isfinite(s.loss) else None,
            "eval_loss": s.eval_loss,
            "batch_multiplier": self.batch_multiplier,
            "loader": loader_state,
            "callbacks": {cb.name: cb.state_dict() for cb in self.callbacks},
        }

    def load_state(self, tensor_state: dict[str, Any], json_state: dict[str, Any]) -> None:
        """Restore what `tensor_state`/`json_state` returned (model weights are restored separately)."""
        self.optimizer.load_state_dict(tensor_state["optimizer"])
        self.scaler.load_state_dict(tensor_state.get("scaler") or {})
        self.load_json_state(json_state)

    def load_json_state(self, json_state: dict[str, Any]) -> None:
        """Restore counters, loader position and callbacks (sharded checkpoints restore the optimizer
        themselves and call only this)."""
        s = self.state
        s.step = int(json_state["step"])
        s.tokens = int(json_state["tokens"])
        s.train_seconds = float(json_state.get("train_seconds", 0.0))
        last = json_state.get("last_loss")
        s.loss = math.nan if last is None else float(last)
        s.eval_loss = json_state.get("eval_loss")
        self.batch_multiplier = int(json_state.get("batch_multiplier", 1))
        self._update_total_steps()
        if json_state.get("loader") is not None and hasattr(self.train_loader, "load_state_dict"):
            self.train_loader.load_state_dict(json_state["loader"])
        saved = json_state.get("callbacks", {})
        for cb in self.callbacks:
            if cb.name in saved:
                cb.load_state_dict(saved[cb.name])
