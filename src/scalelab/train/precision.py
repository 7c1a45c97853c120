"""Mixed precision: autocast contexts for bf16/fp16 and a loss scaler for fp16.

Parameters and optimizer state stay fp32; only the forward/backward run in the lower precision.
bf16 has fp32's exponent range, so it needs no loss scaling; fp16 does (GradScaler).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device_type: str, precision: str) -> contextlib.AbstractContextManager[Any]:
    """`torch.autocast` for bf16/fp16 on this device type; a no-op context for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision not in _DTYPES:
        raise ValueError(f"train.precision: unknown precision {precision!r}")
    return torch.autocast(device_type=device_type, dtype=_DTYPES[precision])


class NoScaler:
    """Stand-in for `torch.amp.GradScaler` when no loss scaling is needed (fp32, bf16)."""

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return loss

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        pass

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        optimizer.step()

    def update(self) -> None:
        pass

    def is_enabled(self) -> bool:
        return False

    def get_scale(self) -> float:
        return 1.0

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def current_loss_scale(scaler: Any) -> float:
    """The factor the scaler multiplied this step's loss by (1.0 without loss scaling); read it before
    `scaler.update()` changes it. Gradients seen by hooks during backward carry this factor."""
    return float(scaler.get_scale()) if scaler.is_enabled() else 1.0


def make_grad_scaler(precision: str, device_type: str) -> Any:
    """A GradScaler for fp16, else a no-op scaler with the same interface."""
    if precision == "fp16":
        return torch.amp.GradScaler(device_type)
    return NoScaler()
