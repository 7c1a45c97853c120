"""A small TOML writer for run specs (tables of scalars, lists and arrays of tables), so the report can
write a recommended run that `scalelab train` reads back; the standard library only reads TOML."""

from __future__ import annotations

import json
import math
from typing import Any


def _scalar(v: Any, where: str) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return f"{v:_}" if abs(v) >= 100_000 else str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            raise ValueError(f"{where}: TOML has no {v}")
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)  # a JSON string is a valid TOML basic string
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_scalar(x, where) for x in v) + "]"
    raise ValueError(f"{where}: cannot write {type(v).__name__} as TOML")


def _is_table_list(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)


def _table(name: str, data: dict[str, Any], out: list[str], comments: dict[str, str]) -> None:
    plain = {
        k: v for k, v in data.items() if v is not None and not isinstance(v, dict) and not _is_table_list(v)
    }
    if name and (plain or not data):
        out += ["", f"[{name}]"]
    for k, v in plain.items():
        note = comments.get(f"{name}.{k}" if name else k)
        out.append(f"{k} = {_scalar(v, f'{name}.{k}')}" + (f"  # {note}" if note else ""))
    for k, v in data.items():
        key = f"{name}.{k}" if name else k
        if isinstance(v, dict):
            _table(key, v, out, comments)
        elif _is_table_list(v):
            for item in v:
                out += ["", f"[[{key}]]"]
                out += [f"{ik} = {_scalar(iv, f'{key}.{ik}')}" for ik, iv in item.items() if iv is not None]


def dumps(data: dict[str, Any], header: str = "", comments: dict[str, str] | None = None) -> str:
    """TOML text for `data` (None values are left out: TOML has no null); `header` becomes leading comment
    lines, `comments` maps dotted keys ('train.lr') to a trailing comment."""
    out = [f"# {line}".rstrip() for line in header.splitlines()]
    _table("", data, out, comments or {})
    return "\n".join(out).lstrip("\n") + "\n"
