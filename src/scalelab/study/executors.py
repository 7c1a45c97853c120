"""Run a study's runs: each in its own subprocess and run directory, results into the registry.

`LocalExecutor` runs up to K runs at once on this machine. A run that crashes, diverges or times out is
recorded with its reason and the others go on; a re-run of the study skips finished runs and resumes
interrupted ones from their checkpoints (the training command is always started with `--resume`).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scalelab.spec import StudySpec, config_hash
from scalelab.study.plan import PlannedRun, expand_runs
from scalelab.study.registry import Registry

log = logging.getLogger(__name__)

#: exit codes of `scalelab train` (see scalelab.train.run.exit_code)
EXIT_DONE, EXIT_FAILED, EXIT_DIVERGED = 0, 1, 3
STDERR_TAIL_CHARS = 4000


@dataclass
class RunOutcome:
    """What happened to one run in this invocation."""

    run_id: str
    status: str  # done | failed | diverged | timeout | skipped | interrupted
    seconds: float = 0.0
    error: str | None = None
    attempts: int = 0


@dataclass
class StudyResult:
    study_dir: Path
    outcomes: list[RunOutcome] = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(1 for o in self.outcomes if o.status == status)

    @property
    def ok(self) -> bool:
        return all(o.status in ("done", "skipped") for o in self.outcomes)


ProgressFn = Callable[[RunOutcome], None]


def run_dir_for(study_dir: Path, run_id: str) -> Path:
    return study_dir / "runs" / run_id


def _tail(path: Path, chars: int = STDERR_TAIL_CHARS) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - chars))
            return f.read().decode(errors="replace").strip()
    except OSError:
        return ""


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


class LocalExecutor:
    """Bounded parallel subprocesses on this machine, one run directory each."""

    def __init__(self, parallel: int = 1, timeout_seconds: float | None = None, retries: int = 0):
        if parallel < 1:
            raise ValueError("parallel must be ≥ 1")
        self.parallel = parallel
        self.timeout_seconds = timeout_seconds
        self.retries = retries
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()

    def command(self, run_dir: Path) -> list[str]:
        return [
            sys.executable,
            "-m",
            "scalelab",
            "train",
            str(run_dir / "config.json"),
            "--out",
            str(run_dir),
            "--resume",
        ]

    def _env(self, planned: PlannedRun) -> dict[str, str]:
        env = dict(os.environ)
        threads = planned.spec.train.threads
        if threads:
            for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
                env[var] = str(threads)
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    def _launch_once(self, planned: PlannedRun, run_dir: Path) -> tuple[str, str | None]:
        """One attempt. Returns (status, error); status is done/failed/diverged/timeout/interrupted/crashed."""
        record_path = run_dir / "record.json"
        record_path.unlink(missing_ok=True)
        with open(run_dir / "stdout.log", "ab") as out, open(run_dir / "stderr.log", "ab") as err:
            proc = subprocess.Popen(
                self.command(run_dir), stdout=out, stderr=err, env=self._env(planned), start_new_session=True
            )
            with self._lock:
                self._procs[planned.run_id] = proc
            try:
                proc.wait(timeout=self.timeout_seconds)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                return "timeout", f"timed out after {self.timeout_seconds:g} s"
            finally:
                with self._lock:
                    self._procs.pop(planned.run_id, None)
        if self._stopping.is_set():
            return "interrupted", "stopped by the study driver (Ctrl-C)"
        record = _read_json(record_path)
        if record is not None and record.get("status") in ("done", "failed", "diverged"):
            return record["status"], record.get("error")
        tail = _tail(run_dir / "stderr.log")
        how = (
            f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exit code {proc.returncode}"
        )
        return "crashed", f"training process ended without a record ({how}); stderr tail:\n{tail}"

    def run_one(self, planned: PlannedRun, run_dir: Path, registry: Registry) -> RunOutcome:
        t0 = time.perf_counter()
        attempts = 0
        status, error = "failed", None
        while attempts <= self.retries and not self._stopping.is_set():
            attempts += 1
            registry.set_status(planned.run_id, "running", f"attempt {attempts}", host=os.uname().nodename)
            status, error = self._launch_once(planned, run_dir)
            if status == "crashed" and attempts <= self.retries:
                log.warning("run %s crashed (attempt %d), retrying: %s", planned.run_id, attempts, error)
                continue
            break
        seconds = time.perf_counter() - t0
        if status == "interrupted":
            registry.set_status(planned.run_id, "pending", error)
        elif status in ("done", "failed", "diverged") and (run_dir / "record.json").exists():
            record = _read_json(run_dir / "record.json") or {"status": "failed", "error": "unreadable record"}
            registry.record_result(planned.run_id, record, _read_json(run_dir / "provenance.json"))
        else:
            status = "timeout" if status == "timeout" else "failed"
            registry.set_status(planned.run_id, status, error, error=error)
        return RunOutcome(planned.run_id, status, seconds, error, attempts)

    def stop(self) -> None:
        """Stop gracefully: running trainings are killed; they resume from checkpoints next time."""
        self._stopping.set()
        with self._lock:
            procs = list(self._procs.values())
        for proc in procs:
            _kill_group(proc)

    def execute(
        self, todo: list[tuple[PlannedRun, Path]], registry: Registry, progress: ProgressFn | None = None
    ) -> list[RunOutcome]:
        outcomes: list[RunOutcome] = []
        pool = ThreadPoolExecutor(max_workers=self.parallel, thread_name_prefix="scalelab-run")
        try:
            futures = {pool.submit(self.run_one, p, d, registry): p for p, d in todo}
            for fut in as_completed(futures):
                outcome = fut.result()
                outcomes.append(outcome)
                if progress:
                    progress(outcome)
        except KeyboardInterrupt:
            self.stop()
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        return outcomes


def _kill_group(proc: subprocess.Popen[bytes], grace_seconds: float = 5.0) -> None:
    """SIGTERM the run's process group, then SIGKILL what is left."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        return
    try:
        proc.wait(timeout=grace_seconds)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()


def write_study_files(
    study: StudySpec, study_dir: Path, source_text: str | None, overrides: tuple[str, ...] = ()
) -> None:
    """Record the study as run: validated `study.json` and the TOML it came from (with overrides noted)."""
    from scalelab.io import atomic_write_text

    study_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(
        study_dir / "study.json", json.dumps(study.model_dump(mode="json"), indent=2, sort_keys=True)
    )
    if source_text is not None:
        header = "".join(f"# --set {o}\n" for o in overrides)
        atomic_write_text(study_dir / "study.toml", header + source_text)


def prepare_run_dirs(
    study: StudySpec,
    study_dir: Path,
    registry: Registry,
    forecast: Callable[[PlannedRun], float | None] | None = None,
) -> tuple[list[PlannedRun], list[tuple[PlannedRun, Path]]]:
    """Register every planned run and write its config.json; return (all runs, runs still to do)."""
    from scalelab.io import atomic_write_text

    runs = expand_runs(study)
    todo = []
    for planned in runs:
        run_dir = run_dir_for(study_dir, planned.run_id)
        registry.add_planned(
            planned.run_id,
            planned.spec.canonical_json(),
            config_hash(planned.spec),
            point=planned.point,
            seed=planned.spec.train.seed,
            run_dir=str(run_dir),
            forecast_seconds=forecast(planned) if forecast else None,
        )
        row = registry.get(planned.run_id)
        if row and row["status"] == "done" and (run_dir / "record.json").exists():
            continue
        run_dir.mkdir(parents=True, exist_ok=True)
        if not (run_dir / "config.json").exists():
            atomic_write_text(run_dir / "config.json", planned.spec.canonical_json())
        todo.append((planned, run_dir))
    return runs, todo


def run_study(
    study: StudySpec,
    study_dir: str | Path,
    *,
    executor: LocalExecutor | None = None,
    source_text: str | None = None,
    overrides: tuple[str, ...] = (),
    progress: ProgressFn | None = None,
    on_plan: Callable[[list[PlannedRun], int], None] | None = None,
) -> StudyResult:
    """Plan, register and execute a study; finished runs are skipped, the rest run (or resume)."""
    study_dir = Path(study_dir)
    executor = executor or LocalExecutor()
    write_study_files(study, study_dir, source_text, overrides)
    with Registry(study_dir / "registry.sqlite") as registry:
        runs, todo = prepare_run_dirs(study, study_dir, registry)
        done_ids = {p.run_id for p in runs} - {p.run_id for p, _ in todo}
        if on_plan:
            on_plan(runs, len(todo))
        if todo:
            _prepare_data(todo)
        result = StudyResult(study_dir, [RunOutcome(rid, "skipped") for rid in sorted(done_ids)])
        result.outcomes += executor.execute(todo, registry, progress)
    return result


def _prepare_data(todo: list[tuple[PlannedRun, Path]]) -> None:
    """Build each distinct token store once, before runs start, so parallel runs only open it."""
    from scalelab.data.store import ensure_store

    seen = set()
    for planned, _ in todo:
        key = planned.spec.data.model_dump_json()
        if key not in seen:
            seen.add(key)
            ensure_store(planned.spec.data)
