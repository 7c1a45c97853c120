"""Add a finished run from outside the study's design — typically the large run trained with the
recommended settings — so the report can set its actual loss against the predicted interval."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from scalelab.errors import RegistryError, SpecError
from scalelab.registry import ROLES, Registry
from scalelab.spec import RunSpec, StudySpec, config_hash, load_run


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise RegistryError(
            f"{path}: missing — is {path.parent} a finished run directory ({what})?"
        ) from None
    except (OSError, ValueError) as err:
        raise RegistryError(f"{path}: unreadable {what} ({err})") from None


def check_record(run_dir: Path, spec: RunSpec, record: dict[str, Any]) -> None:
    """The record must be the one written for this config (a copied or edited record.json is refused)."""
    for key, want in (("run_id", spec.run_id), ("config_hash", config_hash(spec))):
        if record.get(key) != want:
            raise RegistryError(
                f"{run_dir / 'record.json'}: {key} {record.get(key)!r} does not match config.json ({want!r}); "
                "the record belongs to another run"
            )


def check_comparable(study_dir: Path, spec: RunSpec, run_dir: Path) -> None:
    """A run added to a study must be measured like the study's runs: same context length, tokenizer and
    data, or its loss is not comparable with the fit's prediction (SpecError naming the field)."""
    path = study_dir / "study.json"
    try:
        base = StudySpec.model_validate_json(path.read_text()).base_run()
    except FileNotFoundError:
        return  # a registry without a recorded study (built by hand): nothing to compare with
    except (OSError, ValueError) as err:
        raise RegistryError(f"{path}: unreadable study spec ({err})") from None
    fields = {
        "model.context_tokens": (base.model.context_tokens, spec.model.context_tokens),
        "data.tokenizer": (base.data.tokenizer, spec.data.tokenizer),
        "data": (base.data.model_dump(mode="json"), spec.data.model_dump(mode="json")),
    }
    for name, (study_value, run_value) in fields.items():
        if study_value != run_value:
            shown = "" if name == "data" else f" ({run_value!r}, the study's runs use {study_value!r})"
            raise SpecError(
                f"{run_dir / 'config.json'}: {name} differs from the study's{shown}; its loss would not be "
                "comparable with the fit's prediction, so it is not added"
            )


def add_run(study_dir: str | Path, run_dir: str | Path, role: str = "target") -> dict[str, Any]:
    """Register `run_dir` (config.json + record.json, as `scalelab train` writes them) in the study.

    A `target` run is never fitted; the report compares its loss with the fit's prediction interval.
    """
    study_dir, run_dir = Path(study_dir), Path(run_dir).resolve()
    if role not in ROLES:
        raise RegistryError(f"--role: expected one of {ROLES}, got {role!r}")
    spec = load_run(run_dir / "config.json")
    record = _read_json(run_dir / "record.json", "its record.json")
    check_record(run_dir, spec, record)
    check_comparable(study_dir, spec, run_dir)
    if record.get("status") != "done":
        raise RegistryError(
            f"{run_dir}: the run's status is {record.get('status')!r}, not 'done'; finish it first"
        )
    provenance = None
    if (run_dir / "provenance.json").exists():
        provenance = _read_json(run_dir / "provenance.json", "its provenance.json")
    with Registry(study_dir / "registry.sqlite", create=False) as reg:
        existing = reg.get(spec.run_id)
        if existing is not None and existing["role"] != role:
            raise RegistryError(
                f"{run_dir}: run {spec.run_id} is already in the study as a {existing['role']} run"
            )
        reg.add_planned(
            spec.run_id,
            spec.canonical_json(),
            config_hash(spec),
            point={"added_from": str(run_dir)},
            seed=spec.train.seed,
            run_dir=str(run_dir),
            role=role,
        )
        reg.record_result(spec.run_id, record, provenance)
        return reg.get(spec.run_id) or {}
