"""The study's run registry: one SQLite file (WAL mode) that many processes may write at once.

One row per run with its status (pending, running, done, failed, diverged, timeout), config hash, N, D,
FLOPs, losses, times, memory, energy and run directory; an append-only `events` table keeps every status
change. Writers take short `BEGIN IMMEDIATE` transactions with a generous busy timeout and retry on
contention, so concurrent writers never fail with "database is locked".
"""

from __future__ import annotations

import json
import logging
import random
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from scalelab.errors import RegistryError
from scalelab.provenance import utc_now
from scalelab.record import REGISTRY_COLUMNS

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2
#: `study`: a run of the study's design (fitted); `target`: a large run added to check the prediction.
ROLES = ("study", "target")
STATUSES = ("pending", "running", "done", "failed", "diverged", "timeout")
FINISHED = ("done",)

#: columns copied from record.json into the row (the rest stays in record_json): the record's schema
RECORD_COLUMNS = REGISTRY_COLUMNS

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    status TEXT NOT NULL CHECK (status IN ({", ".join(repr(s) for s in STATUSES)})),
    config_hash TEXT NOT NULL,
    config_json TEXT NOT NULL,
    point_json TEXT NOT NULL DEFAULT '{{}}',
    role TEXT NOT NULL DEFAULT 'study' CHECK (role IN ('study', 'target')),
    seed INTEGER,
    run_dir TEXT,
    n_params INTEGER, n_params_total INTEGER, tokens INTEGER, flops REAL, steps INTEGER,
    final_train_loss REAL, eval_loss REAL, wall_seconds REAL, tokens_per_second REAL,
    peak_memory_bytes INTEGER, energy_joules REAL,
    forecast_seconds REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    host TEXT,
    record_json TEXT,
    provenance_json TEXT,
    started_at TEXT, finished_at TEXT,
    created_at TEXT NOT NULL, updated_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL, at TEXT NOT NULL, status TEXT NOT NULL, message TEXT
);
CREATE INDEX IF NOT EXISTS runs_status ON runs(status);
"""


#: additive migrations: version → statements that bring a registry of that version to the next one.
_MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        "ALTER TABLE runs ADD COLUMN role TEXT NOT NULL DEFAULT 'study' CHECK (role IN ('study', 'target'))",
    ),
}


class Registry:
    """A handle on `registry.sqlite`; cheap to create, safe to use from many processes."""

    def __init__(self, path: str | Path, *, create: bool = True, busy_timeout_seconds: float = 60.0):
        self.path = Path(path)
        if not create and not self.path.exists():
            raise RegistryError(f"{self.path}: no registry here (run `scalelab study run` first)")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._busy_ms = int(busy_timeout_seconds * 1000)
        self._lock = threading.RLock()
        try:
            # One connection shared by the driver's threads; `_lock` serialises its use.
            self._conn = sqlite3.connect(
                self.path, timeout=busy_timeout_seconds, isolation_level=None, check_same_thread=False
            )
            self._conn.row_factory = sqlite3.Row
            self._conn.execute(f"PRAGMA busy_timeout = {self._busy_ms}")
            self._retry(lambda: self._conn.execute("PRAGMA journal_mode = WAL"))
            self._conn.execute("PRAGMA synchronous = NORMAL")
            self._init_schema()
        except sqlite3.DatabaseError as err:
            raise RegistryError(f"{self.path}: cannot open the run registry ({err})") from None

    # ------------------------------------------------------------------ plumbing
    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _retry(self, fn: Any, attempts: int = 50) -> Any:
        for i in range(attempts):
            try:
                return fn()
            except sqlite3.OperationalError as err:
                if "locked" not in str(err) and "busy" not in str(err) or i == attempts - 1:
                    raise
                time.sleep(min(1.0, 0.01 * 2**i) * random.random())
        return None

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A short exclusive-for-writers transaction, retried on lock contention."""
        with self._lock, self._damage_is_an_error():
            self._retry(lambda: self._conn.execute("BEGIN IMMEDIATE"))
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            else:
                self._retry(lambda: self._conn.execute("COMMIT"))

    @contextmanager
    def _damage_is_an_error(self) -> Iterator[None]:
        """sqlite3 errors other than lock contention (a damaged file) become a RegistryError."""
        try:
            yield
        except sqlite3.DatabaseError as err:
            raise RegistryError(
                f"{self.path}: the run registry is damaged ({err}); restore it from a copy, or re-register "
                "the runs by running `scalelab study run` into a new --out directory"
            ) from None

    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock, self._damage_is_an_error():
            return self._conn.execute(sql, args).fetchall()

    def _init_schema(self) -> None:
        with self._write() as c:
            for stmt in _SCHEMA.strip().split(";"):
                if stmt.strip():
                    c.execute(stmt)
            row = c.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            if row is None:
                c.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            elif int(row["value"]) > SCHEMA_VERSION:
                raise RegistryError(
                    f"{self.path}: registry schema version {row['value']}, this scalelab reads version "
                    f"{SCHEMA_VERSION}; use the scalelab version that wrote it or start a new study directory"
                )
            else:
                for version in range(int(row["value"]), SCHEMA_VERSION):
                    for stmt in _MIGRATIONS[version]:
                        c.execute(stmt)
                    log.info("%s: migrated the registry schema from version %d", self.path, version)
                c.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION),))

    # ------------------------------------------------------------------ writes
    def add_planned(
        self,
        run_id: str,
        config_json: str,
        config_hash: str,
        *,
        point: dict[str, Any] | None = None,
        seed: int | None = None,
        run_dir: str | None = None,
        forecast_seconds: float | None = None,
        role: str = "study",
    ) -> bool:
        """Register a planned run as pending; an existing row keeps its status. True if newly added."""
        if role not in ROLES:
            raise RegistryError(f"unknown run role {role!r}; expected one of {ROLES}")
        run_dir = self._stored_dir(run_dir)
        now = utc_now()
        with self._write() as c:
            cur = c.execute(
                "INSERT OR IGNORE INTO runs (run_id, status, config_hash, config_json, point_json, seed, run_dir,"
                " forecast_seconds, role, created_at, updated_at) VALUES (?, 'pending', ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    run_id,
                    config_hash,
                    config_json,
                    json.dumps(point or {}),
                    seed,
                    run_dir,
                    forecast_seconds,
                    role,
                    now,
                    now,
                ),
            )
            if cur.rowcount:
                self._event(c, run_id, "pending", None)
            return bool(cur.rowcount)

    def set_status(self, run_id: str, status: str, message: str | None = None, **fields: Any) -> None:
        """Move a run to `status`, optionally setting other columns (error, host, started_at, ...)."""
        if status not in STATUSES:
            raise RegistryError(f"unknown run status {status!r}; expected one of {STATUSES}")
        cols = {"status": status, "updated_at": utc_now(), **fields}
        if status == "running":
            cols.setdefault("error", None)
        sets = ", ".join(f"{k} = ?" for k in cols)
        with self._write() as c:
            extra = ", attempts = attempts + 1" if status == "running" else ""
            cur = c.execute(f"UPDATE runs SET {sets}{extra} WHERE run_id = ?", (*cols.values(), run_id))
            if not cur.rowcount:
                raise RegistryError(f"{self.path}: run {run_id} is not registered")
            self._event(c, run_id, status, message)

    def set_forecast(self, run_id: str, seconds: float | None) -> None:
        """Store the forecast wall time of a run (shown against the actual one by `study status`)."""
        with self._write() as c:
            c.execute("UPDATE runs SET forecast_seconds = ? WHERE run_id = ?", (seconds, run_id))

    def record_result(
        self, run_id: str, record: dict[str, Any], provenance: dict[str, Any] | None = None
    ) -> None:
        """Store a finished run's record.json (status taken from it) and its provenance."""
        status = record.get("status", "failed")
        if status not in STATUSES:
            status = "failed"
        fields = {k: record.get(k) for k in RECORD_COLUMNS}
        fields["error"] = record.get("error")
        fields["record_json"] = json.dumps(record, sort_keys=True)
        if provenance is not None:
            fields["provenance_json"] = json.dumps(provenance, sort_keys=True)
        self.set_status(run_id, status, record.get("error"), **fields)

    @staticmethod
    def _event(c: sqlite3.Connection, run_id: str, status: str, message: str | None) -> None:
        c.execute(
            "INSERT INTO events (run_id, at, status, message) VALUES (?, ?, ?, ?)",
            (run_id, utc_now(), status, message),
        )

    def _stored_dir(self, run_dir: str | None) -> str | None:
        """A run directory inside the study directory is stored relative to it (the study can move, and
        `report`/`watch` work from any working directory); one outside it, absolute."""
        if run_dir is None:
            return None
        path = Path(run_dir).resolve()
        try:
            return path.relative_to(self.path.parent.resolve()).as_posix()
        except ValueError:
            return str(path)

    # ------------------------------------------------------------------ reads
    def _row(self, row: sqlite3.Row) -> dict[str, Any]:
        """A row as a dict; `run_dir` made usable from here (relative ones are under the study dir)."""
        d = dict(row)
        d["point"] = json.loads(d.pop("point_json") or "{}")
        stored = d.get("run_dir")
        if stored and not Path(stored).is_absolute():
            under = self.path.parent / stored
            # registries written before run dirs were stored relative to the study held cwd-relative ones
            d["run_dir"] = str(under) if under.exists() or not Path(stored).exists() else stored
        return d

    def get(self, run_id: str) -> dict[str, Any] | None:
        rows = self._query("SELECT * FROM runs WHERE run_id = ?", (run_id,))
        return self._row(rows[0]) if rows else None

    def runs(
        self, status: str | tuple[str, ...] | None = None, role: str | None = None
    ) -> list[dict[str, Any]]:
        """Rows as dicts (the record.json keys plus run_dir, point, seed, role), oldest first;
        optionally only those with a given status (or statuses) and role."""
        where, args = [], []
        if status is not None:
            wanted = (status,) if isinstance(status, str) else tuple(status)
            where.append(f"status IN ({', '.join('?' for _ in wanted)})")
            args += wanted
        if role is not None:
            where.append("role = ?")
            args.append(role)
        sql = "SELECT * FROM runs" + (f" WHERE {' AND '.join(where)}" if where else "")
        return [self._row(r) for r in self._query(sql + " ORDER BY created_at, run_id", tuple(args))]

    def counts(self) -> dict[str, int]:
        rows = self._query("SELECT status, COUNT(*) AS n FROM runs GROUP BY status")
        return {r["status"]: r["n"] for r in rows}

    def events(self, run_id: str | None = None) -> list[dict[str, Any]]:
        if run_id is None:
            rows = self._query("SELECT * FROM events ORDER BY id")
        else:
            rows = self._query("SELECT * FROM events WHERE run_id = ? ORDER BY id", (run_id,))
        return [dict(r) for r in rows]
