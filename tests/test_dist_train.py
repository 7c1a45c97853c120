"""Distributed training with real processes on gloo (CPU): torchrun launches `scalelab train` on 2 ranks.

What must hold (losses per step from metrics.jsonl):
  * DDP on 2 ranks ≡ 1 process accumulating to the same global batch (float tolerance: all-reduce sums
    in another order);
  * FSDP2 on 2 ranks ≡ DDP on 2 ranks (float tolerance);
  * a run saved by 2 ranks resumes at 1 (and at 4, slow) and continues the same global batch sequence;
  * kill -9 of one rank under --max-restarts 1: torchrun restarts the group, it resumes from the last
    committed checkpoint and ends bitwise equal to the uninterrupted run;
  * elastic jobs (--nnodes 1:2, one process per agent, slow): a second agent joining grows the group from
    1 to 2 ranks; an agent leaving (kill -9 of it and its worker) shrinks it from 2 to 1. Either way the
    run resumes from the last committed checkpoint and continues the same global batch sequence.
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import psutil
import pytest

from scalelab.train.run import run_training
from test_dist_common import build_store, child_env, losses, make_spec, step_rows, torchrun, write_config

REL = 2e-5  # relative tolerance between world sizes / strategies (fp32, 12 steps)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("dist")


@pytest.fixture(scope="module")
def store(work) -> Path:
    return build_store(work)


@pytest.fixture(scope="module")
def ddp_run(work, store) -> Path:
    """The uninterrupted 2-rank DDP run (shared by the tests below)."""
    spec = make_spec(store)
    out = work / "ddp2"
    proc = torchrun(work, write_config(work / "ddp.json", spec), out, 2)
    assert proc.returncode == 0
    return out


def _close(a: list[float], b: list[float], rel: float = REL) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= rel * max(1.0, abs(y)) for x, y in zip(a, b, strict=True))


def test_ddp_two_ranks_matches_one_process_with_accumulation(work, store, ddp_run, monkeypatch):
    monkeypatch.setenv("SCALELAB_CACHE_DIR", str(work / "cache"))
    # one process, strategy none, the same global batch 8 in 4 micro-batches of 2
    one = run_training(make_spec(store, strategy="none"), work / "one")
    assert one["status"] == "done", one["error"]
    ddp = losses(ddp_run)
    assert len(ddp) == 12 and _close(ddp, losses(work / "one")), (ddp, losses(work / "one"))

    rec = json.loads((ddp_run / "record.json").read_text())
    assert rec["status"] == "done" and rec["world_size"] == 2 and rec["steps"] == 12
    row = step_rows(ddp_run)[0]
    for key in ("grad_norm_min", "grad_norm_max", "grad_norm_std", "step_seconds_min", "step_seconds_max"):
        assert key in row, key
    assert row["world_size"] == 2 and row["grad_norm_min"] <= row["grad_norm_max"]
    assert row["step_seconds"] == row["step_seconds_max"] and row["mfu"] > 0
    # only rank 0 wrote: one line per step/eval, no duplicates
    assert [r["step"] for r in step_rows(ddp_run)] == list(range(1, 13))


def test_auto_micro_batch_and_batch_schedule_under_ddp_match_one_process(work, store, monkeypatch):
    """Config-driven controls reach the distributed engine: "auto" resolves per rank (rank 0's choice for
    all), the batch doubles at 768 tokens on both ranks, and the losses match one process doing the same."""
    monkeypatch.setenv("SCALELAB_CACHE_DIR", str(work / "cache"))
    controls = {"micro_batch_size": "auto", "batch_schedule": [[0, 8], [768, 16]]}
    spec = make_spec(store, **controls)
    out = work / "ddp-controls"
    assert torchrun(work, write_config(work / "controls.json", spec), out, 2).returncode == 0
    one = run_training(make_spec(store, strategy="none", **controls), work / "one-controls")
    ddp = json.loads((out / "record.json").read_text())
    assert ddp["status"] == one["status"] == "done"
    assert ddp["micro_batch_size"] == 4 and one["micro_batch_size"] == 8  # whole per-rank batch fits
    assert (
        [(c["step"], c["to"]) for c in ddp["batch_changes"]]
        == [(6, 16)]
        == [(c["step"], c["to"]) for c in one["batch_changes"]]
    )
    assert [r["global_batch_size"] for r in step_rows(out)] == [8] * 5 + [16] * 4
    assert _close(losses(out), losses(work / "one-controls"))


def test_per_rank_grad_norms_are_unscaled_under_fp16(work, store):
    """Per-rank norms come from hooks that see fp16-scaled gradients (×2^16 at the start); the spread
    must be in the units of the global (unscaled) norm."""
    out = work / "ddp-fp16"
    spec = make_spec(store, precision="fp16", tokens=16 * 8 * 4)
    assert torchrun(work, write_config(work / "fp16.json", spec), out, 2).returncode == 0
    for row in step_rows(out):
        assert 0.3 < row["grad_norm_max"] / row["grad_norm"] < 3.0, row


def test_fsdp_two_ranks_matches_ddp_and_reshards_to_one(work, store, ddp_run, monkeypatch):
    spec = make_spec(store, strategy="fsdp")
    out = work / "fsdp2"
    proc = torchrun(work, write_config(work / "fsdp.json", spec), out, 2)
    assert proc.returncode == 0
    assert _close(losses(out), losses(ddp_run)), (losses(out), losses(ddp_run))
    for key in ("grad_norm_min", "grad_norm_max"):  # per-rank local norms, from the reduce-scatter input
        assert _close([r[key] for r in step_rows(out)], [r[key] for r in step_rows(ddp_run)]), key
    assert json.loads((out / "record.json").read_text())["eval_loss"] == pytest.approx(
        json.loads((ddp_run / "record.json").read_text())["eval_loss"], rel=REL
    )
    # parameters and Adam moments sharded over 2 ranks load into 1 (DCP reshards by name)
    monkeypatch.setenv("SCALELAB_CACHE_DIR", str(work / "cache"))
    resumed = work / "fsdp-resume1"
    _truncated_copy(out, resumed, keep_step=9)
    rec = run_training(spec, resumed)
    assert rec["status"] == "done" and rec["world_size"] == 1, rec["error"]
    assert _close(losses(resumed)[9:], losses(out)[9:]), (losses(resumed), losses(out))


def _truncated_copy(src: Path, dst: Path, keep_step: int) -> None:
    """`src` as it was after step `keep_step`'s checkpoint: later checkpoints and the record removed."""
    shutil.copytree(src, dst)
    for p in (dst / "checkpoint").iterdir():
        if p.name.startswith("step-") and int(p.name[5:]) > keep_step:
            shutil.rmtree(p)
    (dst / "record.json").unlink()


def test_saved_at_two_ranks_resumes_at_one(work, ddp_run, monkeypatch):
    monkeypatch.setenv("SCALELAB_CACHE_DIR", str(work / "cache"))
    out = work / "resume1"
    _truncated_copy(ddp_run, out, keep_step=6)
    spec = make_spec(Path(json.loads((ddp_run / "config.json").read_text())["data"]["store"]))
    rec = run_training(spec, out)  # no torchrun: a world of one with the same (sharded) format
    assert rec["status"] == "done", rec["error"]
    assert rec["world_size"] == 1 and rec["steps"] == 12
    got, ref = losses(out), losses(ddp_run)
    assert got[:6] == ref[:6]  # steps before the checkpoint are kept as written
    assert _close(got[6:], ref[6:]), (got, ref)


@pytest.mark.slow
def test_saved_at_two_ranks_resumes_at_four(work, ddp_run):
    out = work / "resume4"
    _truncated_copy(ddp_run, out, keep_step=3)
    proc = torchrun(work, ddp_run / "config.json", out, 4, timeout=400)
    assert proc.returncode == 0
    got, ref = losses(out), losses(ddp_run)
    assert _close(got[3:], ref[3:]), (got, ref)


def _worker_pids(launcher: psutil.Process) -> list[psutil.Process]:
    out = []
    for child in launcher.children(recursive=True):
        try:
            if "scalelab" in " ".join(child.cmdline()) and "LOCAL_RANK" in child.environ():
                out.append(child)
        except psutil.Error:
            continue
    return out


def test_kill_minus_nine_restarts_and_matches_uninterrupted_run(work, store, ddp_run):
    """SIGKILL of rank 1 at a random step; torchrun --max-restarts 1 restarts and the run resumes."""
    from scalelab.train.parallel.launch import torchrun_command

    # same numerics as ddp_run; slower steps so that the kill lands mid-run
    spec = make_spec(store, debug={"sleep_seconds_per_step": 0.25})
    out = work / "killed"
    argv = torchrun_command(write_config(work / "kill.json", spec), out, nproc=2, max_restarts=1)
    kill_after = random.Random().randint(2, 9)
    proc = subprocess.Popen(argv, env=child_env(work), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    launcher = psutil.Process(proc.pid)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 120
    killed = None
    while time.monotonic() < deadline and killed is None and proc.poll() is None:
        done = metrics.read_text().count('"loss"') if metrics.exists() else 0
        if done >= kill_after:
            workers = [w for w in _worker_pids(launcher) if w.environ().get("LOCAL_RANK") == "1"]
            if workers:
                workers[0].send_signal(signal.SIGKILL)
                killed = done
        time.sleep(0.05)
    output, _ = proc.communicate(timeout=240)
    assert killed is not None, f"never killed a rank (wanted after step {kill_after})"
    assert proc.returncode == 0, output.decode()[-6000:]
    rec = json.loads((out / "record.json").read_text())
    ref = json.loads((ddp_run / "record.json").read_text())
    assert rec["status"] == "done" and rec["steps"] == 12
    assert rec["final_train_loss"] == ref["final_train_loss"]  # bitwise: same world size, exact resume
    assert losses(out) == losses(ddp_run), f"killed after step {killed}"


# ------------------------------------------------------------------- elastic jobs (--nnodes 1:2)
@pytest.fixture()
def elastic_agent(work) -> Iterator[Callable[..., subprocess.Popen]]:
    """Starts one torchrun agent (one worker) of the elastic job `--nnodes 1:2`:
    ``elastic_agent(config, out, endpoint, rdzv_conf, max_restarts=0)``, output piped (see `_finish`).
    Agents still running when the test ends (it failed) are killed with their workers."""
    from scalelab.train.parallel.launch import torchrun_command

    started: list[subprocess.Popen] = []

    def start(
        config: Path, out: Path, endpoint: str, rdzv_conf: str, max_restarts: int = 0
    ) -> subprocess.Popen:
        argv = torchrun_command(
            config,
            out,
            nproc=1,
            nnodes="1:2",
            max_restarts=max_restarts,
            rdzv_endpoint=endpoint,
            rdzv_conf=rdzv_conf,
        )
        env = child_env(work)
        started.append(subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
        return started[-1]

    yield start
    for agent in started:
        if agent.poll() is None:
            _kill_agent(agent)
            agent.communicate(timeout=60)


def _logged_rows(out: Path) -> list[dict[str, Any]]:
    """The step rows metrics.jsonl holds so far (a line being written is skipped)."""
    path = out / "metrics.jsonl"
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "loss" in row:
            rows.append(row)
    return rows


def _wait_for_rows(
    out: Path,
    agents: Sequence[subprocess.Popen],
    enough: Callable[[list[dict[str, Any]]], bool],
    timeout: float = 180,
) -> list[dict[str, Any]]:
    """Poll metrics.jsonl until `enough(rows)`; the rows then. Fails if an agent exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = _logged_rows(out)
        if enough(rows):
            return rows
        ended = [a for a in agents if a.poll() is not None]
        assert not ended, _finish(ended)
        time.sleep(0.1)
    raise AssertionError(f"metrics.jsonl never reached the wanted rows: {_logged_rows(out)}")


def _finish(agents: Sequence[subprocess.Popen], timeout: float = 300) -> list[str]:
    """Wait for the agents to exit; their output tails."""
    return [a.communicate(timeout=timeout)[0].decode()[-4000:] for a in agents]


def _same_run_as(out: Path, reference: Path, world_size: int) -> list[dict[str, Any]]:
    """Check that the run in `out` finished at `world_size` with the losses of `reference`, step for step
    (float tolerance: a part ran at another world size); its step rows."""
    rec = json.loads((out / "record.json").read_text())
    assert rec["status"] == "done" and rec["world_size"] == world_size and rec["steps"] == 12, rec
    assert _close(losses(out), losses(reference)), (losses(out), losses(reference))
    rows = step_rows(out)
    assert [r["step"] for r in rows] == list(range(1, 13))
    return rows


@pytest.mark.slow
def test_elastic_job_grows_from_one_to_two_ranks_and_keeps_the_data_order(
    work, store, ddp_run, elastic_agent
):
    """`--nnodes 1:2`: one agent starts alone (world 1); a second agent joins the c10d rendezvous on
    127.0.0.1, torchrun restarts the group at world 2, which resumes from the last committed checkpoint
    and continues the same global batch sequence (float tolerance: the world size changed)."""
    from scalelab.train.parallel.launch import free_port

    spec = make_spec(store, debug={"sleep_seconds_per_step": 1.0})
    config, out = write_config(work / "elastic.json", spec), work / "elastic"
    endpoint, conf = f"127.0.0.1:{free_port()}", "last_call_timeout=1"
    # the first agent hosts the rendezvous store (is_host=1), the joiner is only its client: left to
    # guess, the joiner also tried to host on the endpoint, and once lost its store connection
    first = elastic_agent(config, out, endpoint, conf + ",is_host=1")
    _wait_for_rows(out, [first], lambda rows: len(rows) >= 2)
    second = elastic_agent(config, out, endpoint, conf + ",is_host=0")
    logs = _finish([first, second])
    assert first.returncode == 0 and second.returncode == 0, logs
    rows = _same_run_as(out, ddp_run, world_size=2)
    assert rows[0]["world_size"] == 1 and rows[-1]["world_size"] == 2


def _kill_agent(agent: subprocess.Popen) -> None:
    """SIGKILL a torchrun agent, then its workers: they run in their own session (torchrun starts them
    with start_new_session=True) and would outlive it; the agent goes first so it cannot restart them."""
    workers = _worker_pids(psutil.Process(agent.pid))
    agent.send_signal(signal.SIGKILL)
    for worker in workers:
        worker.send_signal(signal.SIGKILL)


@pytest.mark.slow
def test_elastic_job_shrinks_from_two_to_one_rank_when_an_agent_leaves(work, store, ddp_run, elastic_agent):
    """`--nnodes 1:2 --max-restarts 1`, two agents: the run starts at world 2; after step 4 one agent and
    its worker are killed (the node is gone for good). The surviving worker's collective fails, its agent
    restarts it; the dynamic rendezvous drops the dead agent once its keep-alive expires, closes the next
    round with the one agent left (min 1), and the world-1 group resumes from the last committed sharded
    checkpoint with the same global batch sequence (float tolerance: the world size changed).

    The agent that stays hosts the rendezvous store (is_host=1), as a stable head node would: the c10d
    backend keeps it in the process of one agent, so losing that one would end the job.
    keep_alive_interval=1 × keep_alive_max_attempt=5: the dead agent is dropped after 5 s (default 15 s).
    """
    from scalelab.train.parallel.launch import free_port

    spec = make_spec(store, debug={"sleep_seconds_per_step": 0.5})
    config, out = write_config(work / "shrink.json", spec), work / "shrink"
    endpoint = f"127.0.0.1:{free_port()}"
    conf = "last_call_timeout=5,keep_alive_interval=1,keep_alive_max_attempt=5"
    stays = elastic_agent(config, out, endpoint, conf + ",is_host=1", max_restarts=1)
    leaves = elastic_agent(config, out, endpoint, conf + ",is_host=0", max_restarts=1)
    _wait_for_rows(out, [stays, leaves], lambda rows: len(rows) >= 4)
    _kill_agent(leaves)
    # rows logged at the kill; one more may follow (a step whose all-gather had finished), but no
    # checkpoint after it can commit without the killed rank
    before = _logged_rows(out)
    logs = _finish([stays, leaves])
    assert stays.returncode == 0 and leaves.returncode == -signal.SIGKILL, logs
    assert all(r["world_size"] == 2 for r in before), before  # it started with 2 workers
    rows = _same_run_as(out, ddp_run, world_size=1)
    resumed = sum(r["world_size"] == 2 for r in rows)  # world-2 rows up to the checkpoint resumed from
    assert resumed % 3 == 0 and 3 <= resumed <= len(before) < 12, (resumed, len(before))
    assert [r["world_size"] for r in rows] == [2] * resumed + [1] * (12 - resumed)
    assert losses(out)[:resumed] == losses(ddp_run)[:resumed]  # the world-2 part: bitwise
