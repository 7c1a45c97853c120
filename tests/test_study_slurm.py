"""`--executor slurm`: job resources and sbatch script, torchrun from Slurm's environment, requeue decisions
(everywhere), and a real single-node Slurm (slurmctld + slurmd started here) where the daemons are installed."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from scalelab.errors import ScalelabError
from scalelab.registry import Registry
from scalelab.spec import SlurmSpec, load_study
from scalelab.study.executors import LocalExecutor, run_study
from scalelab.study.plan import expand_runs
from scalelab.study.slurm import (
    SlurmExecutor,
    SlurmRunTask,
    first_host,
    job_parameters,
    next_step,
    node_command,
    parse_squeue,
    rendezvous_port,
    time_limit_minutes,
)
from tiny_study import tiny_study

STUDY = tiny_study(
    "slurmy",
    """[study.train]
tokens = 2048
global_batch_size = 4
lr = 1e-2
eval_interval_steps = 16
eval_tokens = 256
checkpoint_interval_steps = 8
threads = 1
{extra}
[study.design]
kind = "grid"
[study.design.axes]
{axes}
""",
)


def _study(tmp_path: Path, corpus: Path | str = "/nonexistent", axes: str = "", extra: str = ""):
    spec = tmp_path / "study.toml"
    spec.write_text(STUDY.format(corpus=corpus, axes=axes or '"model.width" = [8, 16]', extra=extra))
    return load_study(spec)


# ------------------------------------------------------------------------------- everywhere
def test_job_parameters_from_the_spec_and_the_run(tmp_path: Path) -> None:
    study = _study(tmp_path, axes='"train.strategy" = ["none", "ddp"]', extra='device = "cuda"')
    ddp, single = sorted(expand_runs(study), key=lambda r: r.spec.train.strategy)
    slurm = SlurmSpec(partition="gpu", account="lab", nodes=2, mem_gb=32, setup=["module load cuda"])
    p = job_parameters(single, slurm, nproc_per_run=4, forecast_seconds=300)
    assert (p["nodes"], p["ntasks_per_node"], p["cpus_per_task"], p["gpus_per_node"]) == (1, 1, 1, 1)
    assert p["time"] == 20 and p["partition"] == "gpu" and p["account"] == "lab" and p["mem"] == "32GB"
    assert p["additional_parameters"] == {"requeue": True} and p["setup"] == ["module load cuda"]
    p = job_parameters(ddp, slurm, nproc_per_run=4)
    assert (p["nodes"], p["ntasks_per_node"], p["cpus_per_task"], p["gpus_per_node"]) == (2, 1, 4, 4)
    assert p["time"] == 60 and p["job_name"] == f"scalelab-{ddp.run_id}"
    cpu = _study(tmp_path, axes='"train.strategy" = ["ddp"]')
    p = job_parameters(expand_runs(cpu)[0], SlurmSpec(sbatch={"constraint": "avx512"}), nproc_per_run=2)
    assert "gpus_per_node" not in p and p["cpus_per_task"] == 2
    assert p["additional_parameters"] == {"requeue": True, "constraint": "avx512"}
    assert time_limit_minutes(SlurmSpec(time_minutes=7), 1e6) == 7
    assert time_limit_minutes(SlurmSpec(), 61) == 13  # 2 × 61 s → 3 minutes, + 10


def test_the_sbatch_script_submitit_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    submitit = pytest.importorskip("submitit")
    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", classmethod(lambda cls: 2))  # no srun needed
    study = _study(tmp_path, axes='"train.strategy" = ["ddp"]', extra='device = "cuda"')
    slurm = SlurmSpec(partition="gpu", nodes=2, mem_gb=8, setup=["module load cuda"], signal_delay_seconds=90)
    ex = submitit.SlurmExecutor(folder=tmp_path / "slurm")
    ex.update_parameters(
        **job_parameters(expand_runs(study)[0], slurm, nproc_per_run=4, forecast_seconds=600)
    )
    text = ex._make_submission_file_text("python -m submitit.core._submit X", "uid")
    for line in (
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --cpus-per-task=4",
        "#SBATCH --mem=8GB",
        "#SBATCH --partition=gpu",
        "#SBATCH --requeue",
        "#SBATCH --signal=USR2@90",
        "#SBATCH --time=30",
        "module load cuda",
    ):
        assert line in text, (line, text)
    assert "srun --unbuffered" in text


def test_torchrun_on_each_node_meets_at_the_first_host() -> None:
    assert first_host("gpu[003-004,9],cpu1") == "gpu003"
    assert first_host("a1,b[1-2]") == "a1" and first_host("node7") == "node7"
    assert first_host("rack[2]") == "rack2"
    assert rendezvous_port("1234") == rendezvous_port(1234) == 20000 + 1234
    env = {"SLURM_JOB_ID": "1234", "SLURM_JOB_NODELIST": "gpu[003-004]", "SLURM_NNODES": "2"}
    cmd = node_command(Path("/runs/x"), 4, 2, env)
    assert cmd[cmd.index("--nnodes") + 1] == "2" and cmd[cmd.index("--nproc-per-node") + 1] == "4"
    assert cmd[cmd.index("--rdzv-endpoint") + 1] == "gpu003:21234"
    assert cmd[-4:] == ["/runs/x/config.json", "--out", "/runs/x", "--resume"]
    with pytest.raises(ScalelabError, match="SLURM_NNODES=3"):
        node_command(Path("/runs/x"), 4, 2, {**env, "SLURM_NNODES": "3"})
    with pytest.raises(ScalelabError, match="inside a Slurm job"):
        node_command(Path("/runs/x"), 4, 2, {})
    one = node_command(Path("/runs/x"), 2, 1, {})
    assert one[one.index("--rdzv-endpoint") + 1].startswith("127.0.0.1:")


def test_requeue_decisions() -> None:
    assert next_step("RUNNING", None, 0, 3, 0, 0)[0] == "wait"
    assert next_step("REQUEUED", "done", 0, 3, 0, 0)[0] == "wait"  # Slurm will run it again
    assert next_step("COMPLETED", "done", 0, 3, 0, 0)[0] == "record"
    assert next_step("GONE", "diverged", 0, 3, 0, 0)[0] == "record"
    assert next_step("CANCELLED", "failed", 0, 3, 0, 0)[0] == "record"  # it had finished: keep that
    action, why = next_step("CANCELLED", None, 1, 3, 0, 0)
    assert action == "requeue" and "(2/3)" in why
    assert next_step("PREEMPTED", None, 3, 3, 0, 0)[0] == "fail"
    assert next_step("NODE_FAIL", None, 0, 3, 0, 0)[0] == "requeue"
    assert next_step("FAILED", None, 0, 3, 0, 1)[0] == "retry"
    action, why = next_step("OUT_OF_MEMORY", None, 0, 3, 1, 1)
    assert action == "fail" and "OUT_OF_MEMORY" in why
    assert parse_squeue("12|RUNNING\n13|CANCELLED by 0\n", ["12", "13", "14"]) == {
        "12": "RUNNING",
        "13": "CANCELLED",
        "14": "GONE",
    }


def test_the_job_body_stops_its_training_when_signalled_and_requeues_itself(tmp_path: Path) -> None:
    """As in a job: the signal arrives while the main thread waits for the training process, and the
    handler (here the checkpoint call submitit's USR2 handler makes) must not wait on that process."""
    pytest.importorskip("submitit")
    from submitit.helpers import DelayedSubmission

    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    task = SlurmRunTask(str(tmp_path), sleeper, threads=1)
    requeued: list[DelayedSubmission] = []

    def send_when_started() -> None:
        deadline = time.monotonic() + 30
        while task._proc is None and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGUSR2)

    before = signal.signal(signal.SIGUSR2, lambda signum, frame: requeued.append(task.checkpoint()))
    try:
        threading.Thread(target=send_when_started, daemon=True).start()
        t0 = time.monotonic()
        status, error = task()
    finally:
        signal.signal(signal.SIGUSR2, before)
    assert time.monotonic() - t0 < 30 and status == "crashed" and "signal" in (error or "")
    assert len(requeued) == 1 and requeued[0].function is task
    copy = pickle.loads(pickle.dumps(task))  # what submitit writes for the requeued job
    assert copy._proc is None and copy.command == sleeper


# -------------------------------------------------------------------- a real single-node Slurm
DAEMONS = ("slurmctld", "slurmd", "sbatch", "squeue", "scancel", "scontrol", "sinfo", "srun")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin:/sbin")


def _idle_nodes() -> list[str]:
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True, text=True, check=False)
    return [line.split()[0] for line in out.stdout.splitlines() if line.split()[1:] == ["idle"]]


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory):
    """slurmctld and two slurmd on this machine, SLURM_CONF set: auth/none, nodes `HOST` and `HOST-b`
    (each with this machine's CPUs, its own slurmd port, spool, pid and log: `slurmd -N NAME`), both at
    127.0.0.1. A job on both is a real 2-node job (two slurmd, one step daemon each) whose processes share
    this host. The tests that need one node run wherever Slurm puts them; the 2-node test skips when the
    second slurmd does not come up. KillWait=2: a cancelled job is killed 2 s after its SIGTERM (default
    30 s, longer than these runs)."""
    missing = [d for d in DAEMONS if _which(d) is None]
    if missing:
        pytest.skip(f"Slurm is not installed here ({', '.join(missing)} not found; Debian: slurmctld slurmd)")
    if os.geteuid() != 0:
        pytest.skip("starting slurmd needs root here")
    pytest.importorskip("submitit")
    root = tmp_path_factory.mktemp("slurm")
    host = socket.gethostname().split(".")[0]
    nodes = [host, f"{host}-b"]  # the first sorts first: the rendezvous host, a name that resolves
    (root / "state").mkdir()
    for node in nodes:
        (root / "spool" / node).mkdir(parents=True)
    node_lines = "\n".join(
        f"NodeName={n} NodeHostname={n} NodeAddr=127.0.0.1 Port={_free_port()} CPUs={os.cpu_count() or 1} "
        "State=UNKNOWN"
        for n in nodes
    )
    conf = root / "slurm.conf"
    conf.write_text(
        f"""ClusterName=scalelabtest
SlurmctldHost={host}(127.0.0.1)
AuthType=auth/none
CredType=cred/none
SlurmUser=root
SlurmdUser=root
SlurmctldPort={_free_port()}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd-%n.log
ProctrackType=proctrack/pgid
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MinJobAge=600
KillWait=2
{node_lines}
PartitionName=debug Nodes={",".join(nodes)} Default=YES MaxTime=INFINITE State=UP
"""
    )
    before = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(conf)
    try:
        subprocess.run([_which("slurmctld"), "-c", "-f", str(conf)], check=True, timeout=60)
        for node in nodes:  # a second slurmd failing to start is the 2-node test's skip, not an error here
            subprocess.run([_which("slurmd"), "-f", str(conf), "-N", node], check=node == host, timeout=60)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(_idle_nodes()) < len(nodes):
            time.sleep(0.5)
        if host not in _idle_nodes():
            pytest.skip(f"Slurm did not come up: {(root / 'slurmctld.log').read_text()[-2000:]}")
        if len(_idle_nodes()) < len(nodes):  # one node will do for the others: keep jobs off the dead one
            subprocess.run(["scontrol", "update", f"NodeName={nodes[1]}", "State=DOWN", "Reason=no slurmd"])
        yield root
    finally:
        jobs = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, check=False)
        if jobs.stdout.split():  # a failed test's jobs: ended first, or their steps outlive the daemons
            subprocess.run(["scancel", *jobs.stdout.split()], capture_output=True, check=False)
            time.sleep(5)
        subprocess.run(["scontrol", "shutdown"], capture_output=True, check=False, timeout=60)
        for name in (*(f"slurmd-{n}.pid" for n in nodes), "slurmctld.pid"):  # whichever did not stop
            try:
                pid = int((root / name).read_text())
                os.kill(pid, 15)
            except (OSError, ValueError):
                pass
        if before is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = before


COMPARED = ("status", "steps", "tokens", "final_train_loss", "eval_loss", "n_params", "flops")


@pytest.mark.slow
def test_a_two_run_study_on_slurm_equals_the_local_executor(
    slurm_cluster: Path, tmp_path: Path, tiny_corpus: Path
) -> None:
    """One single-process run and one DDP run (torchrun with 2 ranks inside its job, srun-started)."""
    study = _study(tmp_path, tiny_corpus, axes='"train.strategy" = ["none", "ddp"]')
    ex = SlurmExecutor(study.slurm, nproc_per_run=2, poll_seconds=1)
    slurm = run_study(study, tmp_path / "slurm", executor=ex)
    local = run_study(study, tmp_path / "local", executor=LocalExecutor(parallel=2, nproc_per_run=2))
    assert sorted(o.status for o in slurm.outcomes) == ["done", "done"] and local.count("done") == 2
    worlds = set()
    for o in slurm.outcomes:
        ours = json.loads((tmp_path / "slurm" / "runs" / o.run_id / "record.json").read_text())
        theirs = json.loads((tmp_path / "local" / "runs" / o.run_id / "record.json").read_text())
        assert {k: ours[k] for k in COMPARED} == {k: theirs[k] for k in COMPARED}
        assert ours.get("world_size", 1) == theirs.get("world_size", 1)
        worlds.add(ours.get("world_size", 1))
        assert list((tmp_path / "slurm" / "runs" / o.run_id / "slurm").glob("*_log.out"))  # ran as a job
    assert worlds == {1, 2}
    with Registry(tmp_path / "slurm" / "registry.sqlite") as reg:
        assert any("Slurm job" in (e["message"] or "") for e in reg.events())


@pytest.mark.slow
def test_a_ddp_run_across_two_slurm_nodes_equals_two_ranks_on_one(
    slurm_cluster: Path, tmp_path: Path, tiny_corpus: Path
) -> None:
    """[study.slurm] nodes = 2, one rank per node: the job's srun starts one submitit task per node, each
    runs torchrun --nnodes 2 with the rendezvous at the job's first node (`node_command`, from Slurm's
    environment), and the two agents form one 2-rank DDP group. Its record equals a 2-rank torchrun on
    one node (LocalExecutor). Both slurmd run on this host, so the group's traffic goes over loopback, but
    everything above the network (Slurm's node allocation and step launch, the environment torchrun's
    rendezvous is built from, c10d rendezvous between two agents) is the multi-node path."""
    states = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True, text=True).stdout
    if len(_idle_nodes()) < 2:
        pytest.skip(f"the second slurmd did not come up (slurmd -N; node states: {states.strip()!r})")
    study = _study(tmp_path, tiny_corpus, axes='"train.strategy" = ["ddp"]', extra="[study.slurm]\nnodes = 2")
    one_per_node = SlurmExecutor(study.slurm, nproc_per_run=1, poll_seconds=1)  # world 2 only as 2 × 1
    slurm = run_study(study, tmp_path / "slurm", executor=one_per_node)
    local = run_study(study, tmp_path / "local", executor=LocalExecutor(nproc_per_run=2))
    assert [o.status for o in slurm.outcomes] == ["done"] and local.count("done") == 1
    run_id = slurm.outcomes[0].run_id
    ours = json.loads((tmp_path / "slurm" / "runs" / run_id / "record.json").read_text())
    theirs = json.loads((tmp_path / "local" / "runs" / run_id / "record.json").read_text())
    assert ours["world_size"] == theirs["world_size"] == 2
    assert {k: ours[k] for k in COMPARED} == {k: theirs[k] for k in COMPARED}
    logs = sorted((tmp_path / "slurm" / "runs" / run_id / "slurm").glob("*_log.out"))
    assert len(logs) == 2, logs  # one task per node (submitit's %j_%t logs)
    text = "\n".join(p.read_text() for p in logs)
    assert "node=0(2)" in text and "node=1(2)" in text, text[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize(
    "stop",
    [
        pytest.param(["scancel"], id="cancelled-driver-resubmits"),
        pytest.param(["scancel", "--signal=USR2"], id="preempt-signal-job-requeues-itself"),
    ],
)
def test_a_stopped_job_is_requeued_and_resumes_from_its_checkpoint(
    slurm_cluster: Path, tmp_path: Path, tiny_corpus: Path, stop: list[str]
) -> None:
    """`scancel`: the job ends CANCELLED and the driver submits the run again; USR2 (what Slurm sends
    before a time limit or a preemption): submitit's handler in the job stops the training and
    `scontrol requeue`s the same job. Either way the run resumes from its checkpoint and ends as an
    uninterrupted run does."""
    spec = tmp_path / "study.toml"
    text = STUDY.format(
        corpus=tiny_corpus, axes='"model.width" = [8]', extra="[study.debug]\nsleep_seconds_per_step = 0.4"
    )
    spec.write_text(text.replace("checkpoint_interval_steps = 8", "checkpoint_interval_steps = 4"))
    study = load_study(spec)
    out = tmp_path / "slurm"
    outcomes: list = []
    driver = threading.Thread(
        target=lambda: outcomes.extend(
            run_study(study, out, executor=SlurmExecutor(study.slurm, poll_seconds=1)).outcomes
        )
    )
    driver.start()
    run_dir = None
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # until the job has written a checkpoint
        run_dir = next(iter((out / "runs").glob("*")), None) if (out / "runs").exists() else None
        if run_dir is not None and any((run_dir / "checkpoint").glob("*")):
            break
        time.sleep(0.5)
    assert run_dir is not None, "the run never checkpointed"
    jobs = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout.split()
    assert len(jobs) == 1
    subprocess.run([*stop, jobs[0]], check=True)
    driver.join(600)
    assert not driver.is_alive()
    by_driver = stop == ["scancel"]
    assert [o.status for o in outcomes] == ["done"] and outcomes[0].attempts == (2 if by_driver else 1)
    with Registry(out / "registry.sqlite") as reg:
        messages = [e["message"] or "" for e in reg.events()]
    assert any("ended CANCELLED; requeued (1/3)" in m for m in messages) == by_driver, messages
    log_text = (run_dir / "stderr.log").read_text()
    attempts = log_text.split("preparing the token store")
    assert len(attempts) == 3, log_text  # two starts of the training: the job and its requeue
    first_step = int(re.search(r" step (\d+)/32", attempts[2]).group(1))
    assert first_step > 1, attempts[2]  # the requeued job went on from its checkpoint, not from step 1
    local = run_study(study, tmp_path / "local", executor=LocalExecutor())  # uninterrupted
    ours = json.loads((run_dir / "record.json").read_text())
    theirs = json.loads((tmp_path / "local" / "runs" / run_dir.name / "record.json").read_text())
    assert local.outcomes[0].status == "done"
    assert {k: ours[k] for k in COMPARED} == {k: theirs[k] for k in COMPARED}
