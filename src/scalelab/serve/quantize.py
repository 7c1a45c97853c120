"""int8 quantization of the model's Linear layers for serving.

CPU: dynamic quantization (int8 weights per tensor, activations quantized on the fly per batch, int8
GEMM through fbgemm/onednn) via `torch.ao.quantization.quantize_dynamic`. It is marked deprecated in
favour of `torchao`, which is not a scalelab dependency; it still ships with the pinned torch, and
when it is gone we fall back to the weight-only path below.
GPU: weight-only int8 (`Int8WeightOnlyLinear`: per-output-channel symmetric int8 weights, converted to
the activations' dtype at each call). Its gain on a GPU is memory, not speed: the quantized layers take
a quarter of their fp32 bytes, but without a fused int8 × bf16 kernel the conversion adds work. On one
H100 (GPT-2-small shape, `benchmarks/bench_serve_gpu.py`) int8 decoded at 0.72× (batch 1) and 0.78×
(batch 16) of bf16 (195 and 2,376 tokens/s), and with the product under `torch.compile` slower still;
the held-out loss moved by 1e-4 nats.
Embeddings and LayerNorms stay in floating point (the token embedding is also the tied output weight,
but the output Linear is quantized as its own copy).
"""

from __future__ import annotations

import copy
import io
import logging
import warnings
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

QuantMode = Literal["int8"]


class Int8WeightOnlyLinear(nn.Module):
    """y = (x · q(W)ᵀ) · s with q(W) int8 per output channel and s its fp scale; no bias (the GPT has none)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        if linear.bias is not None:
            raise ValueError("Int8WeightOnlyLinear: linear layers with a bias are not supported")
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight_int8", q)
        self.register_buffer("scale", scale.to(linear.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_int8.to(x.dtype)) * self.scale.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weight-only"


def _weight_only(model: nn.Module) -> nn.Module:
    for name, child in list(model.named_children()):
        if isinstance(child, nn.Linear):
            setattr(model, name, Int8WeightOnlyLinear(child))
        else:
            _weight_only(child)
    return model


def quantize_model(
    model: nn.Module, mode: QuantMode = "int8", device: torch.device | str = "cpu"
) -> nn.Module:
    """A quantized copy of `model` (the original is untouched); see the module docstring for the scheme."""
    if mode != "int8":
        raise ValueError(f"quantize: unknown mode {mode!r} (supported: 'int8')")
    device = torch.device(device)
    model = copy.deepcopy(model).to(device).eval()
    if device.type == "cpu":
        try:
            from torch.ao.quantization import quantize_dynamic

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
        except (ImportError, RuntimeError, AttributeError) as err:
            log.warning("dynamic int8 quantization unavailable (%s); using weight-only int8", err)
    return _weight_only(model)


def model_size_bytes(model: nn.Module) -> int:
    """Bytes of the serialized state dict (shared tensors once) — what the weights cost on disk and in memory."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.save(model.state_dict(), buf)
    return buf.tell()


#: the held-out loss change `scalelab serve --quantize int8 --report` and the tests accept
LOSS_TOLERANCE_NATS = 0.02
LOSS_TOLERANCE_RELATIVE = 0.01


def quantization_report(
    run_dir: str | Path, mode: QuantMode = "int8", *, heldout_tokens: int | None = None, device: str = "cpu"
) -> dict[str, Any]:
    """Size and held-out loss of the run's model in fp32 and quantized, on the run's own held-out tokens.

    `heldout_tokens` defaults to the run's `train.eval_tokens` (the set its `eval_loss` was measured on).
    `within_tolerance`: |Δloss| ≤ LOSS_TOLERANCE_NATS + LOSS_TOLERANCE_RELATIVE · fp32 loss.
    """
    from scalelab.serve.evaluation import heldout_batches, heldout_loss
    from scalelab.serve.loading import load_run

    run = load_run(run_dir)
    spec = run.spec
    tokens = heldout_tokens or spec.train.eval_tokens
    seed = spec.train.data_seed if spec.train.data_seed is not None else spec.train.seed
    batches = heldout_batches(run.store(), run.context_tokens, tokens, seed=seed)
    fp32 = run.model.to(device)
    quant = quantize_model(fp32, mode, device)
    loss_fp32 = heldout_loss(fp32, batches, device)
    loss_q = heldout_loss(quant, batches, device)
    size_fp32, size_q = model_size_bytes(fp32), model_size_bytes(quant)
    delta = loss_q - loss_fp32
    return {
        "run_id": spec.run_id,
        "mode": mode,
        "device": str(device),
        "heldout_tokens": sum(b[:, 1:].numel() for b in batches),
        "fp32_size_bytes": size_fp32,
        "quantized_size_bytes": size_q,
        "size_ratio": size_q / size_fp32,
        "fp32_heldout_loss": loss_fp32,
        "quantized_heldout_loss": loss_q,
        "loss_delta": delta,
        "tolerance_nats": LOSS_TOLERANCE_NATS + LOSS_TOLERANCE_RELATIVE * loss_fp32,
        "within_tolerance": abs(delta) <= LOSS_TOLERANCE_NATS + LOSS_TOLERANCE_RELATIVE * loss_fp32,
    }
