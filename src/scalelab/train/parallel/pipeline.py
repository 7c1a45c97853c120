"""Pipeline parallelism for the GPT with `torch.distributed.pipelining` (1F1B over micro-batches).

The model is cut into `pipeline_parallel` contiguous stages along the ``pp`` mesh dimension: the first
stage holds the embeddings and its blocks, the last its blocks, the final LayerNorm and the output layer.
Cutting happens in place and from outside the model file: blocks move into a `ModuleDict` keyed by their
original index and the GPT's class is swapped for `PipelineStageGPT`, so parameter names stay those of
the whole model (`blocks.3.attn.qkv.weight`) — optimizer groups and sharded checkpoints need no mapping.
Tensor parallelism and FSDP are then applied to each stage as for a whole model.

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
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from scalelab.errors import DistributedError
from scalelab.models.gpt import GPT

log = logging.getLogger(__name__)


class PipelineStageGPT(GPT):
    """A contiguous slice of a GPT: embeddings on the first stage, head on the last; blocks in between."""

    is_first: bool
    is_last: bool

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        if self.is_first:
            t = x.shape[1]
            x = self.tok_emb(x) + self.pos_emb(self._positions[:t])
        for block in self.blocks.values():  # type: ignore[operator]
            x = block(x)
        if not self.is_last:
            return x
        logits = self.head(self.ln_f(x))
        if self.output_multiplier != 1.0:
            logits = logits * self.output_multiplier
        return logits


def stage_blocks(depth: int, stages: int, stage: int) -> range:
    """Block indices of `stage`: contiguous, sizes differing by at most one (earlier stages larger)."""
    if stages > depth:
        raise DistributedError(f"train.pipeline_parallel={stages} exceeds model.depth={depth}")
    base, extra = divmod(depth, stages)
    start = stage * base + min(stage, extra)
    return range(start, start + base + (1 if stage < extra else 0))


def split_stage(model: GPT, stage: int, stages: int) -> PipelineStageGPT:
    """Cut `model` in place down to pipeline stage `stage` of `stages`; returns it (class swapped)."""
    if not isinstance(model, GPT):
        raise DistributedError(
            f"train.pipeline_parallel: supported for the GPT only, got {type(model).__name__}"
        )
    keep = stage_blocks(len(model.blocks), stages, stage)
    blocks = nn.ModuleDict({str(i): model.blocks[i] for i in keep})
    model.blocks = blocks  # type: ignore[assignment]
    is_first, is_last = stage == 0, stage == stages - 1
    if not is_first:
        del model.tok_emb
        del model.pos_emb
    if not is_last:
        del model.ln_f
        del model.head
    model.__class__ = PipelineStageGPT
    model.is_first, model.is_last = is_first, is_last  # type: ignore[attr-defined]
    return model  # type: ignore[return-value]


def _loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))


class PipelineRunner:
    """The pipeline schedule of one rank's stage, and the step/eval functions the trainer calls."""

    def __init__(
        self,
        stage_model: PipelineStageGPT,
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
        self.schedule = Schedule1F1B(self.stage, n_microbatches=n_microbatches, loss_fn=_loss)
        self.tied_param = self._tied_param() if tied else None
        self.tied_group = self._tied_groups(mesh) if tied else None
        self.device = device

    # ---------------------------------------------------------------------------- tied weights
    def _tied_param(self) -> nn.Parameter | None:
        m = self.model
        if m.is_first:
            return m.tok_emb.weight
        if m.is_last:
            return m.head.weight
        return None

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
