"""Nested state (dicts, lists, tuples, tensors, plain values) as a JSON skeleton plus a flat tensor dict.

Checkpoints store the tensors in safetensors files and the skeleton in JSON, so no checkpoint file is ever
unpickled (not even with `torch.load(weights_only=True)`). The skeleton is tagged so that it round-trips
exactly: dict keys keep their type (an optimizer's integer parameter ids stay integers), tuples stay
tuples, floats keep every bit (JSON numbers written by `repr`, NaN/inf included).
"""

from __future__ import annotations

from typing import Any

import torch

_PLAIN = (str, int, float, bool, type(None))


def split_tensors(obj: Any, prefix: str = "") -> tuple[Any, dict[str, torch.Tensor]]:
    """(skeleton, {key: tensor}) of `obj`; tensor keys are '/'-joined paths under `prefix`.

    The tensors are the objects found in `obj` (no copies), so loading into them in place (as
    `torch.distributed.checkpoint.load` does) updates `obj`. Raises TypeError on any other kind of value.
    """
    tensors: dict[str, torch.Tensor] = {}

    def walk(value: Any, path: str) -> Any:
        if isinstance(value, torch.Tensor):
            tensors[path] = value
            return {"t": path}
        if isinstance(value, dict):
            items = []
            for k, v in value.items():
                if not isinstance(k, str | int) or isinstance(k, bool):
                    raise TypeError(f"{path or '<root>'}: cannot store a dict key of type {type(k).__name__}")
                items.append([k, walk(v, f"{path}/{k}" if path else str(k))])
            return {"d": items}
        if isinstance(value, list | tuple):
            tag = "l" if isinstance(value, list) else "u"
            return {tag: [walk(v, f"{path}/{i}" if path else str(i)) for i, v in enumerate(value)]}
        if isinstance(value, _PLAIN):
            return {"v": value}
        raise TypeError(f"{path or '<root>'}: cannot store a {type(value).__name__} in a checkpoint")

    return walk(obj, prefix), tensors


def join_tensors(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of `split_tensors`; KeyError names a tensor the skeleton needs but `tensors` lacks."""
    if not isinstance(skeleton, dict) or len(skeleton) != 1:
        raise ValueError(f"not a state skeleton node: {str(skeleton)[:80]}")
    ((tag, body),) = skeleton.items()
    if tag == "t":
        return tensors[body]
    if tag == "d":
        return {k: join_tensors(v, tensors) for k, v in body}
    if tag == "l":
        return [join_tensors(v, tensors) for v in body]
    if tag == "u":
        return tuple(join_tensors(v, tensors) for v in body)
    if tag == "v":
        return body
    raise ValueError(f"unknown state skeleton tag {tag!r}")


def contiguous_cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copies safetensors can write: detached, contiguous, on the CPU, sharing no storage."""
    return {k: t.detach().to("cpu", copy=True).contiguous() for k, t in tensors.items()}


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t  # a DTensor's shard on this rank


def unique_tensors(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """`tensors` without aliases (tied weights once: same storage, offset and shape) + {alias: kept key}."""
    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[int, int, tuple[int, ...]], str] = {}
    for name, t in tensors.items():
        local = _local(t)
        key = (local.untyped_storage().data_ptr(), local.storage_offset(), tuple(t.shape))
        if local.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        unique[name] = t
    return unique, aliases
