"""One run-record schema (scalelab.record) behind record.json, the registry's columns and the fit table."""

from __future__ import annotations

import sqlite3
from dataclasses import fields
from pathlib import Path

import pytest

from scalelab.record import FIT_FIELDS, REGISTRY_COLUMNS, RunRecord
from scalelab.registry import Registry


def test_registry_columns_are_the_record_fields_marked_column(tmp_path: Path) -> None:
    Registry(tmp_path / "registry.sqlite").close()
    with sqlite3.connect(tmp_path / "registry.sqlite") as conn:
        columns = {row[1] for row in conn.execute("PRAGMA table_info(runs)")}
    names = {f.name for f in fields(RunRecord)}
    assert set(REGISTRY_COLUMNS) <= columns and set(REGISTRY_COLUMNS) <= names
    assert {"n_params", "tokens", "flops", "eval_loss"} <= set(REGISTRY_COLUMNS)


def test_fit_fields_name_record_fields() -> None:
    names = {f.name for f in fields(RunRecord)}
    assert {v for m in FIT_FIELDS.values() for v in m.values()} <= names


def test_round_trip_and_records_of_older_and_newer_writers() -> None:
    rec = RunRecord("abc", "h" * 16, status="done", tokens=10, strategy="ddp", world_size=2)
    assert RunRecord.from_json(rec.to_json()) == rec
    old = {"run_id": "abc", "config_hash": "h", "status": "done", "tokens": 5}  # before world_size existed
    back = RunRecord.from_json(old)
    assert back.world_size == 1 and back.strategy == "none" and back.tokens == 5
    newer = {**old, "energy_source": "measured"}
    assert RunRecord.from_json(newer).to_json()["energy_source"] == "measured"
    with pytest.raises(ValueError, match="config_hash"):
        RunRecord.from_json({"run_id": "x"})


def test_a_trained_run_writes_exactly_the_schema(tmp_path: Path, tiny_corpus: Path) -> None:
    import json

    from scalelab.spec import RunSpec
    from scalelab.train.run import run_training

    spec = RunSpec.model_validate(
        {
            "model": {"width": 16, "depth": 1, "n_heads": 2, "context_tokens": 16},
            "data": {"sources": [{"kind": "text", "path": str(tiny_corpus)}], "heldout_fraction": 0.2},
            "train": {"tokens": 16 * 4 * 2, "global_batch_size": 4, "eval_tokens": 32},
            "execution": {"threads": 1},
        }
    )
    returned = run_training(spec, tmp_path / "run")
    written = json.loads((tmp_path / "run" / "record.json").read_text())
    assert returned == written and written["status"] == "done"
    assert set(written) == {f.name for f in fields(RunRecord)} - {"extra"}
