"""Asynchronous (parameter-server) data parallelism on Ray actors, with a bound on gradient staleness.

Not a torch.distributed layout: `AsyncPSTrainer` replaces the training loop of `Trainer` (run.py picks it
for `train.strategy = "async_ps"`), and everything else of a run (claim, store, provenance, metrics.jsonl,
checkpoints, record.json) is run.py's as usual.

The scheme is K-batch asynchronous SGD (Dutta et al. 2018, "Slow and stale gradients can win the race")
over data shards: worker i reads rank i of `workers` of the run's deterministic loader order (the rows a
DDP rank i would read, `scalelab.data.loader.BlockLoader`) from the token store itself, one share of
global batch j after another. Update k takes `workers` shares; whoever is free takes the next one, from
its own shard, on the weights the parameter-server actors serve at that moment, and returns the share's
gradient. A share of update k may start only while the servers' version v ≥ k − max_staleness, so its
gradient is at most max_staleness versions old when applied. With max_staleness = 0 every worker gives
each update exactly one share, its rows of global batch k, computed on the weights it updates: the run
equals synchronous training on the same global batches (float tolerance: the shares' mean is taken in
another order than one process's accumulation). With a bound above 0 a fast worker takes more shares and
so walks further through its own shard than a slow one (as in any asynchronous data parallelism). When
all shares of update k are in, the driver combines the servers' gradient norms for clipping and the
servers apply the update with the run's optimizer groups (AdamW, schedule, clipping as in trainer.py);
its LR is scaled by 1 / (1 + mean staleness) with `staleness_lr = "inverse"`. A fast worker thus keeps
working while a slow one finishes, instead of waiting for it every step as DDP does.

Parameters are split over `servers` actors (balanced by size). Each update's staleness (max, mean over its
shares) goes to metrics.jsonl. A worker whose process dies is replaced (up to `worker_restarts` times; the
replacement recomputes its share from the same shard) or the run fails with `WorkerLostError`; no share
finishing within `timeout_seconds` fails it with `AsyncPSTimeout`: never a hang. The driver sends a worker
only a position number and references to the servers' weights; the token store must be at the same path
for every worker (a shared file system on a multi-node Ray cluster, as for DDP). Checkpoints keep each
shard's position after the last applied update. CPU only.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from scalelab.errors import TrainingError
from scalelab.spec import RunSpec
from scalelab.train.trainer import Trainer

log = logging.getLogger(__name__)


class WorkerLostError(TrainingError):
    """An async_ps worker actor died more often than train.async_ps.worker_restarts allows."""


class AsyncPSTimeout(TrainingError):
    """No async_ps share finished within train.async_ps.timeout_seconds."""


def _build_model(spec_json: str, vocab: int) -> nn.Module:
    """The run's model with its parametrization applied (μP multipliers act in the forward)."""
    from scalelab.models.parametrization import apply_parametrization
    from scalelab.models.registry import build_model

    spec = RunSpec.model_validate_json(spec_json)
    model = build_model(spec.model, vocab)
    apply_parametrization(model, spec.model)
    return model


@dataclass(frozen=True)
class ShardSource:
    """Where the workers read their shards: the driver's loader order (store, split, block and batch size,
    seed), each worker taking rank `index` of `workers` of every global batch."""

    store: str
    split: str
    block_tokens: int
    global_batch_size: int
    seed: int
    workers: int

    @classmethod
    def of(cls, loader: Any, workers: int) -> ShardSource:
        """The order of the run's (single-process) `BlockLoader`; TrainingError for any other loader."""
        from scalelab.data.loader import BlockLoader

        if not isinstance(loader, BlockLoader) or loader.world_size != 1 or not loader.shuffle:
            raise TrainingError(
                "train.strategy='async_ps': workers read their shards of the token store with the run's "
                f"BlockLoader order, but the trainer was given {type(loader).__name__}; train without a "
                "custom loader_factory"
            )
        return cls(
            str(loader.store.path),
            loader.split,
            loader.block_tokens,
            loader.global_batch_size,
            loader.seed,
            workers,
        )

    def loader(self, index: int) -> Any:
        """Worker `index`'s loader: rank `index` of `workers`, as DDP rank `index` would read."""
        from scalelab.data.store import TokenStore
        from scalelab.train.build import block_loader_factory

        make = block_loader_factory(rank=index, world_size=self.workers)
        return make(
            TokenStore.open(self.store), self.split, self.block_tokens, self.global_batch_size, self.seed
        )


class GradientWorker:
    """A Ray actor: reads its shard of a global batch from the token store, loads served weights, returns
    the share's mean-loss gradient."""

    def __init__(
        self,
        spec_json: str,
        vocab: int,
        index: int,
        threads: int,
        source: ShardSource,
        slow_factor: float,
        kill_at: int | None,
    ) -> None:
        torch.set_num_threads(threads)
        self.model = _build_model(spec_json, vocab)
        self.params = dict(self.model.named_parameters())
        self.loader = source.loader(index)
        self.index, self.slow_factor, self.kill_at, self.done = index, slow_factor, kill_at, 0

    def ready(self) -> bool:
        return True

    def compute(
        self, position: int, micro: int, partition: list[list[str]], *weights: dict[str, torch.Tensor]
    ) -> tuple[Any, ...]:
        """({"loss", "seconds"}, then one {name: grad} per server in `partition`) for this worker's rows of
        global batch `position` (read here, counted in "seconds")."""
        self.done += 1
        if self.kill_at is not None and self.done >= self.kill_at:
            log.warning("debug.kill_worker_at_share: worker %d exits", self.index)
            os._exit(1)  # a real process death, as an OOM kill or a lost node would be
        t0 = time.perf_counter()
        share = self.loader.make_batch(position)
        with torch.no_grad():
            for part in weights:
                for name, value in part.items():
                    self.params[name].copy_(value)
        for p in self.params.values():
            p.grad = None
        chunks = share.split(micro)
        loss_sum = 0.0
        for mb in chunks:
            loss = self.model(mb[:, :-1], mb[:, 1:])
            (loss / len(chunks)).backward()
            loss_sum += float(loss.detach())
        grads = [{n: self._grad(n) for n in names} for names in partition]
        seconds = time.perf_counter() - t0
        if self.slow_factor > 1:  # debug.slow_worker: this worker runs slow_factor × slower
            time.sleep((self.slow_factor - 1) * seconds)
        return ({"loss": loss_sum / len(chunks), "seconds": time.perf_counter() - t0}, *grads)

    def _grad(self, name: str) -> torch.Tensor:
        g = self.params[name].grad
        return torch.zeros_like(self.params[name]) if g is None else g


class ParameterServer:
    """A Ray actor holding some parameters and their optimizer state; applies updates, serves weights."""

    def __init__(
        self, spec_json: str, groups: list[dict[str, Any]], tensors: dict[str, torch.Tensor]
    ) -> None:
        from scalelab.train.trainer import make_optimizer

        spec = RunSpec.model_validate_json(spec_json)
        torch.set_num_threads(1)
        self.train = spec.train
        self.params = {n: nn.Parameter(t.clone()) for n, t in tensors.items()}
        opt_groups = [{**g, "params": [self.params[n] for n in g["names"]]} for g in groups]
        self.optimizer = make_optimizer(
            [{k: v for k, v in g.items() if k != "names"} for g in opt_groups],
            self.train,
            torch.device("cpu"),
        )

    def weights(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.params.items()}

    def accumulate(self, *shares: dict[str, torch.Tensor]) -> float:
        """Set the gradient to the mean of the shares' (in share order); returns its squared L2 norm."""
        for name, p in self.params.items():
            p.grad = torch.stack([s[name] for s in shares]).sum(0) / len(shares)
        grads = [p.grad for p in self.params.values()]
        return float(torch.nn.utils.get_total_norm(grads, 2.0) ** 2) if grads else 0.0

    def step(self, total_norm: float, lr_scale: float) -> None:
        """Clip by the global norm (all servers') and take one optimizer step at train.lr × `lr_scale`."""
        params = list(self.params.values())
        max_norm = self.train.grad_clip if self.train.grad_clip is not None else math.inf
        if params:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, torch.tensor(total_norm))
        for g in self.optimizer.param_groups:
            g["lr"] = self.train.lr * lr_scale * g.get("lr_mult", 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def optimizer_state(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_optimizer_state(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state)


def staleness_lr_factor(mode: str, staleness: list[int]) -> float:
    """An update's LR multiplier: 1 / (1 + mean staleness of its shares) for "inverse" (Zhang et al. 2016,
    "Staleness-aware async-SGD"), 1 for "none"."""
    if mode == "none" or not staleness:
        return 1.0
    return 1.0 / (1.0 + sum(staleness) / len(staleness))


def partition_params(model: nn.Module, servers: int) -> list[list[str]]:
    """The model's parameter names split over `servers` bins, largest first into the emptiest (stable)."""
    bins: list[list[str]] = [[] for _ in range(servers)]
    sizes = [0] * servers
    named = sorted(model.named_parameters(), key=lambda kv: -kv[1].numel())
    for name, p in named:
        i = sizes.index(min(sizes))
        bins[i].append(name)
        sizes[i] += p.numel()
    order = {n: i for i, (n, _) in enumerate(model.named_parameters())}
    return [sorted(b, key=order.__getitem__) for b in bins]


def server_groups(model: nn.Module, groups: list[dict[str, Any]], names: list[str]) -> list[dict[str, Any]]:
    """The optimizer groups restricted to `names` (their options kept; parameters by name)."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    keep = set(names)
    out = []
    for i, g in enumerate(groups):
        mine = [name_of[id(p)] for p in g["params"] if name_of.get(id(p)) in keep]
        out.append(
            {
                **{k: v for k, v in g.items() if k != "params"},
                "name": g.get("name", f"group{i}"),
                "names": mine,
            }
        )
    return out


@dataclass
class _Share:
    """One share of one update: worker `worker`'s rows of global batch `position`."""

    update: int
    worker: int
    position: int
    version: int = 0  # the servers' version its weights have
    grads: list[Any] = field(default_factory=list)


class AsyncPSTrainer(Trainer):
    """A `Trainer` whose `fit` runs the updates on Ray workers and parameter servers (module docstring).

    State, callbacks, evaluation, checkpoints (model weights from the servers, their optimizer states
    under "servers") and resume are the base class's; the driver's own optimizer is unused."""

    def __init__(
        self,
        model: nn.Module,
        param_groups: list[dict[str, Any]],
        train: Any,
        *,
        spec: RunSpec,
        vocab: int,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, param_groups, train, **kwargs)
        self.param_groups = list(param_groups)
        self.spec, self.vocab, self.cfg = spec, vocab, spec.train.async_ps
        if self.device.type != "cpu":
            raise TrainingError(
                f"strategy='async_ps' runs on CPU only for now, got train.device={self.device}"
            )
        workers = self.cfg.workers
        self.share_size = self.train.global_batch_size // workers
        self.share_micro = min(self.micro_batch_size, self.share_size)
        if self.share_size % self.share_micro:
            raise TrainingError(
                f"train.micro_batch_size={self.share_micro} must divide each async_ps share "
                f"(global_batch_size / async_ps.workers = {self.share_size})"
            )
        self.partition = partition_params(self.raw_model, self.cfg.servers)
        self.source = ShardSource.of(self.train_loader, workers)
        #: per worker, the next position of its shard after the applied updates (what a checkpoint keeps)
        self.positions = [self.train_loader.position] * workers
        self.servers: list[Any] = []
        self.workers: list[Any] = []
        self.restarts = 0
        self._own_ray = False
        self._server_states: dict[str, Any] | None = None
        for cb in self.callbacks:  # an update's interval is not its compute (shares run ahead): no MFU
            if getattr(cb, "peak_flops", None):
                cb.peak_flops = None  # type: ignore[attr-defined]

    # ------------------------------------------------------------------------------- actors
    def _start(self) -> None:
        """Connect to Ray (a local instance when none is running, shut down again by `_stop`) and start
        the actors."""
        try:
            import ray
        except ImportError as err:
            raise TrainingError("train.strategy='async_ps' needs Ray: pip install 'scalelab[ray]'") from err

        if not ray.is_initialized():
            ray.init(num_cpus=max(2, self.cfg.workers), include_dashboard=False, log_to_driver=False)
            self._own_ray = True
        spec_json = self.spec.model_dump_json()
        named = dict(self.raw_model.named_parameters())
        Server = ray.remote(num_cpus=0)(ParameterServer)
        self.servers = [
            Server.remote(
                spec_json,
                server_groups(self.raw_model, self.param_groups, names),
                {n: named[n].detach().cpu() for n in names},
            )
            for names in self.partition
        ]
        if self._server_states is not None:
            ray.get(
                [
                    s.load_optimizer_state.remote(self._server_states[f"server{i}"])
                    for i, s in enumerate(self.servers)
                ]
            )
        self.workers = [self._new_worker(i, first=True) for i in range(self.cfg.workers)]
        ray.get([w.ready.remote() for w in self.workers])  # start-up is not training time

    def _new_worker(self, index: int, first: bool) -> Any:
        import ray

        debug = self.spec.debug
        slow = debug.slow_factor if debug.slow_worker == index else 1.0
        kill = debug.kill_worker_at_share if first and index == 0 else None
        Worker = ray.remote(num_cpus=0, max_restarts=0)(GradientWorker)
        return Worker.remote(
            self.spec.model_dump_json(), self.vocab, index, self.train.threads or 1, self.source, slow, kill
        )

    def _stop(self) -> None:
        import ray

        for actor in [*self.workers, *self.servers]:
            ray.kill(actor)
        self.workers, self.servers = [], []
        if self._own_ray:
            ray.shutdown()
            self._own_ray = False

    # ---------------------------------------------------------------------------------- loop
    def run_steps(self) -> None:
        try:
            self._start()
            self._loop()
        finally:
            self._stop()

    def _loop(self) -> None:
        import ray
        from ray.exceptions import RayActorError

        state, workers = self.state, self.cfg.workers
        first = state.step  # the version the servers start at (a resumed run's step)
        idle = deque(range(workers))
        retry: dict[int, _Share] = {}  # worker → its share to recompute (a replaced worker's)
        reading = list(self.positions)  # per worker, the next position of its shard to hand out
        flying: dict[Any, _Share] = {}
        finished: dict[int, list[tuple[_Share, dict[str, float]]]] = {}
        next_update, slots = first, 0  # the update the next new share goes to; its shares handed out
        weights = [s.weights.remote() for s in self.servers]
        t_last = time.perf_counter()
        while state.step < state.total_steps and not state.stop:
            version = state.step
            waiting: deque[int] = deque()
            while idle:
                w = idle.popleft()
                share = retry.pop(w, None)
                if share is None:
                    if next_update >= state.total_steps or version < next_update - self.cfg.max_staleness:
                        waiting.append(w)
                        continue
                    share = _Share(next_update, w, reading[w])
                    reading[w] += 1
                    slots += 1
                    if slots == workers:
                        next_update, slots = next_update + 1, 0
                share.version = version
                refs = (
                    self.workers[w]
                    .compute.options(num_returns=1 + len(self.servers))
                    .remote(share.position, self.share_micro, self.partition, *weights)
                )
                share.grads = list(refs[1:])
                flying[refs[0]] = share
            idle = waiting
            ready, _ = ray.wait(list(flying), num_returns=1, timeout=self.cfg.timeout_seconds)
            if not ready:
                raise AsyncPSTimeout(
                    f"no async_ps share finished in {self.cfg.timeout_seconds:g} s "
                    f"(train.async_ps.timeout_seconds); {len(flying)} in flight"
                )
            share = flying.pop(ready[0])
            try:
                stats = ray.get(ready[0])
            except RayActorError as err:
                self._replace(share.worker, err)
                retry[share.worker] = share  # only its replacement reads that shard
                idle.append(share.worker)
                continue
            idle.append(share.worker)
            finished.setdefault(share.update, []).append((share, stats))
            while len(finished.get(state.step, ())) == workers and not state.stop:
                done = sorted(finished.pop(state.step), key=lambda d: (d[0].worker, d[0].position))
                self._apply(done)
                weights = [s.weights.remote() for s in self.servers]
                now = time.perf_counter()
                self._after_update(now - t_last)
                t_last = time.perf_counter()

    def _replace(self, index: int, err: Exception) -> None:
        """Start a new worker in place of dead worker `index`, or fail when restarts are spent."""
        self.restarts += 1
        if self.restarts > self.cfg.worker_restarts:
            raise WorkerLostError(
                f"async_ps worker {index} died ({type(err).__name__}) after {self.restarts - 1} restart(s); "
                f"train.async_ps.worker_restarts={self.cfg.worker_restarts} allows no more"
            )
        log.warning(
            "async_ps worker %d died (%s); restarting it (%d/%d)",
            index,
            type(err).__name__,
            self.restarts,
            self.cfg.worker_restarts,
        )
        self.workers[index] = self._new_worker(index, first=False)

    def _apply(self, shares: list[tuple[_Share, dict[str, float]]]) -> None:
        """Update `state.step` on the servers from its shares: global clip norm, staleness-scaled LR."""
        import ray

        state = self.state
        stale = [state.step - s.version for s, _ in shares]
        per_server = [[s.grads[j] for s, _ in shares] for j in range(len(self.servers))]
        squares = ray.get(
            [srv.accumulate.remote(*g) for srv, g in zip(self.servers, per_server, strict=True)]
        )
        total = math.sqrt(sum(squares))
        mean_stale = sum(stale) / len(stale)
        factor = staleness_lr_factor(self.cfg.staleness_lr, stale)
        lr_scale = self.schedule(state.tokens / self.base_step_tokens)
        ray.get([srv.step.remote(total, lr_scale * factor) for srv in self.servers])
        for s, _ in shares:  # a shard's shares go to updates in its order: its applied ones are a prefix
            self.positions[s.worker] = max(self.positions[s.worker], s.position + 1)
        state.loss = sum(st["loss"] for _, st in shares) / len(shares)
        if self.debug.nan_at_step is not None and state.step + 1 == self.debug.nan_at_step:
            state.loss = math.nan
        state.lr = self.train.lr * lr_scale * factor
        state.grad_norm = total
        state.extra = {
            "metrics": {
                "staleness_max": max(stale),
                "staleness_mean": mean_stale,
                "staleness_lr_factor": factor,
                "workers": self.cfg.workers,
                "worker_restarts": self.restarts,
                "share_seconds_max": max(st["seconds"] for _, st in shares),
            }
        }

    def _after_update(self, seconds: float) -> None:
        """Counters after one update, then callbacks, evaluation and checkpoints as after any step."""
        state = self.state
        state.step += 1
        state.tokens += self.step_tokens
        state.step_seconds = seconds
        state.train_seconds += seconds
        state.tokens_per_second = self.step_tokens / seconds if seconds > 0 else 0.0
        self.after_step()

    @torch.no_grad()
    def evaluate(self) -> float:
        self._pull_weights()
        return super().evaluate()

    def _pull_weights(self) -> None:
        """The servers' current weights into the driver's model (evaluation, checkpoints, the end)."""
        import ray

        named = dict(self.raw_model.named_parameters())
        with torch.no_grad():
            for part in ray.get([s.weights.remote() for s in self.servers]):
                for name, value in part.items():
                    named[name].copy_(value)

    # --------------------------------------------------------------------------- resumable state
    def tensor_state(self) -> dict[str, Any]:
        """The servers' optimizer states; also pulls their weights into the model a checkpoint saves."""
        import ray

        self._pull_weights()
        states = ray.get([s.optimizer_state.remote() for s in self.servers])
        return {"servers": {f"server{i}": st for i, st in enumerate(states)}}

    def json_state(self) -> dict[str, Any]:
        """The base state, the loader at the least advanced shard's position, and every shard's."""
        js = super().json_state()
        loader = self.train_loader.state_dict()
        loader["epoch"], loader["batch"] = divmod(min(self.positions), self.train_loader.batches_per_epoch)
        js["loader"] = loader
        js["async_ps_positions"] = list(self.positions)
        return js

    def load_state(self, tensor_state: dict[str, Any], json_state: dict[str, Any]) -> None:
        servers = tensor_state.get("servers")
        if not isinstance(servers, dict) or len(servers) != self.cfg.servers:
            raise TrainingError("checkpoint: no async_ps server states for this many servers; resume=False")
        self._server_states = servers
        self.load_json_state(json_state)  # checks the loader state against this run's store and order
        saved = json_state.get("async_ps_positions")
        if saved is None:  # a checkpoint of the driver-read scheme: every shard at the loader's position
            saved = [self.train_loader.position] * self.cfg.workers
        if len(saved) != self.cfg.workers or any(not isinstance(x, int) or x < 0 for x in saved):
            raise TrainingError(
                f"checkpoint: async_ps_positions={saved!r} does not hold one position per worker "
                f"(train.async_ps.workers={self.cfg.workers}); resume=False"
            )
        self.positions = list(saved)
