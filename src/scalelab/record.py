"""The run record: one typed schema for `record.json`, the registry's columns and the fit table.

`scalelab train` writes a `RunRecord` as record.json (docs/contracts.md); the study registry copies the
fields marked `column` into its `runs` table (the whole record stays in `record_json`); the fit reads its
N, D, C and loss from the fields `FIT_FIELDS` names. Reading an older record.json keeps working: missing
fields take their defaults, unknown ones are kept in `extra`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

#: final statuses a run can end with (the registry adds pending/running/timeout around them)
STATUSES = ("done", "failed", "diverged")


def _column(default: Any = None) -> Any:
    """A field the registry stores in a column of its own."""
    return field(default=default, metadata={"column": True})


@dataclass
class RunRecord:
    """What one training run produced; `status` is "failed" until training proves otherwise."""

    run_id: str
    config_hash: str
    status: str = "failed"
    error: str | None = None
    n_params: int | None = _column()  # non-embedding parameters (models/flops.py)
    n_params_total: int | None = _column()  # every distinct parameter (a tied readout once)
    tokens: int = _column(0)  # training tokens seen
    flops: float = _column(0.0)  # training FLOPs, 6·N·D + attention (models/flops.py)
    steps: int = _column(0)
    final_train_loss: float | None = _column()
    eval_loss: float | None = _column()  # held-out loss at the end
    wall_seconds: float = _column(0.0)  # across resumes
    tokens_per_second: float | None = _column()
    peak_memory_bytes: int | None = _column()
    energy_joules: float | None = _column()  # every rank's meter summed (energy.EnergyMeter.scope)
    energy_source: str = "unavailable"  # measured (NVML, RAPL) / estimated (power × time) / unavailable
    energy_note: str | None = None  # how it was measured or estimated
    branch: dict[str, Any] | None = None  # the WSD trunk snapshot this run started from
    world_size: int = 1
    strategy: str = "none"
    micro_batch_size: int | None = None
    batch_changes: list[dict[str, Any]] | None = None
    started_at: str | None = _column()
    finished_at: str | None = _column()
    extra: dict[str, Any] = field(default_factory=dict)  # keys of newer/older writers, kept as they are

    def to_json(self) -> dict[str, Any]:
        """record.json's object: every field, `extra`'s keys at the top level."""
        data = asdict(self)
        return {**data.pop("extra"), **data}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunRecord:
        """A record from record.json's object (missing fields defaulted, unknown ones in `extra`)."""
        known = {f.name for f in fields(cls)} - {"extra"}
        missing = {"run_id", "config_hash"} - set(data)
        if missing:
            raise ValueError(f"record has no {', '.join(sorted(missing))}")
        return cls(
            **{k: v for k, v in data.items() if k in known},
            extra={k: v for k, v in data.items() if k not in known},
        )


#: record fields the registry keeps as columns of `runs`
REGISTRY_COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(RunRecord) if f.metadata.get("column"))

#: the fit table's variables → the record field they come from (N by the fit's `n_params` setting)
FIT_FIELDS: dict[str, dict[str, str]] = {
    "N": {"non_embedding": "n_params", "total": "n_params_total"},
    "D": {"any": "tokens"},
    "C": {"any": "flops"},
    "loss": {"eval": "eval_loss", "train": "final_train_loss"},
}
