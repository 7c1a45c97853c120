"""Distributed training with real processes on gloo (CPU): torchrun launches `scalelab train` on 2 ranks.

What must hold (losses per step from metrics.jsonl):
  * DDP on 2 ranks ≡ 1 process accumulating to the same global batch (float tolerance: all-reduce sums
    in another order);
  * FSDP2 on 2 ranks ≡ DDP on 2 ranks (float tolerance);
  * a run saved by 2 ranks resumes at 1 (and at 4, slow) and continues the same global batch sequence;
  * kill -9 of one rank under --max-restarts 1: torchrun restarts the group, it resumes from the last
    committed checkpoint and ends bitwise equal to the uninterrupted run.
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

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


@pytest.mark.slow
def test_elastic_job_grows_from_one_to_two_ranks_and_keeps_the_data_order(work, store, ddp_run):
    """`--nnodes 1:2`: one agent starts alone (world 1); a second agent joins the c10d rendezvous on
    127.0.0.1, torchrun restarts the group at world 2, which resumes from the last committed checkpoint
    and continues the same global batch sequence (float tolerance: the world size changed)."""
    from scalelab.train.parallel.launch import free_port, torchrun_command

    spec = make_spec(store, debug={"sleep_seconds_per_step": 1.0})
    out = work / "elastic"
    argv = torchrun_command(
        write_config(work / "elastic.json", spec),
        out,
        nproc=1,
        nnodes="1:2",
        rdzv_endpoint=f"127.0.0.1:{free_port()}",
        rdzv_conf="last_call_timeout=1",
    )
    env = child_env(work)
    first = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and first.poll() is None:
        if metrics.exists() and metrics.read_text().count('"loss"') >= 2:
            break
        time.sleep(0.1)
    assert first.poll() is None, first.communicate()[0].decode()[-4000:]
    second = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out1, _ = first.communicate(timeout=300)
    out2, _ = second.communicate(timeout=300)
    assert first.returncode == 0 and second.returncode == 0, (out1.decode()[-4000:], out2.decode()[-4000:])
    rec = json.loads((out / "record.json").read_text())
    assert rec["status"] == "done" and rec["world_size"] == 2 and rec["steps"] == 12
    rows = step_rows(out)
    assert rows[0]["world_size"] == 1 and rows[-1]["world_size"] == 2
    assert _close(losses(out), losses(ddp_run)), (losses(out), losses(ddp_run))
