"""Pre-registration: a study's hypotheses and analysis plan, frozen and hashed when the study starts.

The first `study run` writes `preregistration.json` (hypotheses, law form, hold-out, loss column,
target, and their SHA-256). Later runs of the same study directory must state the same plan, so the
analysis the report shows is the one decided before the results were seen.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from scalelab.errors import SpecError
from scalelab.io import atomic_write_json
from scalelab.provenance import utc_now
from scalelab.spec import StudySpec, canonical_json

FILE = "preregistration.json"


def analysis_plan(study: StudySpec) -> dict[str, Any]:
    """What is frozen: the hypotheses, how the runs will be fitted, and the decision's target."""
    return {
        "hypotheses": list(study.hypotheses),
        "fit": study.fit.model_dump(mode="json"),
        "target": study.target.model_dump(mode="json"),
    }


def plan_hash(plan: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_json(plan).encode()).hexdigest()


def freeze(study: StudySpec, study_dir: Path) -> dict[str, Any]:
    """Write the pre-registration on first use; refuse a changed plan afterwards (naming what changed)."""
    plan = analysis_plan(study)
    digest = plan_hash(plan)
    path = study_dir / FILE
    if path.exists():
        try:
            frozen = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise SpecError(f"{path}: unreadable pre-registration ({err})") from None
        if frozen.get("sha256") != digest:
            changed = [k for k in plan if plan[k] != frozen.get("plan", {}).get(k)]
            raise SpecError(
                f"{path}: the study's pre-registered analysis plan changed ({', '.join(changed) or 'hash'} "
                f"differs from what was frozen at {frozen.get('frozen_at')}); keep study.hypotheses, "
                "study.fit and study.target as they were, or start a new study directory"
            )
        return frozen
    record = {"frozen_at": utc_now(), "sha256": digest, "plan": plan}
    atomic_write_json(path, record)
    return record
