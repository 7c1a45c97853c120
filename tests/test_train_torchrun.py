"""`torchrun -m scalelab train SPEC` with a plain spec (no train.strategy) trains as DDP, as the README says."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from scalelab.spec import RunSpec
from scalelab.train.parallel.launch import free_port, torchrun_env
from scalelab.train.run import under_torchrun
from test_train_progress import LINE, config


def test_a_plain_spec_is_ddp_only_under_torchrun(monkeypatch) -> None:
    plain = RunSpec()
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert under_torchrun(plain) is plain
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert under_torchrun(plain).train.strategy == "ddp"
    fsdp = RunSpec.model_validate({"train": {"strategy": "fsdp"}})
    assert under_torchrun(fsdp) is fsdp


def test_torchrun_trains_a_plain_spec_as_ddp(tmp_path: Path, tiny_corpus: Path) -> None:
    out_dir = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"127.0.0.1:{free_port()}",
        "-m",
        "scalelab",
        "train",
        str(config(tmp_path, tiny_corpus, 6)),
        "--out",
        str(out_dir),
        "--progress-every",
        "0",
    ]
    env = torchrun_env() | {"OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    record = json.loads((out_dir / "record.json").read_text())
    assert record["status"] == "done" and record["steps"] == 6
    assert json.loads((out_dir / "config.json").read_text())["train"]["strategy"] == "ddp"
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert {r["world_size"] for r in rows if "loss" in r} == {2}
    assert out.stdout.count(": done — train loss") == 1  # one summary (rank 0's)
    assert sum(1 for line in out.stderr.splitlines() if LINE.match(line)) == 6
