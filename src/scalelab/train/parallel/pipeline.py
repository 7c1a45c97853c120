"""Pipeline parallelism with `torch.distributed.pipelining` (1F1B over micro-batches), for any model with
the pipeline capability (models/protocol.py: `embed`, blocks called as `block(x)`, `readout`).

The model is cut into `pipeline_parallel` contiguous stages along the ``pp`` mesh dimension, from
outside: a `Stage` module registers the blocks this rank owns (a `ModuleDict` keyed by their original
index) and, on the first stage, the sub-modules `embed` uses, on the last those `readout` uses — found by
calling each once on a one-token probe — under their own names, so parameter names stay those of the
whole model (`blocks.3.attn.qkv.weight`) and optimizer groups and sharded checkpoints need no mapping.
The model's class is never swapped; its other parts are dropped from this rank. Tensor parallelism and
FSDP are then applied to each stage as for a whole model.

Per optimizer step, `PipelineRunner.forward_backward(batch)` runs `Schedule1F1B` over the rank's local
batch split into `pipeline_microbatches` micro-batches (gradients averaged over them), broadcasts the last
stage's mean loss to every stage, and sums the gradient of a tied embedding/output weight between the
first and last stage (both hold a copy, kept identical by identical updates). The gradient norm for
clipping is reduced over the ``pp`` dimension with the tied copy counted once. The per-rank gradient norm
logged for the cross-rank spread is the stage's own (train/distributed.py says what its spread means).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from scalelab.errors import DistributedError
from scalelab.models.protocol import lm_loss, stage_capable
from scalelab.spec import TrainSpec
from scalelab.train.parallel.base import Strategy

log = logging.getLogger(__name__)


def stage_blocks(depth: int, stages: int, stage: int) -> range:
    """Block indices of `stage`: contiguous, sizes differing by at most one (earlier stages larger)."""
    if stages > depth:
        raise DistributedError(f"train.pipeline_parallel={stages} exceeds model.depth={depth}")
    base, extra = divmod(depth, stages)
    start = stage * base + min(stage, extra)
    return range(start, start + base + (1 if stage < extra else 0))


@torch.no_grad()
def _children_used(model: nn.Module, call: Any, probe: torch.Tensor) -> set[str]:
    """Names of `model`'s direct children (other than its blocks) that `call(probe)` runs."""
    used: set[str] = set()
    handles = [
        child.register_forward_pre_hook(lambda *_, name=name: used.add(name))
        for name, child in model.named_children()
        if name != "blocks"
    ]
    try:
        call(probe)
    finally:
        for handle in handles:
            handle.remove()
    return used


class Stage(nn.Module):
    """A contiguous slice of a model: its blocks, plus what `embed` needs on the first stage and what
    `readout` needs on the last; registered under the model's own names."""

    def __init__(self, model: nn.Module, stage: int, stages: int) -> None:
        super().__init__()
        if not stage_capable(model):
            family = getattr(getattr(model, "shape", None), "family", type(model).__name__)
            raise DistributedError(
                f"train.pipeline_parallel: model family {family!r} has no embed/readout "
                "(see scalelab.models.protocol); use pipeline_parallel = 1"
            )
        device = next(model.parameters()).device
        width = model.shape.width  # type: ignore[union-attr]
        self.is_first, self.is_last = stage == 0, stage == stages - 1
        keep: set[str] = set()
        if self.is_first:
            keep |= _children_used(model, model.embed, torch.zeros(1, 1, dtype=torch.long, device=device))
        if self.is_last:
            keep |= _children_used(model, model.readout, torch.zeros(1, 1, width, device=device))
        owned = stage_blocks(len(model.blocks), stages, stage)  # type: ignore[arg-type]
        for name, child in list(model.named_children()):
            if name in keep:
                self.add_module(name, child)
            elif name != "blocks":
                delattr(model, name)  # this rank never runs it
        self.blocks = nn.ModuleDict({str(i): model.blocks[i] for i in owned})  # type: ignore[index]
        model.blocks = nn.ModuleList()  # type: ignore[assignment]
        self.whole = [model]  # not a registered child: its remaining parts are this stage's own
        self.shape = model.shape  # type: ignore[union-attr]
        self.tp_plan = getattr(model, "tp_plan", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        model = self.whole[0]
        if self.is_first:
            x = model.embed(x)
        for block in self.blocks.values():
            x = block(x)
        return model.readout(x) if self.is_last else x

    def tied_weight(self) -> nn.Parameter | None:
        """This stage's copy of a weight shared by the embedding (first stage) and the readout (last)."""
        model = self.whole[0]
        if self.is_first and hasattr(model, "embedding"):
            return model.embedding.weight
        if self.is_last and hasattr(model, "head"):
            return model.head.weight
        return None


class PipelineRunner:
    """The pipeline schedule of one rank's stage, and the step/eval functions the trainer calls."""

    def __init__(
        self,
        stage_model: Stage,
        mesh: Any,
        device: torch.device,
        n_microbatches: int,
        tied: bool,
    ) -> None:
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B

        pp = mesh["pp"]
        self.group = pp.get_group()
        self.stages = int(pp.size())
        self.stage_index = int(pp.get_local_rank())
        self.model = stage_model
        self.n_microbatches = n_microbatches
        self.last_rank = dist.get_global_rank(self.group, self.stages - 1)
        self.stage = PipelineStage(stage_model, self.stage_index, self.stages, device, group=self.group)
        self.schedule = Schedule1F1B(self.stage, n_microbatches=n_microbatches, loss_fn=lm_loss)
        self.tied_param = self._tied_param() if tied else None
        self.tied_group = self._tied_groups(mesh) if tied else None
        self.device = device

    # ---------------------------------------------------------------------------- tied weights
    def _tied_param(self) -> nn.Parameter | None:
        return self.model.tied_weight()

    def _tied_groups(self, mesh: Any) -> Any:
        """One process group per (dp, tp) coordinate joining its first and last pipeline stage."""
        ranks = mesh.mesh  # (pp, dp, tp) tensor of global ranks
        mine = None
        me = dist.get_rank()
        for i in range(ranks.shape[1]):
            for j in range(ranks.shape[2]):
                pair = [int(ranks[0, i, j]), int(ranks[-1, i, j])]
                group = dist.new_group(pair)  # every rank creates every group (collective)
                if me in pair:
                    mine = group
        return mine

    @property
    def local_norm_scale(self) -> float:
        """Factor for a local gradient norm measured inside FSDP's reduction of this stage: the schedule
        sums the micro-batches' mean-loss gradients and divides by their number only after that reduction
        (`scale_grads` in `PipelineStage.perform_reduce_grad`)."""
        return 1.0 / self.n_microbatches

    def norm_skip(self) -> set[int]:
        """Parameters to leave out of the gradient norm: the last stage's copy of a tied weight."""
        if self.tied_param is not None and self.model.is_last:
            return {id(self.tied_param)}
        return set()

    def _sync_tied_grad(self) -> None:
        p = self.tied_param
        if p is None or self.tied_group is None or p.grad is None:
            return
        g = p.grad
        local = g._local_tensor if type(g).__name__ == "DTensor" else g  # noqa: SLF001
        dist.all_reduce(local, group=self.tied_group)

    # ------------------------------------------------------------------------------- schedule
    def _run(self, batch: torch.Tensor, *, train: bool) -> list[torch.Tensor]:
        x, y = batch[:, :-1], batch[:, 1:]
        losses: list[torch.Tensor] = []
        run = self.schedule.step if train else self.schedule.eval
        if self.model.is_first:
            run(x)
        elif self.model.is_last:
            run(target=y, losses=losses)
        else:
            run()
        return losses

    def _broadcast_mean(
        self, losses: Sequence[torch.Tensor], weights: Sequence[float] | None = None
    ) -> torch.Tensor:
        value = torch.zeros((), dtype=torch.float64, device=self.device)
        if self.model.is_last and losses:
            w = weights or [1.0] * len(losses)
            value = sum(float(wi) * li.detach().double() for wi, li in zip(w, losses, strict=True)) / sum(w)
            value = value.to(self.device)
        dist.broadcast(value, src=self.last_rank, group=self.group)
        return value.float()

    def forward_backward(self, batch: torch.Tensor) -> torch.Tensor:
        """One local batch through the pipeline (forward and backward); the mean loss on every stage."""
        if batch.shape[0] % self.n_microbatches:
            raise DistributedError(
                f"train.pipeline_microbatches={self.n_microbatches} must divide the per-rank batch "
                f"{batch.shape[0]}"
            )
        losses = self._run(batch.to(self.device), train=True)
        self._sync_tied_grad()
        return self._broadcast_mean(losses)

    @torch.no_grad()
    def evaluate(self, batches: Sequence[torch.Tensor], local_batch: int) -> float:
        """Mean held-out loss: the batches are regrouped into pipeline-sized chunks; a short last chunk
        is padded with repeated micro-batches whose losses are ignored (rows beyond a whole micro-batch
        are dropped)."""
        rows = torch.cat(list(batches)).to(self.device)
        mb = local_batch // self.n_microbatches
        usable = rows.shape[0] // mb * mb
        if usable < rows.shape[0]:
            log.warning("pipeline eval: dropping %d rows (not a whole micro-batch)", rows.shape[0] - usable)
        rows = rows[:usable]
        losses: list[torch.Tensor] = []
        for start in range(0, usable, local_batch):
            chunk = rows[start : start + local_batch]
            real = chunk.shape[0] // mb
            if chunk.shape[0] < local_batch:
                reps = (local_batch - chunk.shape[0]) // mb
                chunk = torch.cat([chunk, *[chunk[:mb]] * reps])
            self.model.eval()
            try:
                losses.extend(self._run(chunk, train=False)[:real])
            finally:
                self.model.train()
        return float(self._broadcast_mean(losses))


class PipelineStrategy(Strategy):
    name = "pipeline"
    mesh_dim = "pp"
    degree_field = "pipeline_parallel"
    outer = True

    def active(self, train: TrainSpec) -> bool:
        return train.pipeline_parallel > 1

    def apply(self, model: nn.Module, mesh: Any, train: TrainSpec) -> nn.Module:
        pp = mesh["pp"]
        return Stage(model, int(pp.get_local_rank()), int(pp.size()))

    def trainer_hooks(
        self, model: nn.Module, mesh: Any, train: TrainSpec, device: torch.device
    ) -> dict[str, Any]:
        """The schedule replaces the trainer's micro-batch loop, eval, and gradient-norm reduction."""
        from scalelab.train.parallel import unwrap
        from scalelab.train.parallel.gradnorm import local_grad_norm_source

        stage = unwrap(model)
        runner = PipelineRunner(
            stage,  # type: ignore[arg-type]
            mesh,
            device,
            train.pipeline_microbatches or 2 * train.pipeline_parallel,
            tied=bool(stage.shape.tie_embeddings),  # type: ignore[union-attr]
        )
        source = local_grad_norm_source(model)
        if source is not None:  # measured before the schedule's division by the micro-batch count
            source.scale = runner.local_norm_scale
        dp_size = int(mesh["dp"].size())
        return {
            "forward_backward": runner.forward_backward,
            "eval_fn": partial(runner.evaluate, local_batch=train.global_batch_size // dp_size),
            "grad_norm_group": mesh["pp"].get_group(),
            "grad_norm_skip": frozenset(runner.norm_skip()),
        }


STRATEGY = PipelineStrategy()
