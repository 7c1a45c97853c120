"""Concurrent local runs each get their own GPUs through CUDA_VISIBLE_DEVICES (the assignment logic is
tested without a GPU; the end-to-end test checks what each run's process saw)."""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

import pytest

from scalelab.spec import load_study
from scalelab.study import executors
from scalelab.study.executors import LocalExecutor, run_study
from scalelab.study.gpus import GpuSlots, slot_gpus, visible_gpus
from tiny_study import tiny_study


def test_visible_gpus_follow_cuda_visible_devices_else_the_device_count() -> None:
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "2,3"}, lambda: 8) == ["2", "3"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}, lambda: 8) == []
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "-1"}, lambda: 8) == []
    assert visible_gpus({}, lambda: 4) == ["0", "1", "2", "3"]
    assert visible_gpus({}, lambda: 0) == []


def test_each_slot_gets_its_own_gpus_and_shares_only_when_there_are_too_few(caplog) -> None:
    caplog.set_level(logging.WARNING, logger="scalelab")
    assert slot_gpus(["0", "1", "2", "3"], 4, 1) == [["0"], ["1"], ["2"], ["3"]]
    assert slot_gpus(["4", "5", "6", "7"], 2, 2) == [["4", "5"], ["6", "7"]]
    assert slot_gpus([], 3, 1) == [[], [], []]
    assert not caplog.records
    assert slot_gpus(["0", "1"], 3, 1) == [["0"], ["1"], ["0"]]
    assert "share GPUs round-robin" in caplog.text


def test_concurrent_holders_never_hold_the_same_slot() -> None:
    slots = GpuSlots(slot_gpus(["0", "1", "2"], 3, 1))
    held: list[str] = []
    clash: list[str] = []
    lock = threading.Lock()

    def work() -> None:
        for _ in range(20):
            with slots.take() as env:
                gpu = env["CUDA_VISIBLE_DEVICES"]
                with lock:
                    if gpu in held:
                        clash.append(gpu)
                    held.append(gpu)
                time.sleep(0.001)
                with lock:
                    held.remove(gpu)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not clash and not held
    with GpuSlots(slot_gpus([], 1, 1)).take() as env:
        assert env == {}


def test_parallel_runs_see_different_gpus(tmp_path: Path, tiny_corpus: Path, monkeypatch) -> None:
    """Two GPU ids stand in for a two-GPU machine; each run's provenance records what its process saw."""
    monkeypatch.setattr(executors, "visible_gpus", lambda: ["0", "1"])
    text = tiny_study(
        "gpus",
        """[study.train]
tokens = 512
global_batch_size = 4
eval_tokens = 64
threads = 1
device = "cpu"
[study.design]
kind = "grid"
[study.design.axes]
"model.width" = [8, 16]
""",
    )
    spec = tmp_path / "study.toml"
    spec.write_text(text.format(corpus=tiny_corpus))
    result = run_study(load_study(spec), tmp_path / "s", executor=LocalExecutor(parallel=2))
    assert result.count("done") == 2, result.outcomes
    seen = sorted(
        json.loads(p.read_text())["environment"]["env"]["CUDA_VISIBLE_DEVICES"]
        for p in (tmp_path / "s").glob("runs/*/provenance.json")
    )
    assert seen == ["0", "1"]


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_atomic_writes_follow_the_umask(tmp_path: Path, mask: int) -> None:
    import os

    from scalelab.io import atomic_write_json

    old = os.umask(mask)
    try:
        atomic_write_json(tmp_path / "x.json", {"a": 1})
        (tmp_path / "plain.txt").write_text("x")
    finally:
        os.umask(old)
    assert (tmp_path / "x.json").stat().st_mode & 0o777 == 0o666 & ~mask
    assert (tmp_path / "x.json").stat().st_mode & 0o777 == (tmp_path / "plain.txt").stat().st_mode & 0o777
