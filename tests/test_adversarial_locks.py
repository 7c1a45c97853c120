"""Two processes on one target, with real processes: `data ingest` into one --out, `study run` on one study
directory. One proceeds, the other refuses with "already in use by PID …" (exit 2, no traceback); the
result equals a single run's, and ingest never deletes a file it did not create.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from scalelab.errors import LockedError
from scalelab.io import file_lock
from scalelab.registry import Registry
from tiny_study import tiny_study

FOREIGN = {"notes.tmp": b"mine", "other.bin": b"also mine", "train-notes.txt": b"keep", ".hidden.tmp": b"x"}


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "scalelab", *args]


def _corpus(root: Path, n_docs: int = 60) -> Path:
    corpus = root / "corpus"
    corpus.mkdir()
    src = sorted((Path(json.__file__).parent.parent / "email").glob("*.py"))
    for i in range(n_docs):
        (corpus / f"doc{i:03d}.txt").write_text(src[i % len(src)].read_text() + f"\n# copy {i}\n")
    return corpus


def _ingest_cmd(corpus: Path, out: Path) -> list[str]:
    return _cli("data", "ingest", str(corpus), "--out", str(out), "--shard-tokens", "20000")


def _plant_foreign(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, data in FOREIGN.items():
        (out / name).write_bytes(data)
    (out / "x.tmp").mkdir()  # a directory whose name looks like a temporary file
    (out / "x.tmp" / "inside").write_bytes(b"untouched")


def _foreign_intact(out: Path) -> bool:
    return (
        all((out / n).read_bytes() == d for n, d in FOREIGN.items())
        and (out / "x.tmp" / "inside").read_bytes() == b"untouched"
    )


def _store_files(out: Path) -> dict[str, bytes]:
    names = [
        "index.json",
        *(s["file"] for sp in ("train", "heldout") for s in _index(out)["splits"][sp]["shards"]),
    ]
    return {n: (out / n).read_bytes() for n in names}


def _index(out: Path) -> dict:
    return json.loads((out / "index.json").read_text())


def _no_traceback(proc: subprocess.CompletedProcess | subprocess.Popen, stderr: str) -> None:
    assert "Traceback" not in stderr, stderr


@pytest.fixture()
def reference(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    corpus = _corpus(tmp_path)
    ref = tmp_path / "ref"
    subprocess.run(_ingest_cmd(corpus, ref), check=True, capture_output=True, timeout=120)
    return corpus, _store_files(ref)


def test_lock_names_the_holder_and_is_released_on_exit(tmp_path: Path) -> None:
    lock = tmp_path / "d" / ".lock"
    with file_lock(lock):
        with pytest.raises(LockedError, match=f"already in use by PID {os.getpid()}"):
            with file_lock(lock, wait=False):
                pass
    with file_lock(lock, wait=False):  # released: taken at once
        pass
    # a holder killed with -9 releases it (the kernel drops flock locks of a dead process)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import time; from scalelab.io import file_lock\nwith file_lock({str(lock)!r}):\n"
            " print('held', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(LockedError, match=f"PID {holder.pid}"):
        with file_lock(lock, wait=False):
            pass
    holder.kill()
    holder.wait()
    with file_lock(lock, wait=False):
        pass


def test_ingest_into_a_locked_out_refuses_and_changes_nothing(tmp_path: Path, reference) -> None:
    corpus, _ = reference
    out = tmp_path / "out"
    _plant_foreign(out)
    with file_lock(out / ".ingest.lock"):
        before = sorted(p.name for p in out.iterdir())
        proc = subprocess.run(_ingest_cmd(corpus, out), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert f"already in use by PID {os.getpid()}" in proc.stderr
    _no_traceback(proc, proc.stderr)
    assert sorted(p.name for p in out.iterdir()) == before and _foreign_intact(out)


@pytest.mark.parametrize("trial", range(2))
def test_two_concurrent_ingests_one_wins_store_identical_foreign_files_kept(
    tmp_path: Path, reference, trial
) -> None:
    corpus, ref = reference
    out = tmp_path / "shared"
    _plant_foreign(out)
    procs = [subprocess.Popen(_ingest_cmd(corpus, out), stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=180), p.stderr.read()) for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes == [0, 2], results
    loser = next(err for rc, err in results if rc == 2)
    assert "already in use by PID" in loser or "already contains a complete token store" in loser, loser
    for _, err in results:
        _no_traceback(procs[0], err)
    assert _store_files(out) == ref
    assert _foreign_intact(out)


def test_ingest_refuses_a_file_with_a_store_name_it_did_not_create(tmp_path: Path, reference) -> None:
    corpus, _ = reference
    out = tmp_path / "out"
    out.mkdir()
    (out / "train-00000.bin").write_bytes(b"someone else's")
    proc = subprocess.run(_ingest_cmd(corpus, out), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "train-00000.bin" in proc.stderr and "--out" in proc.stderr, proc.stderr
    assert (out / "train-00000.bin").read_bytes() == b"someone else's"


STUDY = tiny_study(
    "locks",
    """[study.train]
tokens = 1024
global_batch_size = 4
lr = 1e-2
eval_interval_steps = 16
eval_tokens = 256
checkpoint_interval_steps = 8
threads = 1
[study.design]
kind = "grid"
[study.design.axes]
"model.width" = [8, 16]
""",
)


def test_two_concurrent_study_drivers_train_each_run_once(tmp_path: Path, tiny_corpus: Path) -> None:
    spec = tmp_path / "study.toml"
    spec.write_text(STUDY.format(corpus=tiny_corpus))
    out = tmp_path / "study"
    cmd = _cli("study", "run", str(spec), "--out", str(out), "--no-forecast")
    with file_lock(out / ".study.lock"):  # a driver is running: a second one refuses before writing
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and f"already in use by PID {os.getpid()}" in proc.stderr, proc.stderr
    assert not (out / "registry.sqlite").exists()

    drivers = [
        subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for _ in range(2)
    ]
    results = [(d.wait(timeout=300), d.stderr.read()) for d in drivers]
    # one trains; the other refused, or (if it started after the first finished) skipped everything
    assert 0 in [rc for rc, _ in results] and all(rc in (0, 2) for rc, _ in results), results
    for rc, err in results:
        _no_traceback(drivers[0], err)
        if rc == 2:
            assert "already in use by PID" in err, err
    with Registry(out / "registry.sqlite") as reg:
        rows = reg.runs()
    assert len(rows) == 2 and all(r["status"] == "done" and r["attempts"] == 1 for r in rows), rows
    for r in rows:
        lines = (Path(r["run_dir"]) / "metrics.jsonl").read_text().splitlines()
        steps = [row["step"] for row in map(json.loads, lines) if "loss" in row]
        assert steps == sorted(set(steps)), f"interleaved or repeated steps in {r['run_id']}: {steps}"
    # the same as one driver alone: every run's losses, step for step
    single = tmp_path / "single"
    subprocess.run(
        _cli("study", "run", str(spec), "--out", str(single), "--no-forecast"),
        check=True,
        capture_output=True,
        timeout=300,
    )
    for r in rows:
        mine = (Path(r["run_dir"]) / "metrics.jsonl").read_text().splitlines()
        alone = (single / "runs" / r["run_id"] / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(x).get("loss") for x in mine] == [json.loads(x).get("loss") for x in alone], r[
            "run_id"
        ]


def test_a_second_trainer_on_one_run_directory_refuses(tmp_path: Path) -> None:
    out = tmp_path / "run"
    run_toml = Path(__file__).resolve().parents[1] / "examples" / "run_tiny.toml"
    with file_lock(out / ".run.lock"):
        proc = subprocess.run(
            _cli("train", str(run_toml), "--out", str(out)), capture_output=True, text=True, timeout=120
        )
    assert proc.returncode == 2 and f"already in use by PID {os.getpid()}" in proc.stderr, proc.stderr
    assert not (out / "config.json").exists()
