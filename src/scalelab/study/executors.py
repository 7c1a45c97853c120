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
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from scalelab.errors import SpecError
from scalelab.extras import require_sinks
from scalelab.io import atomic_write_text, file_lock, read_tail
from scalelab.registry import Registry
from scalelab.spec import StudySpec, config_hash
from scalelab.study.gpus import GpuSlots, slot_gpus, visible_gpus
from scalelab.study.plan import PlannedRun, expand_runs
from scalelab.train.parallel.launch import TORCHRUN_ENV, torchrun_command
from scalelab.units import si

if TYPE_CHECKING:
    from scalelab.spec import StudySpec

log = logging.getLogger(__name__)

STDERR_TAIL_CHARS = 4000
LOCK_NAME = ".study.lock"


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
    return read_tail(path, chars).strip()


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def train_command(run_dir: Path, extra_args: Sequence[str] = ()) -> list[str]:
    """The command that trains (or resumes) one run in its directory."""
    return [
        sys.executable,
        "-m",
        "scalelab",
        "train",
        str(run_dir / "config.json"),
        "--out",
        str(run_dir),
        "--resume",
        *extra_args,
    ]


def wsd_args(planned: PlannedRun, run_dir: Path) -> list[str]:
    """`scalelab train` options of a WSD trunk (its snapshot steps) or branch (its trunk's snapshot, when
    that exists and verifies later; without it the branch trains from scratch, to the same result)."""
    args = []
    if planned.snapshot_steps:
        args += ["--snapshot-at", ",".join(str(s) for s in planned.snapshot_steps)]
    if planned.branch_of:
        from scalelab.train.branch import snapshot_path

        snapshot = snapshot_path(run_dir_for(run_dir.parent.parent, planned.branch_of), planned.branch_step)
        if (snapshot / "manifest.json").exists():
            args += ["--branch-from", str(snapshot)]
    return args


def ranks_for(planned: PlannedRun, nproc_per_run: int) -> int:
    """Processes a run trains in: `nproc_per_run` for ddp/fsdp runs, 1 for single-process ones."""
    return nproc_per_run if planned.spec.train.strategy != "none" else 1


def run_command(planned: PlannedRun, run_dir: Path, nproc_per_run: int = 1) -> list[str]:
    """The command of one run: `scalelab train` in one process, or — for a ddp/fsdp run when
    `nproc_per_run` > 1 — under torchrun with that many ranks (one per GPU on a GPU node)."""
    ranks = ranks_for(planned, nproc_per_run)
    if ranks > 1:
        return torchrun_command(run_dir / "config.json", run_dir, nproc=ranks)
    return train_command(run_dir, wsd_args(planned, run_dir))


class Dependencies:
    """Orders a study's runs so WSD branches start after their trunk (whatever the trunk's outcome)."""

    def __init__(self, todo: list[tuple[PlannedRun, Path]]):
        in_todo = {p.run_id for p, _ in todo}
        self.ready: list[tuple[PlannedRun, Path]] = []
        self._waiting: dict[str, list[tuple[PlannedRun, Path]]] = {}
        for planned, run_dir in todo:
            if planned.branch_of in in_todo:
                self._waiting.setdefault(planned.branch_of, []).append((planned, run_dir))
            else:
                self.ready.append((planned, run_dir))

    def finished(self, run_id: str) -> list[tuple[PlannedRun, Path]]:
        """The runs that may start now that `run_id` has ended."""
        return self._waiting.pop(run_id, [])


def run_env(threads: int | None) -> dict[str, str]:
    """Environment of a training subprocess: BLAS/OpenMP pinned to the run's thread count."""
    env = {**os.environ, **TORCHRUN_ENV}
    if threads:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[var] = str(threads)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def attempt_run(
    run_dir: Path,
    env: dict[str, str],
    timeout_seconds: float | None,
    on_start: Callable[[subprocess.Popen[bytes]], None] | None = None,
    command: Sequence[str] | None = None,
) -> tuple[str, str | None]:
    """Train one run once in a subprocess. Returns (status, error) with status one of
    done / failed / diverged (from record.json), timeout, or crashed (no record: killed, OOM, ...)."""
    record_path = run_dir / "record.json"
    record_path.unlink(missing_ok=True)
    with open(run_dir / "stdout.log", "ab") as out, open(run_dir / "stderr.log", "ab") as err:
        proc = subprocess.Popen(
            guarded(command or train_command(run_dir)),
            stdout=out,
            stderr=err,
            env=env,
            start_new_session=True,
        )
        if on_start:
            on_start(proc)
        try:
            proc.wait(timeout=timeout_seconds)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            return "timeout", f"timed out after {timeout_seconds:g} s"
    record = _read_json(record_path)
    if record is not None and record.get("status") in ("done", "failed", "diverged"):
        return record["status"], record.get("error")
    how = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exit code {proc.returncode}"
    return (
        "crashed",
        f"training process ended without a record ({how}); stderr tail:\n{_tail(run_dir / 'stderr.log')}",
    )


def attempt_with_retries(
    run_dir: Path,
    env: dict[str, str],
    timeout_seconds: float | None,
    retries: int,
    on_start: Callable[[subprocess.Popen[bytes]], None] | None = None,
    stopping: threading.Event | None = None,
    command: Sequence[str] | None = None,
) -> tuple[str, str | None, int]:
    """`attempt_run` again while the process crashed without a record, at most `retries` more times."""
    attempts, status, error = 0, "crashed", None
    while attempts <= retries and not (stopping and stopping.is_set()):
        attempts += 1
        status, error = attempt_run(run_dir, env, timeout_seconds, on_start, command)
        if status != "crashed":
            break
        if attempts <= retries:
            log.warning("run in %s crashed (attempt %d), retrying: %s", run_dir, attempts, error)
    return status, error, attempts


def record_outcome(
    registry: Registry,
    run_id: str,
    run_dir: Path,
    status: str,
    error: str | None,
    attempts: int,
    seconds: float,
) -> RunOutcome:
    """Write one attempt's result into the registry (the same for every executor)."""
    if status == "interrupted":
        registry.set_status(run_id, "pending", error)
    elif status in ("done", "failed", "diverged") and (run_dir / "record.json").exists():
        record = _read_json(run_dir / "record.json") or {
            "status": "failed",
            "error": "unreadable record.json",
        }
        registry.record_result(run_id, record, _read_json(run_dir / "provenance.json"))
        status = record.get("status", status)
    else:
        status = "timeout" if status == "timeout" else "failed"
        registry.set_status(run_id, status, error, error=error)
    return RunOutcome(run_id, status, seconds, error, attempts)


class LocalExecutor:
    """Bounded parallel subprocesses on this machine, one run directory each; on a machine with CUDA
    devices each concurrent run gets its own GPUs through CUDA_VISIBLE_DEVICES (study/gpus.py)."""

    def __init__(
        self,
        parallel: int = 1,
        timeout_seconds: float | None = None,
        retries: int = 0,
        nproc_per_run: int = 1,
    ):
        if parallel < 1 or nproc_per_run < 1:
            raise ValueError("parallel and nproc_per_run must be ≥ 1")
        self.parallel = parallel
        self.nproc_per_run = nproc_per_run
        self.timeout_seconds = timeout_seconds
        self.retries = retries
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._slots: GpuSlots | None = None  # built when the first run starts (study/gpus.py)

    @classmethod
    def from_options(cls, study: StudySpec, o: ExecutorOptions) -> LocalExecutor:
        return cls(o.parallel, o.timeout_seconds, o.retries, o.nproc_per_run)

    def gpu_slots(self) -> GpuSlots:
        """One slot per concurrent run, each with its own GPUs when there are enough (study/gpus.py)."""
        with self._lock:
            if self._slots is None:
                gpus = visible_gpus()
                self._slots = GpuSlots(slot_gpus(gpus, self.parallel, self.nproc_per_run))
                if gpus:
                    log.info("GPUs per run slot: %s", self._slots.assignment)
            return self._slots

    def run_one(self, planned: PlannedRun, run_dir: Path, registry: Registry) -> RunOutcome:
        t0 = time.perf_counter()
        registry.set_status(planned.run_id, "running", host=os.uname().nodename)

        def started(proc: subprocess.Popen[bytes]) -> None:
            with self._lock:
                self._procs[planned.run_id] = proc

        with self.gpu_slots().take() as gpu_env:
            status, error, attempts = attempt_with_retries(
                run_dir,
                run_env(planned.spec.train.threads) | gpu_env,
                self.timeout_seconds,
                self.retries,
                started,
                self._stopping,
                run_command(planned, run_dir, self.nproc_per_run),
            )
        with self._lock:
            self._procs.pop(planned.run_id, None)
        if self._stopping.is_set() and status not in ("done", "diverged"):
            status, error = "interrupted", "stopped by the study driver (Ctrl-C); re-run to resume"
        return record_outcome(
            registry, planned.run_id, run_dir, status, error, attempts, time.perf_counter() - t0
        )

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
        deps = Dependencies(todo)
        pool = ThreadPoolExecutor(max_workers=self.parallel, thread_name_prefix="scalelab-run")
        try:
            futures = {pool.submit(self.run_one, p, d, registry): p for p, d in deps.ready}
            while futures:
                done, _ = wait(futures, return_when=FIRST_COMPLETED)
                for fut in done:
                    planned = futures.pop(fut)
                    outcome = fut.result()
                    outcomes.append(outcome)
                    if progress:
                        progress(outcome)
                    for p, d in deps.finished(planned.run_id):
                        if not self._stopping.is_set():
                            futures[pool.submit(self.run_one, p, d, registry)] = p
        except KeyboardInterrupt:
            self.stop()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        return outcomes


class RayExecutor:
    """Each run a Ray task (on an existing cluster, or a local Ray instance when no address is given).

    Tasks run the same training command as `LocalExecutor` on whichever node Ray places them, so the
    study directory must be on a file system every node sees. The driver alone writes the registry.
    """

    def __init__(
        self,
        address: str | None = None,
        cpus_per_run: float = 1,
        gpus_per_run: float = 0,
        timeout_seconds: float | None = None,
        retries: int = 0,
        local_cpus: int | None = None,
        nproc_per_run: int = 1,
    ):
        self.address = address
        self.nproc_per_run = nproc_per_run
        self.cpus_per_run = cpus_per_run
        self.gpus_per_run = gpus_per_run
        self.timeout_seconds = timeout_seconds
        self.retries = retries
        self.local_cpus = local_cpus

    @classmethod
    def from_options(cls, study: StudySpec, o: ExecutorOptions) -> RayExecutor:
        """A Ray task per run with the run's threads as CPUs; a local Ray sized for `parallel` runs
        when no cluster address is given."""
        threads = study.train.threads or 1
        return cls(
            address=o.address,
            cpus_per_run=threads,
            gpus_per_run=o.gpus_per_run,
            timeout_seconds=o.timeout_seconds,
            retries=o.retries,
            local_cpus=None if o.address else o.parallel * threads * o.nproc_per_run,
            nproc_per_run=o.nproc_per_run,
        )

    def _init(self) -> Any:
        from scalelab.raycluster import ray_connect

        return ray_connect(self.address, self.local_cpus, "the Ray executor")

    def execute(
        self, todo: list[tuple[PlannedRun, Path]], registry: Registry, progress: ProgressFn | None = None
    ) -> list[RunOutcome]:
        if not todo:
            return []
        ray = self._init()
        task = ray.remote(max_retries=0)(_ray_train_task)
        pending = {}
        deps = Dependencies(todo)

        def submit(planned: PlannedRun, run_dir: Path) -> None:
            registry.set_status(planned.run_id, "running", "submitted to Ray")
            env = run_env(planned.spec.train.threads)
            command = run_command(planned, run_dir, self.nproc_per_run)
            ranks = ranks_for(planned, self.nproc_per_run)
            ref = task.options(num_cpus=self.cpus_per_run * ranks, num_gpus=self.gpus_per_run).remote(
                str(run_dir), env, self.timeout_seconds, self.retries, command
            )
            pending[ref] = (planned, run_dir, time.perf_counter())

        for planned, run_dir in deps.ready:
            submit(planned, run_dir)
        outcomes: list[RunOutcome] = []
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    planned, run_dir, t0 = pending.pop(ref)
                    for waiting in deps.finished(planned.run_id):
                        submit(*waiting)
                    try:
                        status, error, attempts = ray.get(ref)
                    except Exception as err:  # noqa: BLE001 - a lost task is one failed run
                        status, error, attempts = "crashed", f"Ray task failed: {err}", 1
                    outcome = record_outcome(
                        registry, planned.run_id, run_dir, status, error, attempts, time.perf_counter() - t0
                    )
                    outcomes.append(outcome)
                    if progress:
                        progress(outcome)
        except KeyboardInterrupt:
            for ref in pending:
                ray.cancel(ref, force=True)
            for planned, run_dir, t0 in pending.values():
                record_outcome(
                    registry,
                    planned.run_id,
                    run_dir,
                    "interrupted",
                    "stopped (Ctrl-C)",
                    0,
                    time.perf_counter() - t0,
                )
            raise
        return outcomes


def _ray_train_task(
    run_dir: str, env: dict[str, str], timeout_seconds: float | None, retries: int, command: list[str]
) -> tuple[str, str | None, int]:
    """Body of the Ray task: the same attempt-with-retries as a local run, on the node Ray chose (a
    torchrun command starts its ranks there, on the GPUs Ray gave the task)."""
    return attempt_with_retries(Path(run_dir), env, timeout_seconds, retries, command=command)


@runtime_checkable
class Executor(Protocol):
    """Runs a study's planned runs somewhere (here, Ray, Slurm) and reports each outcome; the driver
    (`run_study`) alone writes the registry from what `execute` returns and reports."""

    def execute(
        self, todo: list[tuple[PlannedRun, Path]], registry: Registry, progress: ProgressFn | None = None
    ) -> list[RunOutcome]: ...


@dataclass(frozen=True)
class ExecutorOptions:
    """What `scalelab study run` passes to every executor; each takes the options that apply to it."""

    parallel: int = 1
    timeout_seconds: float | None = None
    retries: int = 0
    nproc_per_run: int = 1
    address: str | None = None  # a Ray cluster
    gpus_per_run: float = 0


#: `--executor NAME` → "module:class"; a new executor is one module whose class has
#: `from_options(study, options)` and `execute`, plus one line here
EXECUTORS: dict[str, str] = {
    "local": "scalelab.study.executors:LocalExecutor",
    "ray": "scalelab.study.executors:RayExecutor",
    "slurm": "scalelab.study.slurm:SlurmExecutor",
}


def make_executor(name: str, study: StudySpec, options: ExecutorOptions) -> Executor:
    """The executor `--executor NAME` names, built for `study`; SpecError naming the flag when unknown."""
    import importlib

    from scalelab.errors import SpecError

    if name not in EXECUTORS:
        raise SpecError(f"--executor: expected one of {', '.join(EXECUTORS)}, got {name!r}")
    module, _, attr = EXECUTORS[name].partition(":")
    return getattr(importlib.import_module(module), attr).from_options(study, options)  # type: ignore[no-any-return]


def guarded(command: Sequence[str]) -> list[str]:
    """`command` wrapped so that Linux kills it when this driver dies (even by SIGKILL), so a re-run of
    the study never races an orphaned training of the same run (`scalelab.study.orphan_guard`)."""
    if not sys.platform.startswith("linux"):
        return list(command)
    return [sys.executable, "-m", "scalelab.study.orphan_guard", str(os.getpid()), "--", *command]


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
    from scalelab.study.identity import freeze_identity
    from scalelab.study.preregister import freeze

    study_dir.mkdir(parents=True, exist_ok=True)
    freeze_identity(study, study_dir)
    freeze(study, study_dir)
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
    """Register every planned run and write its config.json; return (all runs, runs still to do).

    `forecast(planned)` (seconds) is asked only for runs still to do, so the skip path stays fast.
    """
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
        )
        row = registry.get(planned.run_id)
        if row and row["status"] == "done" and (run_dir / "record.json").exists():
            continue
        if forecast is not None and row and row.get("forecast_seconds") is None:
            registry.set_forecast(planned.run_id, forecast(planned))
        run_dir.mkdir(parents=True, exist_ok=True)
        config = run_dir / "config.json"
        canonical = planned.spec.canonical_json()
        try:
            intact = config.read_text().strip() == canonical
        except (OSError, UnicodeDecodeError):
            intact = False
        if not intact:  # absent, or cut short by a crash: the run id says what it must hold
            atomic_write_text(config, canonical)
        todo.append((planned, run_dir))
    return runs, todo


def run_study(
    study: StudySpec,
    study_dir: str | Path,
    *,
    executor: Executor | None = None,
    source_text: str | None = None,
    overrides: tuple[str, ...] = (),
    progress: ProgressFn | None = None,
    on_plan: Callable[[list[PlannedRun], dict[str, float | None]], None] | None = None,
    forecast: Callable[[PlannedRun], float | None] | None = None,
    on_status: Callable[[str], None] | None = None,
) -> StudyResult:
    """Plan, register and execute a study; finished runs are skipped, the rest run (or resume).

    `on_plan(runs, todo)` gets every planned run and, for those still to do, their forecast seconds (None:
    unknown); `on_status(message)` says what the study is doing between runs (building a token store).
    One driver per study directory: a second one finds `.study.lock` held and stops with "already in
    use by PID …" before it writes anything."""
    study_dir = Path(study_dir)
    executor = executor or LocalExecutor()
    try:
        study_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SpecError(f"{study_dir}: cannot create the study directory ({err.strerror or err})") from None
    with file_lock(study_dir / LOCK_NAME, wait=False, what=f"{study_dir} (study driver)"):
        return _run_study_locked(
            study, study_dir, executor, source_text, overrides, progress, on_plan, forecast, on_status
        )


def _run_study_locked(
    study: StudySpec,
    study_dir: Path,
    executor: Executor,
    source_text: str | None,
    overrides: tuple[str, ...],
    progress: ProgressFn | None,
    on_plan: Callable[[list[PlannedRun], dict[str, float | None]], None] | None,
    forecast: Callable[[PlannedRun], float | None] | None,
    on_status: Callable[[str], None] | None,
) -> StudyResult:
    write_study_files(study, study_dir, source_text, overrides)
    with Registry(study_dir / "registry.sqlite") as registry:
        runs, todo = prepare_run_dirs(study, study_dir, registry, forecast)
        require_sinks(
            sorted({s for planned, _ in todo for s in planned.spec.train.sinks}), "study.train.sinks"
        )
        done_ids = {p.run_id for p in runs} - {p.run_id for p, _ in todo}
        if on_plan:
            on_plan(runs, {p.run_id: (registry.get(p.run_id) or {}).get("forecast_seconds") for p, _ in todo})
        if todo:
            _prepare_data(todo, on_status or (lambda message: None))
        result = StudyResult(study_dir, [RunOutcome(rid, "skipped") for rid in sorted(done_ids)])
        result.outcomes += executor.execute(todo, registry, progress)
    return result


def _prepare_data(todo: list[tuple[PlannedRun, Path]], on_status: Callable[[str], None]) -> None:
    """Build each distinct token store once, before runs start, so parallel runs only open it."""
    from scalelab.data.store import ensure_store

    seen = set()
    for planned, _ in todo:
        key = planned.spec.data.model_dump_json()
        if key not in seen:
            seen.add(key)
            on_status("token store: opening, or building it from the corpus (once; cached afterwards) …")
            t0 = time.monotonic()
            store = ensure_store(planned.spec.data)
            tokens = store.num_tokens("train") + store.num_tokens("heldout")
            on_status(
                f"token store ready: {si(tokens)} tokens in {time.monotonic() - t0:.1f} s ({store.path})"
            )
