"""Distributed training from the outside: torchrun environment, process group, device mesh, and what
every layout shares (compilation, accumulation, optimizer groups by name, cross-rank metrics).

The model file never imports `torch.distributed`; the layouts themselves (DDP, FSDP2, tensor and
pipeline parallelism) are plug-ins of `scalelab.train.parallel`, applied as
``model = parallelize(model, ctx.mesh, spec.train)``:

* **Environment.** `DistEnv.from_env()` reads what torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK,
  LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT); a process started without torchrun is a world of one.
  `init_distributed` creates the process group — gloo on CPU, nccl on CUDA (device = LOCAL_RANK) — and
  the device mesh with dimensions ``("pp", "dp", "tp")`` of sizes
  (pipeline_parallel, world / (pp·tp), tensor_parallel).
* **Layouts.** `scalelab.train.parallel`: ``ddp`` (a DDP wrapper whose communication hook measures each
  rank's local gradient norm), ``fsdp`` (FSDP2 per block and at the root), ``tensor`` (the model
  family's `tp_plan` on the ``tp`` dimension, before FSDP), ``pipeline`` (stages cut from the block list).
* **Compilation.** ``train.compile`` compiles the whole wrapped model (`compile_for_training`; pipeline
  stages per block), which the trainer calls while everything else keeps the wrapper itself.
* **Accumulation.** `grad_sync(model, enabled)` is the context the trainer wraps every micro-batch but the
  last in: `no_sync()` for DDP, `set_requires_gradient_sync(False)` for FSDP2.
* **Param groups.** Wrapping may replace parameter objects (FSDP2 swaps in DTensor parameters), so
  μP/SP optimizer groups are carried over by parameter *name*: `param_group_index` before wrapping,
  `regroup` after.
* **Cross-rank metrics.** `CrossRankMetrics`, the first callback on every rank, all-gathers each rank's
  loss, local gradient norm and step time: the logged loss is the mean over ranks, the spread
  (min/max/std over all ranks) of gradient norms and step times shows stragglers and imbalance, and
  throughput is the global tokens over the slowest rank's step time. The logged ``grad_norm`` is the
  global norm the trainer clips by (the same on every rank); ``grad_norm_min/max/std`` spread the
  per-rank *local* norms, which `parallelize` measures where each rank's gradient enters data-parallel
  averaging (before it), so they say something different under each layout:

  - ``ddp`` / ``fsdp`` (tp = pp = 1): the norm of the full-model gradient of the rank's own micro-batches.
    Every rank holds the same parameters, so the spread is data heterogeneity (and a rank whose norm
    leaves the pack points at its data or its hardware); the global norm is that of the mean gradient.
  - tensor parallel: the norm of the rank's shard — its column/row slices of the attention and MLP
    matrices — plus the replicated parameters (embeddings, LayerNorms, output layer), whose gradients are
    identical on the tensor-parallel ranks of a data-parallel replica. With data-parallel size 1,
    local_r² = R² + S_r² and grad_norm² = R² + Σ_r S_r² (R: replicated part, S_r: shard r), so
    every local norm is at most the global one; the spread is how unevenly the heads / MLP columns of
    the shards carry the gradient.
  - pipeline parallel: the norm of the gradient the rank's stage computed for the parameters it holds
    (its blocks; the embeddings on the first stage, the final LayerNorm and output layer on the last),
    averaged over the pipeline micro-batches. Stages hold disjoint parameters, so the spread is how the
    gradient is distributed along the depth (an exploding stage stands out), not data noise. With
    untied embeddings and data-parallel size 1, Σ_stages local² = grad_norm². A tied embedding/output
    weight is counted on each of its two stages with that stage's contribution only (the embedding
    lookup's gradient on the first, the output layer's on the last — measured before they are summed).
  - meshes with several dimensions (e.g. data × tensor): all ranks are pooled, so the spread mixes the
    data spread with the shard/stage spread above.

  Step-time spread means the same everywhere: the slowest rank sets the step time, the fastest shows
  what the others wait (under pipeline parallelism the first and last stages do extra work).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from scalelab.errors import DistributedError
from scalelab.spec import TrainSpec
from scalelab.train.parallel.base import blocks_of
from scalelab.train.parallel.gradnorm import GradNormRecorder
from scalelab.train.trainer import Callback, TrainState

log = logging.getLogger(__name__)

#: wrapper prefixes that `named_parameters` of a wrapped model may add in front of the raw names
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")

#: process-group timeout (seconds); a rank stuck longer than this in a collective fails the run
TIMEOUT_ENV = "SCALELAB_DIST_TIMEOUT_SECONDS"


# ---------------------------------------------------------------------------------- environment
def _env_int(environ: Mapping[str, str], name: str, default: int | None = None) -> int:
    raw = environ.get(name)
    if raw is None:
        if default is None:
            raise DistributedError(
                f"environment variable {name} is not set; launch with torchrun "
                "(`scalelab launch` or `python -m torch.distributed.run`) or unset RANK/WORLD_SIZE"
            )
        return default
    try:
        return int(raw)
    except ValueError:
        raise DistributedError(f"environment variable {name}={raw!r} is not an integer") from None


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job, as torchrun describes it."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    master_addr: str | None = None
    master_port: int | None = None
    launched: bool = False  # True when started by torchrun (env:// rendezvous); False: a world of one

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> DistEnv:
        """Read torchrun's variables; without RANK and WORLD_SIZE this process is a world of one."""
        env = os.environ if environ is None else environ
        if "RANK" not in env and "WORLD_SIZE" not in env:
            return cls()
        world = _env_int(env, "WORLD_SIZE")
        rank = _env_int(env, "RANK")
        local_rank = _env_int(env, "LOCAL_RANK", rank)
        local_world = _env_int(env, "LOCAL_WORLD_SIZE", world)
        if world < 1:
            raise DistributedError(f"environment variable WORLD_SIZE={world} must be at least 1")
        if not 0 <= rank < world:
            raise DistributedError(f"environment variable RANK={rank} must be in [0, WORLD_SIZE={world})")
        if not 0 <= local_rank < local_world:
            raise DistributedError(
                f"environment variable LOCAL_RANK={local_rank} must be in [0, LOCAL_WORLD_SIZE={local_world})"
            )
        addr = env.get("MASTER_ADDR")
        if not addr:
            raise DistributedError("environment variable MASTER_ADDR is not set (torchrun sets it)")
        port = _env_int(env, "MASTER_PORT")
        return cls(rank, world, local_rank, local_world, addr, port, launched=True)


def backend_for(device: torch.device) -> str:
    """nccl for CUDA devices, gloo for CPU."""
    return "nccl" if device.type == "cuda" else "gloo"


def device_for(env: DistEnv, device_pref: str) -> torch.device:
    """The device of this rank: cuda:LOCAL_RANK when CUDA is used, else cpu."""
    use_cuda = device_pref == "cuda" or (device_pref == "auto" and torch.cuda.is_available())
    if not use_cuda:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DistributedError("train.device: 'cuda' requested but no CUDA device is available")
    if env.local_rank >= torch.cuda.device_count():
        raise DistributedError(
            f"environment variable LOCAL_RANK={env.local_rank} but only {torch.cuda.device_count()} "
            "CUDA devices are visible; use --nproc-per-node ≤ the number of GPUs"
        )
    return torch.device("cuda", env.local_rank)


@dataclass
class DistContext:
    """A live process group, this rank's device and the device mesh (dims pp, dp, tp)."""

    env: DistEnv
    device: torch.device
    backend: str
    mesh: Any  # torch.distributed.device_mesh.DeviceMesh
    owns_group: bool = True

    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def world_size(self) -> int:
        return self.env.world_size

    @property
    def local_rank(self) -> int:
        return self.env.local_rank

    @property
    def is_main(self) -> bool:
        return self.env.rank == 0

    @property
    def dp_size(self) -> int:
        return int(self.mesh["dp"].size())

    @property
    def dp_rank(self) -> int:
        return int(self.mesh["dp"].get_local_rank())

    def barrier(self) -> None:
        if self.device.type == "cuda":
            dist.barrier(device_ids=[self.device.index])
        else:
            dist.barrier()

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        """`obj` of rank `src`, on every rank (pickled)."""
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank (pickled)."""
        box: list[Any] = [None] * self.world_size
        dist.all_gather_object(box, obj)
        return box

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


@dataclass
class SingleProcess:
    """The context of a run in one process: DistContext's interface with no process group (mesh None)."""

    device: torch.device
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    is_main: bool = True
    dp_rank: int = 0
    dp_size: int = 1
    mesh: Any = None

    def barrier(self) -> None:
        pass

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        return obj

    def gather(self, obj: Any) -> list[Any]:
        return [obj]

    def close(self) -> None:
        pass


def mesh_layout(world_size: int, train: TrainSpec) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """(dimension names, sizes) of the device mesh for this world, from the registered layouts
    (`scalelab.train.parallel.mesh_dims`: e.g. ("pp", "dp", "tp")); DistributedError when the
    model-parallel degrees do not divide the world."""
    from scalelab.train.parallel import mesh_dims

    dims = mesh_dims(train)
    model_parallel = math.prod(size for _, size, field in dims if field)
    if world_size % model_parallel:
        degrees = " × ".join(f"train.{field}={size}" for _, size, field in dims if field)
        raise DistributedError(
            f"WORLD_SIZE={world_size} is not divisible by {degrees}; change the number of processes or "
            "the degrees"
        )
    names = tuple(name for name, _, _ in dims)
    sizes = tuple(size if field else world_size // model_parallel for _, size, field in dims)
    return names, sizes


def mesh_shape(world_size: int, train: TrainSpec) -> tuple[int, ...]:
    """The mesh's sizes for this world, in `mesh_layout`'s order ((pp, dp, tp) today)."""
    return mesh_layout(world_size, train)[1]


def _rendezvous_store(env: DistEnv, timeout: datetime.timedelta) -> dist.Store:
    """The key-value store the group rendezvous through: MASTER_ADDR:MASTER_PORT, with a key prefix
    per torchrun restart attempt.

    torchrun's agent keeps one TCPStore for all restart attempts (TORCHELASTIC_USE_AGENT_STORE=True);
    without a per-attempt prefix, a restarted group would read the addresses of the killed attempt's
    ranks and fail with "Gloo connectFullMesh failed … Connection refused". Without the agent's store,
    rank 0 hosts it (like env://).
    """
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(
        str(env.master_addr),
        int(env.master_port or 0),
        env.world_size,
        is_master=not agent and env.rank == 0,
        timeout=timeout,
        multi_tenant=not agent,
    )
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    return dist.PrefixStore(f"scalelab/{run_id}/attempt-{attempt}", store)


def init_distributed(train: TrainSpec, env: DistEnv | None = None) -> DistContext:
    """Create the process group (gloo/nccl) and the (pp, dp, tp) device mesh for this rank.

    Under torchrun the group rendezvous through env:// (MASTER_ADDR/MASTER_PORT); otherwise a
    single-rank group on an in-process store. An existing default group is reused (not destroyed).
    """
    from torch.distributed.device_mesh import init_device_mesh

    env = env or DistEnv.from_env()
    device = device_for(env, train.device)
    backend = backend_for(device)
    if backend == "nccl" and not dist.is_nccl_available():
        raise DistributedError("train.device: CUDA selected but this torch build has no NCCL backend")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, "600")))
    owns = not dist.is_initialized()
    if owns:
        if env.launched:
            dist.init_process_group(
                backend,
                store=_rendezvous_store(env, timeout),
                rank=env.rank,
                world_size=env.world_size,
                timeout=timeout,
                device_id=device if device.type == "cuda" else None,
            )
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    elif dist.get_world_size() != env.world_size:
        raise DistributedError(
            f"a process group of size {dist.get_world_size()} exists but WORLD_SIZE={env.world_size}"
        )
    names, shape = mesh_layout(env.world_size, train)
    mesh = init_device_mesh(device.type, shape, mesh_dim_names=names)
    log.info(
        "rank %d/%d on %s (%s), mesh %s = %s",
        env.rank,
        env.world_size,
        device,
        backend,
        "×".join(names),
        shape,
    )
    return DistContext(env, device, backend, mesh, owns_group=owns)


# ---------------------------------------------------------------------------- compilation
def compile_for_training(model: nn.Module, train: TrainSpec, *, pipelined: bool = False) -> nn.Module:
    """The module the trainer calls: `model` (as `parallelize` returned it) compiled when ``train.compile``.

    The whole wrapped model is compiled (DDP's graph is split at its gradient buckets), so the
    embeddings, the output layer and the loss are fused too. On one H100 (GPT-2-small shape, bf16,
    world of one, `benchmarks/bench_train_strategies.py`, each variant in its own process) DDP ran at
    0.92× the compiled single-process trainer this way and 0.63× with only the blocks compiled; FSDP2
    ran at 0.50× either way (0.65× with ``fsdp_reshard_after_forward = false``), its per-block hooks
    leaving the GPU idle about half the step at this size. Pipeline stages are driven by the schedule,
    not called as a whole, so there each block is compiled in place (`compile_blocks`). Keep using
    `model` itself for `grad_sync`, norms and checkpoints: the compiled module shares its parameters.
    """
    if not train.compile:
        return model
    if pipelined:
        compile_blocks(model)
        return model
    return torch.compile(model)


def compile_blocks(model: nn.Module) -> None:
    """`torch.compile` each transformer block in place (`nn.Module.compile`: names and parameters stay)."""
    for block in blocks_of(model):
        block.compile()


@contextlib.contextmanager
def grad_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Inside, backward passes of `model` synchronize gradients across ranks only when `enabled`.

    DDP: `no_sync()`; FSDP2: `set_requires_gradient_sync(False)` (restored on exit); other modules:
    nothing to do. The trainer enters it with enabled=False for every micro-batch but a step's last.
    """
    if enabled:
        yield
        return
    no_sync = getattr(model, "no_sync", None)
    if no_sync is not None and not hasattr(model, "set_requires_gradient_sync"):
        with no_sync():
            yield
        return
    setter = getattr(model, "set_requires_gradient_sync", None)
    if setter is None:
        yield
        return
    setter(False)
    try:
        yield
    finally:
        setter(True)


def strip_wrapper_prefixes(name: str) -> str:
    """A parameter name as the unwrapped model spells it (DDP's `module.`, compile's `_orig_mod.` gone)."""
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix) :], True
            name = name.replace("." + prefix, ".")
    return name


def param_group_index(model: nn.Module, groups: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """{parameter name: index of its group} — take it *before* wrapping (tied weights: first name)."""
    by_id = {id(p): i for i, g in enumerate(groups) for p in g["params"]}
    index: dict[str, int] = {}
    for name, p in model.named_parameters(remove_duplicate=False):  # tied weights under every name
        if id(p) not in by_id:
            raise DistributedError(f"parameter {name} is in no optimizer group")
        index[strip_wrapper_prefixes(name)] = by_id[id(p)]
    return index


def regroup(
    model: nn.Module, groups: Sequence[Mapping[str, Any]], index: Mapping[str, int]
) -> list[dict[str, Any]]:
    """The same groups (names, multipliers) holding the parameters of the wrapped `model`."""
    out = [{**dict(g), "params": []} for g in groups]
    for name, p in model.named_parameters():
        key = strip_wrapper_prefixes(name)
        if key not in index:
            raise DistributedError(f"wrapped parameter {name} has no optimizer group (unwrapped: {key})")
        out[index[key]]["params"].append(p)
    return [g for g in out if g["params"]]


# ---------------------------------------------------------------------------- cross-rank metrics
def _spread(values: torch.Tensor) -> tuple[float, float, float]:
    v = values.double()
    return float(v.min()), float(v.max()), float(v.std(unbiased=False)) if v.numel() > 1 else 0.0


class CrossRankMetrics(Callback):
    """First callback on every rank: make the step's state global and add the cross-rank spread.

    After it, `state.loss` is the mean of the ranks' losses (so every rank's DivergenceGuard decides the
    same), `state.step_seconds` the slowest rank's time, `state.tokens_per_second` the global throughput,
    and `state.extra["metrics"]` carries, for the metrics.jsonl line, grad_norm_min/max/std (per-rank
    local gradient norms before data-parallel averaging: the full model under DDP/FSDP, the rank's shard
    under tensor parallelism, its stage under pipeline parallelism — the module docstring says what their
    spread means in each case; absent when a rank has no recorder) and step_seconds_min/max/std;
    `state.extra["local_grad_norms"]` lists the per-rank local norms in rank order (when every rank has
    one): the gradient-noise estimator (train/noise_scale.py) reads them as small-batch gradients.
    """

    def __init__(self, group: Any = None, grad_norm_source: GradNormRecorder | None = None) -> None:
        self.group = group
        self.grad_norm_source = grad_norm_source
        self.world_size = 1

    def on_fit_start(self, trainer: Any) -> None:
        super().on_fit_start(trainer)
        self.world_size = dist.get_world_size(self.group)

    def on_step_end(self, state: TrainState) -> None:
        local_norm = self.grad_norm_source.take() if self.grad_norm_source is not None else None
        if local_norm is not None:
            local_norm /= state.loss_scale  # hooks saw the fp16-scaled gradients
        mine = torch.tensor(
            [state.loss, math.nan if local_norm is None else local_norm, state.step_seconds],
            dtype=torch.float64,
        )
        device = self.trainer.device if self.trainer is not None else torch.device("cpu")
        if device.type == "cuda":
            mine = mine.to(device)
        gathered = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(gathered, mine, group=self.group)
        table = torch.stack(gathered).cpu()
        losses, norms, seconds = table[:, 0], table[:, 1], table[:, 2]
        state.loss = float(losses.mean())
        slowest = float(seconds.max())
        state.train_seconds += slowest - state.step_seconds
        state.step_seconds = slowest
        if slowest > 0 and self.trainer is not None:
            state.tokens_per_second = self.trainer.step_tokens / slowest
        metrics: dict[str, Any] = {"world_size": self.world_size}
        s_min, s_max, s_std = _spread(seconds)
        metrics.update(step_seconds_min=s_min, step_seconds_max=s_max, step_seconds_std=s_std)
        if bool(torch.isfinite(norms).all()):
            g_min, g_max, g_std = _spread(norms)
            metrics.update(grad_norm_min=g_min, grad_norm_max=g_max, grad_norm_std=g_std)
            state.extra["local_grad_norms"] = [float(n) for n in norms]
        state.extra.setdefault("metrics", {}).update(metrics)
