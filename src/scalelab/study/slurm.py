"""`study run --executor slurm`: each run a Slurm job, submitted through submitit, requeued when preempted.

A job runs the same training command as `LocalExecutor` (`scalelab train … --resume`), so a job that
starts again resumes from the run's checkpoint. Resources come from the spec's `[study.slurm]` section
(`spec.SlurmSpec`) and the run: one task per node, `train.threads` × ranks CPUs, the GPUs of a CUDA run,
a time limit from the forecast. A ddp/fsdp run trains under torchrun on every node of its job (`srun`
starts one agent per node), with the rendezvous at the job's first node on a port derived from the job
id, both read from Slurm's environment in the job (`node_command`).

Requeueing, two ways:
- In the job: Slurm signals it `signal_delay_seconds` before its time limit (or a preemption sends the
  same signal); submitit's handler calls `SlurmRunTask.checkpoint`, which stops the training (it has
  saved checkpoints as it went) and has submitit `scontrol requeue` the same job.
- In the driver: a job that ended CANCELLED (`scancel`), PREEMPTED, TIMEOUT, NODE_FAIL, BOOT_FAIL or
  DEADLINE without a finished record is submitted again, up to `requeues` times (`next_step`). To stop a
  study for good, stop the driver (Ctrl-C): it cancels its jobs and does not requeue them.

The driver polls job states with `squeue --states=all` (no accounting database needed); a job that no
longer appears there has ended, and the run directory's `record.json` says how. The study directory must
be on a file system the nodes share.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scalelab.errors import ScalelabError
from scalelab.registry import Registry
from scalelab.spec import SlurmSpec
from scalelab.study.executors import (
    Dependencies,
    ExecutorOptions,
    ProgressFn,
    RunOutcome,
    _read_json,
    _tail,
    attempt_run,
    ranks_for,
    record_outcome,
    run_env,
    train_command,
    wsd_args,
)
from scalelab.study.plan import PlannedRun
from scalelab.train.parallel.launch import torchrun_command

log = logging.getLogger(__name__)

#: Slurm job states after which the job will not run again by itself; "GONE": no longer known to Slurm
TERMINAL_STATES = frozenset(
    {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
    | {"PREEMPTED", "GONE"}
)
#: terminal states in which the job was stopped from outside: the run is submitted again (requeued)
REQUEUE_STATES = frozenset({"CANCELLED", "PREEMPTED", "TIMEOUT", "NODE_FAIL", "BOOT_FAIL", "DEADLINE"})
FINISHED_RECORDS = ("done", "failed", "diverged")
#: rendezvous ports of multi-node runs: BASE + job id mod SPAN (the same on every node of the job)
RDZV_PORT_BASE, RDZV_PORT_SPAN = 20000, 30000


# ------------------------------------------------------------------------------ pure pieces (tested)
def time_limit_minutes(slurm: SlurmSpec, forecast_seconds: float | None) -> int:
    """The spec's limit, else twice the forecast plus 10 minutes (60 minutes when nothing is forecast)."""
    if slurm.time_minutes is not None:
        return slurm.time_minutes
    if forecast_seconds is None:
        return 60
    return int(-(-2 * forecast_seconds // 60)) + 10


def job_parameters(
    planned: PlannedRun, slurm: SlurmSpec, nproc_per_run: int = 1, forecast_seconds: float | None = None
) -> dict[str, Any]:
    """submitit `SlurmExecutor.update_parameters` arguments of one run's job (see the module doc)."""
    train = planned.spec.train
    ranks = ranks_for(planned, nproc_per_run)
    nodes = slurm.nodes if train.strategy != "none" else 1
    gpus = (
        slurm.gpus_per_node if slurm.gpus_per_node is not None else (ranks if train.device == "cuda" else 0)
    )
    params: dict[str, Any] = {
        "job_name": f"scalelab-{planned.run_id}",
        "nodes": nodes,
        "ntasks_per_node": 1,  # one torchrun agent (or the one training process) per node
        "cpus_per_task": slurm.cpus_per_task or (train.threads or 1) * ranks,
        "time": time_limit_minutes(slurm, forecast_seconds),
        "signal_delay_s": slurm.signal_delay_seconds,
        "additional_parameters": {"requeue": True, **slurm.sbatch},
    }
    if gpus:
        params["gpus_per_node"] = gpus
    for name in ("partition", "account", "qos"):
        if getattr(slurm, name) is not None:
            params[name] = getattr(slurm, name)
    if slurm.mem_gb is not None:
        gb = slurm.mem_gb
        params["mem"] = f"{int(gb)}GB" if gb == int(gb) else f"{int(gb * 1024)}MB"
    if slurm.setup:
        params["setup"] = list(slurm.setup)
    return params


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list ("gpu[003-004,9],cpu1" → "gpu003")."""
    depth, end = 0, len(nodelist)
    for i, ch in enumerate(nodelist):
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            end = i
            break
    item = nodelist[:end].strip()
    m = re.fullmatch(r"([^\[]*)\[([^\]]+)\](.*)", item)
    if not m:
        if not item:
            raise ScalelabError(f"SLURM_JOB_NODELIST={nodelist!r}: no host in it")
        return item
    prefix, ranges, suffix = m.groups()
    return prefix + re.split(r"[-,]", ranges, maxsplit=1)[0] + suffix


def rendezvous_port(job_id: str | int) -> int:
    """The torchrun rendezvous port of a job: derived from its id, so every node computes the same."""
    return RDZV_PORT_BASE + int(str(job_id).split("_")[0]) % RDZV_PORT_SPAN


def node_command(run_dir: Path, nproc: int, nnodes: int, env: Mapping[str, str]) -> list[str]:
    """The torchrun command one node of a ddp/fsdp run's job runs, from Slurm's environment `env`."""
    if nnodes == 1:
        return torchrun_command(run_dir / "config.json", run_dir, nproc=nproc)
    missing = [v for v in ("SLURM_JOB_ID", "SLURM_JOB_NODELIST", "SLURM_NNODES") if not env.get(v)]
    if missing:
        raise ScalelabError(f"a {nnodes}-node run must start inside a Slurm job ({', '.join(missing)} unset)")
    if int(env["SLURM_NNODES"]) != nnodes:
        raise ScalelabError(
            f"the run wants {nnodes} nodes but its Slurm job has SLURM_NNODES={env['SLURM_NNODES']}"
        )
    endpoint = f"{first_host(env['SLURM_JOB_NODELIST'])}:{rendezvous_port(env['SLURM_JOB_ID'])}"
    return torchrun_command(
        run_dir / "config.json", run_dir, nproc=nproc, nnodes=str(nnodes), rdzv_endpoint=endpoint
    )


def next_step(
    state: str, record_status: str | None, requeued: int, max_requeues: int, retried: int, retries: int
) -> tuple[str, str]:
    """What the driver does about a job: ("wait" | "record" | "requeue" | "retry" | "fail", reason).

    A job still running (or requeued by Slurm or by itself) is waited for. Once it has ended, a finished
    record is the outcome; without one, a job stopped from outside is requeued (`requeues` times at
    most) and one that crashed on its own is retried (`retries` times at most, as the local executor does).
    """
    if state not in TERMINAL_STATES:
        return "wait", ""
    if record_status in FINISHED_RECORDS:
        return "record", ""
    if state in REQUEUE_STATES:
        if requeued < max_requeues:
            return "requeue", f"Slurm job ended {state}; requeued ({requeued + 1}/{max_requeues})"
        return "fail", f"Slurm job ended {state} {requeued + 1} times; not requeued again"
    if retried < retries:
        return "retry", f"Slurm job ended {state} without a record; retrying ({retried + 1}/{retries})"
    return "fail", f"Slurm job ended {state} without a record"


def parse_squeue(text: str, job_ids: Sequence[str]) -> dict[str, str]:
    """Job id → state from `squeue -h --states=all -o %i|%T` output; ids it does not list are "GONE"."""
    states = {}
    for line in text.splitlines():
        jid, _, state = line.strip().partition("|")
        if jid and state:
            states[jid] = state.split()[0].rstrip("+")  # "CANCELLED by 0" in some versions
    return {j: states.get(j, "GONE") for j in job_ids}


# ------------------------------------------------------------------------------------ in the job
def stop_group(pgid: int, grace_seconds: float = 3.0) -> None:
    """SIGTERM a training's process group, SIGKILL it `grace_seconds` later. Never waits on the process:
    this runs in submitit's signal handler, which interrupted `Popen.wait` and so holds its lock."""
    for sig, pause in ((signal.SIGTERM, grace_seconds), (signal.SIGKILL, 0.0)):
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(pause)


try:  # the job body must be a submitit Checkpointable for its signal handler to requeue it
    from submitit.helpers import Checkpointable as _JobBase
except ImportError:  # without the `slurm` extra the class still exists (for tests and typing)
    _JobBase = object  # type: ignore[assignment,misc]


class SlurmRunTask(_JobBase):  # type: ignore[misc,valid-type]
    """What a run's job executes (pickled by submitit): train, or on preemption/time-out stop and requeue."""

    def __init__(
        self,
        run_dir: str,
        command: list[str] | None,
        threads: int | None,
        nproc: int = 1,
        nnodes: int = 1,
        timeout_seconds: float | None = None,
    ) -> None:
        self.run_dir, self.command, self.threads = run_dir, command, threads
        self.nproc, self.nnodes, self.timeout_seconds = nproc, nnodes, timeout_seconds
        self._proc: subprocess.Popen[bytes] | None = None

    def __call__(self) -> tuple[str, str | None]:
        run_dir = Path(self.run_dir)
        command = self.command or node_command(run_dir, self.nproc, self.nnodes, os.environ)
        return attempt_run(run_dir, run_env(self.threads), self.timeout_seconds, self._started, command)

    def _started(self, proc: subprocess.Popen[bytes]) -> None:
        self._proc = proc

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """Slurm is about to stop the job: stop the training now (its checkpoints are on disk) and have
        submitit requeue this same task, which resumes from them (`--resume`)."""
        from submitit.helpers import DelayedSubmission

        if self._proc is not None:
            log.warning("job signalled (preemption or time limit): stopping the training for a requeue")
            stop_group(self._proc.pid)
        return DelayedSubmission(self, *args, **kwargs)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_proc": None}


# ------------------------------------------------------------------------------------ the driver
def job_states(job_ids: Sequence[str]) -> dict[str, str]:
    """Current Slurm states of `job_ids` (one `squeue` call; "UNKNOWN" for all when it fails)."""
    if not job_ids:
        return {}
    cmd = ["squeue", "-h", "--states=all", "-j", ",".join(job_ids), "-o", "%i|%T"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        log.warning("squeue failed (%s); job states unknown for now", err)
        return dict.fromkeys(job_ids, "UNKNOWN")
    if out.returncode != 0:
        if "Invalid job id" in out.stderr:  # every id purged already (Slurm refuses the whole query)
            return dict.fromkeys(job_ids, "GONE")
        log.warning("squeue failed (%s); job states unknown for now", out.stderr.strip()[:200])
        return dict.fromkeys(job_ids, "UNKNOWN")
    return parse_squeue(out.stdout, job_ids)


@dataclass
class _Active:
    planned: PlannedRun
    run_dir: Path
    job_id: str
    started: float
    submissions: int = 1
    requeued: int = 0
    retried: int = 0


class SlurmExecutor:
    """Each run a Slurm job through submitit (module doc); the driver alone writes the registry."""

    @classmethod
    def from_options(cls, study: Any, o: ExecutorOptions) -> SlurmExecutor:
        """A Slurm job per run with the resources of the study's [study.slurm] section."""
        return cls(
            study.slurm, nproc_per_run=o.nproc_per_run, timeout_seconds=o.timeout_seconds, retries=o.retries
        )

    def __init__(
        self,
        slurm: SlurmSpec | None = None,
        nproc_per_run: int = 1,
        timeout_seconds: float | None = None,
        retries: int = 0,
        poll_seconds: float = 5.0,
    ) -> None:
        self.slurm = slurm or SlurmSpec()
        self.nproc_per_run = nproc_per_run
        self.timeout_seconds = timeout_seconds
        self.retries = retries
        self.poll_seconds = poll_seconds

    def task_for(self, planned: PlannedRun, run_dir: Path) -> SlurmRunTask:
        ranks = ranks_for(planned, self.nproc_per_run)
        nnodes = self.slurm.nodes if planned.spec.train.strategy != "none" else 1
        command = None if ranks > 1 or nnodes > 1 else train_command(run_dir, wsd_args(planned, run_dir))
        return SlurmRunTask(
            str(run_dir), command, planned.spec.train.threads, ranks, nnodes, self.timeout_seconds
        )

    def submit(self, planned: PlannedRun, run_dir: Path, registry: Registry) -> str:
        """Submit one run's job; its Slurm job id."""
        try:
            import submitit
        except ImportError as err:
            raise ScalelabError("the Slurm executor needs submitit: pip install 'scalelab[slurm]'") from err
        (run_dir / "record.json").unlink(missing_ok=True)  # an old record must not pass for this job's
        forecast = (registry.get(planned.run_id) or {}).get("forecast_seconds")
        ex = submitit.SlurmExecutor(folder=run_dir / "slurm", max_num_timeout=self.slurm.requeues)
        ex.update_parameters(**job_parameters(planned, self.slurm, self.nproc_per_run, forecast))
        job = ex.submit(self.task_for(planned, run_dir))
        registry.set_status(planned.run_id, "running", f"Slurm job {job.job_id}")
        log.info("run %s: Slurm job %s", planned.run_id, job.job_id)
        return str(job.job_id)

    def execute(
        self, todo: list[tuple[PlannedRun, Path]], registry: Registry, progress: ProgressFn | None = None
    ) -> list[RunOutcome]:
        deps = Dependencies(todo)
        active: dict[str, _Active] = {}
        outcomes: list[RunOutcome] = []

        def start(planned: PlannedRun, run_dir: Path) -> None:
            job_id = self.submit(planned, run_dir, registry)
            active[job_id] = _Active(planned, run_dir, job_id, time.perf_counter())

        def finish(a: _Active, status: str, error: str | None) -> None:
            outcome = record_outcome(
                registry,
                a.planned.run_id,
                a.run_dir,
                status,
                error,
                a.submissions,
                time.perf_counter() - a.started,
            )
            outcomes.append(outcome)
            if progress:
                progress(outcome)
            for waiting in deps.finished(a.planned.run_id):
                start(*waiting)

        for planned, run_dir in deps.ready:
            start(planned, run_dir)
        try:
            while active:
                time.sleep(self.poll_seconds)
                for job_id, state in job_states(list(active)).items():
                    a = active[job_id]
                    record = _read_json(a.run_dir / "record.json") or {}
                    action, reason = next_step(
                        state, record.get("status"), a.requeued, self.slurm.requeues, a.retried, self.retries
                    )
                    if action == "wait":
                        continue
                    del active[job_id]
                    if action == "record":
                        finish(a, record["status"], record.get("error"))
                    elif action in ("requeue", "retry"):
                        log.warning("run %s: %s", a.planned.run_id, reason)
                        registry.set_status(a.planned.run_id, "running", reason)
                        subprocess.run(["scancel", job_id], capture_output=True, check=False)  # never two
                        new_id = self.submit(a.planned, a.run_dir, registry)
                        a.requeued += action == "requeue"
                        a.retried += action == "retry"
                        a.submissions += 1
                        a.job_id = new_id
                        active[new_id] = a
                    else:
                        logs = sorted((a.run_dir / "slurm").glob(f"{job_id}_*_log.err"))
                        tail = _tail(logs[-1]) if logs else ""
                        finish(a, "crashed", reason + (f"; job log tail:\n{tail}" if tail else ""))
        except KeyboardInterrupt:
            if active:
                subprocess.run(["scancel", *active], capture_output=True, check=False)
            for a in active.values():
                record_outcome(
                    registry,
                    a.planned.run_id,
                    a.run_dir,
                    "interrupted",
                    "stopped (Ctrl-C); jobs cancelled",
                    0,
                    0.0,
                )
            raise
        return outcomes
