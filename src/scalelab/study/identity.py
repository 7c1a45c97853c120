"""Study identity: the base run and the design, frozen by the first `study run` of a directory.

A later run of the same directory with another base run (`--set train.lr=…`) or design would train new
runs beside the old ones and `fit` would then mix both; it is refused with the fields that changed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from scalelab.errors import SpecError
from scalelab.io import atomic_write_json
from scalelab.provenance import utc_now
from scalelab.spec import StudySpec

FILE = "identity.json"
_SHOWN = 5


def study_identity(study: StudySpec) -> dict[str, Any]:
    """What makes a study's runs: its base run and its design (plain JSON values)."""
    return {
        "base_run": study.base_run().model_dump(mode="json"),
        "design": study.design.model_dump(mode="json"),
    }


def changed_fields(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted paths where `new` differs from `old`, each as "path: old → new"."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in sorted(set(old) | set(new), key=str):
            path = f"{prefix}.{key}" if prefix else str(key)
            out += changed_fields(old.get(key), new.get(key), path)
        return out
    return [] if old == new else [f"{prefix}: {json.dumps(old)} → {json.dumps(new)}"]


def freeze_identity(study: StudySpec, study_dir: Path) -> None:
    """Record the identity on first use; afterwards refuse a different one (SpecError naming the fields)."""
    path = Path(study_dir) / FILE
    current = study_identity(study)
    if not path.exists():
        atomic_write_json(path, {"frozen_at": utc_now(), **current})
        return
    try:
        frozen = json.loads(path.read_text())
        frozen = {k: frozen[k] for k in current}
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as err:
        raise SpecError(f"{path}: unreadable study identity ({err}); restore it or use a new --out") from None
    diff = changed_fields(frozen["base_run"], current["base_run"], "study")
    diff += changed_fields(frozen["design"], current["design"], "study.design")
    if diff:
        more = f" and {len(diff) - _SHOWN} more" if len(diff) > _SHOWN else ""
        raise SpecError(
            f"{path}: this study directory was run with another base run or design ({'; '.join(diff[:_SHOWN])}"
            f"{more}); its runs would be mixed with the new ones. Run it with the original spec and --set "
            "values, or give the changed study a new --out directory"
        )
