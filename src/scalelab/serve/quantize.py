"""Weight quantization for serving: int8 through torchao, and weight-only int4 with group-wise scales.

int8: torchao's `Int8WeightOnlyConfig` on every Linear (per-output-channel symmetric int8 weights), on
CPU and GPU alike — the maintained successor of the deprecated `torch.ao.quantization.quantize_dynamic`.
torchao's dynamic-activation variant (`Int8DynamicActivationInt8WeightConfig`) was measured too: on
this machine's CPU, for the served models' small matrices (a 128→512 Linear at batch 32, one thread)
it took 610 µs a call against 116 µs in fp32 and 176 µs weight-only, so weight-only it is. Without
torchao (it is in the `serve` extra) the same scheme runs as `Int8WeightOnlyLinear` here.
int4: `Int4WeightOnlyLinear` — asymmetric 4-bit weights in groups of `INT4_GROUP` input channels, each
group with its own fp16 scale and 4-bit zero point, two weights packed per byte; the token and position
embeddings get the same group-wise int4 storage (`Int4Embedding`), since in small models they are a
large share of the bytes. Weights are dequantized at each call on the model's device (CPU or CUDA) —
the gain is memory (≈ 0.16 of fp32 for the quantized tensors), not speed: there is no fused int4 kernel.
LayerNorms stay in floating point. The tied output layer becomes its own quantized copy.
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

QuantMode = Literal["int8", "int4"]
MODES: tuple[str, ...] = ("int8", "int4")
#: input channels sharing one int4 scale and zero point
INT4_GROUP = 32


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


def pack_int4(w: torch.Tensor, group: int = INT4_GROUP) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows, cols) float weights → (packed uint8 (rows, cols/2), fp16 scales, uint8 zero points), both
    (rows, cols/group). `cols` must be a multiple of `group` (and `group` even)."""
    rows, cols = w.shape
    if cols % group or group % 2:
        raise ValueError(f"int4: {cols} columns are not a multiple of the group size {group}")
    g = w.detach().float().reshape(rows, cols // group, group)
    lo, hi = g.amin(dim=2), g.amax(dim=2)
    scale = ((hi - lo) / 15.0).clamp(min=1e-8).half()
    s = scale.float()
    zero = torch.round(-lo / s).clamp(0, 15)
    q = (torch.round(g / s[..., None]) + zero[..., None]).clamp(0, 15).to(torch.uint8).reshape(rows, cols)
    packed = q[:, 0::2] | (q[:, 1::2] << 4)
    return packed, scale, zero.to(torch.uint8)


def unpack_int4(
    packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The dequantized (rows, cols) weights of `pack_int4`'s output."""
    rows, half = packed.shape
    q = torch.stack((packed & 0xF, packed >> 4), dim=2).reshape(rows, 2 * half)
    groups = scale.shape[1]
    q = q.reshape(rows, groups, -1).to(dtype)
    return ((q - zero[..., None].to(dtype)) * scale[..., None].to(dtype)).reshape(rows, 2 * half)


class _Int4Weight(nn.Module):
    """A weight matrix stored as group-wise int4 (buffers `packed`, `scale`, `zero`)."""

    def __init__(self, weight: torch.Tensor, group: int) -> None:
        super().__init__()
        packed, scale, zero = pack_int4(weight, group)
        self.register_buffer("packed", packed)
        self.register_buffer("scale", scale)
        self.register_buffer("zero", zero)
        self.group = group

    def weight(self, dtype: torch.dtype) -> torch.Tensor:
        return unpack_int4(self.packed, self.scale, self.zero, dtype)


class Int4WeightOnlyLinear(_Int4Weight):
    """y = x · deq(W)ᵀ with W group-wise int4 (see the module docstring); no bias."""

    def __init__(self, linear: nn.Linear, group: int = INT4_GROUP) -> None:
        if linear.bias is not None:
            raise ValueError("Int4WeightOnlyLinear: linear layers with a bias are not supported")
        super().__init__(linear.weight, group)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 group={self.group}"


class Int4Embedding(_Int4Weight):
    """An embedding table stored as group-wise int4 along the embedding dimension."""

    def __init__(self, emb: nn.Embedding, dtype: torch.dtype, group: int = INT4_GROUP) -> None:
        super().__init__(emb.weight, group)
        self.num_embeddings, self.embedding_dim = emb.num_embeddings, emb.embedding_dim
        self.dtype = dtype

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        rows = idx.reshape(-1)
        w = unpack_int4(self.packed[rows], self.scale[rows], self.zero[rows], self.dtype)
        return w.reshape(*idx.shape, self.embedding_dim)


def _replace(model: nn.Module, make: Any, done: dict[int, nn.Module] | None = None) -> nn.Module:
    """Replace every child `make` maps (not None), once per module object: a module registered under two
    names (an `hf:` wrapper's `head` is also its `hf.lm_head`) gets one replacement in both places."""
    done = {} if done is None else done
    for name, child in list(model.named_children()):
        new = done.get(id(child)) or make(child)
        if new is not None:
            done[id(child)] = new
            setattr(model, name, new)
        else:
            _replace(child, make, done)
    return model


def _groups_fit(n: int) -> bool:
    return n % INT4_GROUP == 0


def _int4(module: nn.Module) -> nn.Module | None:
    if isinstance(module, nn.Linear) and _groups_fit(module.in_features):
        return Int4WeightOnlyLinear(module)
    if isinstance(module, nn.Embedding) and _groups_fit(module.embedding_dim):
        return Int4Embedding(module, module.weight.dtype)
    return None


def _torchao_int8(model: nn.Module) -> bool:
    """Quantize `model`'s Linears in place with torchao's int8 weight-only config; False without torchao."""
    try:
        for name in ("torchao", "torch.utils._pytree"):  # import-time notices about optional kernels
            logging.getLogger(name).setLevel(logging.ERROR)
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError as err:
        log.info("torchao unavailable (%s); int8 through Int8WeightOnlyLinear", err)
        return False
    seen: set[int] = set()  # a Linear registered under two names is quantized once

    def linear_once(m: nn.Module, _fqn: str) -> bool:
        fresh = id(m) not in seen
        seen.add(id(m))
        return isinstance(m, nn.Linear) and fresh

    quantize_(model, Int8WeightOnlyConfig(), filter_fn=linear_once)
    return True


def quantize_model(
    model: nn.Module, mode: QuantMode = "int8", device: torch.device | str = "cpu"
) -> nn.Module:
    """A quantized copy of `model` on `device` (the original is untouched); see the module docstring."""
    if mode not in MODES:
        raise ValueError(f"quantize: unknown mode {mode!r} (supported: {', '.join(MODES)})")
    model = copy.deepcopy(model).to(torch.device(device)).eval()
    head = getattr(model, "head", None)
    if head is not None and isinstance(head, nn.Linear):  # untie: the output layer is quantized on its own
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    if mode == "int4":
        return _replace(model, _int4)
    if _torchao_int8(model):
        return model
    return _replace(model, lambda m: Int8WeightOnlyLinear(m) if isinstance(m, nn.Linear) else None)


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
    `within_tolerance`: |Δloss| ≤ LOSS_TOLERANCE_NATS + LOSS_TOLERANCE_RELATIVE · fp32 loss (the int8
    promise; int4 reports the same comparison, and is expected to move the loss more).
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
    tolerance = LOSS_TOLERANCE_NATS + LOSS_TOLERANCE_RELATIVE * loss_fp32
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
        "tolerance_nats": tolerance,
        "within_tolerance": abs(delta) <= tolerance,
    }
