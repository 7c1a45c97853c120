"""Each rank's local gradient norm, measured where its gradient enters data-parallel averaging.

DDP: a communication hook that records each bucket's squared norm, then averages it as DDP's default hook
does. FSDP2: a reduce-scatter (or, with one data-parallel rank, an all-reduce hook) that records its input.
`CrossRankMetrics` (train/distributed.py) gathers these per-rank norms into the logged spread.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class GradNormRecorder:
    """The squared norm of this rank's gradient before averaging (DDP comm-hook state, FSDP recorder).

    `scale` multiplies the reported norm: the pipeline schedule divides gradients by its number of
    micro-batches only *after* FSDP's reduction (`PipelineStage.perform_reduce_grad` → `scale_grads`),
    so what the recorder sees there is that many times the step's gradient
    (`scalelab.train.parallel.pipeline.PipelineRunner.local_norm_scale`).
    """

    group: Any
    world_size: int
    sq_sum: torch.Tensor | None = None  # stays on the device: no host sync inside backward
    buckets: int = 0
    scale: float = 1.0

    @classmethod
    def install(cls, ddp: nn.Module, group: Any) -> GradNormRecorder:
        state = cls(group, dist.get_world_size(group))
        ddp.register_comm_hook(state, _allreduce_measuring_norm)  # type: ignore[operator]
        ddp._scalelab_grad_norm = state  # type: ignore[attr-defined]
        return state

    def add(self, local_grads: torch.Tensor) -> None:
        """Count a flat buffer of this rank's (not yet reduced) gradients."""
        sq = local_grads.detach().float().pow(2).sum()
        self.sq_sum = sq if self.sq_sum is None else self.sq_sum + sq
        self.buckets += 1

    def take(self) -> float | None:
        """This rank's local gradient norm of the last synchronized backward (None if none ran)."""
        if self.buckets == 0 or self.sq_sum is None:
            return None
        value = math.sqrt(float(self.sq_sum)) * self.scale
        self.sq_sum, self.buckets = None, 0
        return value


def _allreduce_measuring_norm(state, bucket):  # noqa: ANN001, ANN201 — DDP rejects non-GradBucket annotations
    """Record the bucket's local squared norm, then average it over ranks (as DDP's default hook does).

    Returns a future of the averaged bucket (a torch.futures.Future[Tensor]).
    """
    buf = bucket.buffer()
    state.add(buf)
    buf.div_(state.world_size)
    work = dist.all_reduce(buf, group=state.group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def install_fsdp_norm_recorder(model: nn.Module, group: Any) -> GradNormRecorder:
    """FSDP2 (also under tensor/pipeline parallelism, on each stage): measure each rank's local gradient
    where FSDP reduces it over the data-parallel `group` — the unsharded, accumulated local gradients
    (tensor-parallel parameters: this rank's local shards), zero-padded, in the reduce dtype (fp32 here,
    so FSDP does not pre-divide them).

    With more than one data-parallel rank that is the reduce-scatter input (a custom reduce-scatter that
    records, then reduces). With one, FSDP skips the collective and copies the input to the output
    unchanged (no divide factor), so the all-reduce hook — which FSDP calls after every reduction — sees
    the same gradients.
    """
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultReduceScatter

    recorder = GradNormRecorder(group, dist.get_world_size(group))

    class _Measuring(DefaultReduceScatter):
        def __call__(self, output_tensor, input_tensor, group, op, async_op=False):  # noqa: ANN001, ANN204
            recorder.add(input_tensor)
            return super().__call__(output_tensor, input_tensor, group, op, async_op)

    comm = _Measuring()
    for module in model.modules():
        if isinstance(module, FSDPModule):
            if recorder.world_size > 1:
                module.set_custom_reduce_scatter(comm)
            else:
                module.set_all_reduce_hook(recorder.add)
    model._scalelab_grad_norm = recorder  # type: ignore[attr-defined]
    return recorder


def local_grad_norm_source(model: nn.Module) -> GradNormRecorder | None:
    """The local-gradient-norm recorder `parallelize` installed (DDP; FSDP, with or without tensor and
    pipeline parallelism); None for an unwrapped model."""
    return getattr(model, "_scalelab_grad_norm", None)
