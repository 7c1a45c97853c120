"""The SQLite registry: concurrent writers lose nothing, statuses and schema are enforced."""

from __future__ import annotations

import multiprocessing as mp
import sqlite3
from pathlib import Path

import pytest

from scalelab.errors import RegistryError
from scalelab.registry import SCHEMA_VERSION, Registry


def _writer(path: str, worker: int, n: int) -> None:
    reg = Registry(path)
    for i in range(n):
        rid = f"w{worker}-{i:04d}"
        reg.add_planned(rid, "{}", "h" * 64, point={"i": i}, seed=worker)
        reg.record_result(rid, {"status": "done", "eval_loss": float(i), "tokens": i, "n_params": worker})
    reg.close()


def test_eight_processes_thousand_records_each_lose_none(tmp_path: Path) -> None:
    path = str(tmp_path / "registry.sqlite")
    Registry(path).close()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(path, w, 1000)) for w in range(8)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0] * 8  # no "database is locked" anywhere
    with Registry(path) as reg:
        rows = reg.runs(status="done")
        assert len(rows) == 8000
        assert len({r["run_id"] for r in rows}) == 8000
        assert reg.counts() == {"done": 8000}
        assert len(reg.events()) == 16000


def test_planned_rows_keep_their_status_and_events_are_kept(tmp_path: Path) -> None:
    with Registry(tmp_path / "r.sqlite") as reg:
        assert reg.add_planned("a", "{}", "h")
        reg.set_status("a", "running", "attempt 1")
        reg.record_result("a", {"status": "failed", "error": "boom"})
        assert not reg.add_planned("a", "{}", "h")  # re-planning keeps the failed row
        row = reg.get("a")
        assert row["status"] == "failed" and row["error"] == "boom" and row["attempts"] == 1
        assert [e["status"] for e in reg.events("a")] == ["pending", "running", "failed"]
        with pytest.raises(RegistryError, match="unknown run status"):
            reg.set_status("a", "exploded")
        with pytest.raises(RegistryError, match="not registered"):
            reg.set_status("zzz", "done")


def test_schema_mismatch_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "r.sqlite"
    Registry(path).close()
    con = sqlite3.connect(path)
    con.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),))
    con.commit()
    con.close()
    with pytest.raises(RegistryError, match="schema version"):
        Registry(path)


def test_missing_registry_named(tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match="no registry here"):
        Registry(tmp_path / "none.sqlite", create=False)


def test_not_a_database_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "r.sqlite"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(RegistryError, match="cannot open the run registry"):
        Registry(path)


def test_an_older_registry_is_migrated_in_place(tmp_path: Path) -> None:
    path = tmp_path / "r.sqlite"
    with Registry(path) as reg:
        reg.add_planned("a", "{}", "h")
    con = sqlite3.connect(path)
    con.execute("ALTER TABLE runs DROP COLUMN role")  # what a version-1 registry looked like
    con.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    con.commit()
    con.close()
    with Registry(path) as reg:
        assert reg.get("a")["role"] == "study"
        assert reg.runs(role="study")[0]["run_id"] == "a"
