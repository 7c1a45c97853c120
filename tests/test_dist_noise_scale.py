"""Noise-scale batch control under DDP and FSDP (real processes: torchrun, 2 ranks on gloo).

Each rank's local gradient is a small-batch gradient and the all-reduced one the big batch, so a 2-rank run
estimates the noise scale from the same two batch sizes as one process that splits each step into the 2
data-parallel shards (`train.noise_scale_shards = 2`: rank r's rows of every loader batch). On the same data
the estimates agree to float tolerance, and so do the controller's decisions — growing and shrinking — and
the losses. The thresholds are set so that this tiny model (B_simple ≈ 30–60 tokens against a 128-token
batch) both grows and shrinks within 24 base steps.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from scalelab.train.run import run_training
from test_dist_common import build_store, losses, make_spec, step_rows, torchrun, write_config

CONTROL: dict[str, Any] = {
    "tokens": 16 * 8 * 24,
    "noise_scale": True,
    "max_global_batch_size": 32,
    "noise_scale_headroom": 0.3,
    "noise_scale_shrink_below": 0.15,
    "noise_scale_min_measurements": 3,
    "noise_scale_min_steps": 3,
}
REL = 1e-4  # estimates (measured: ≤ 6e-6): all-reduce and accumulation orders differ; B_simple is a ratio


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("dist-noise")


@pytest.fixture(scope="module")
def store(work) -> Path:
    return build_store(work)


@pytest.fixture(scope="module")
def one_process(work, store) -> tuple[dict[str, Any], Path]:
    """The single-process decision: one process, the step split into the 2 shards 2 ranks would hold."""
    import os

    os.environ.setdefault("SCALELAB_CACHE_DIR", str(work / "cache"))
    out = work / "one"
    record = run_training(make_spec(store, strategy="none", noise_scale_shards=2, **CONTROL), out)
    assert record["status"] == "done", record["error"]
    return record, out


def _noise(out: Path) -> list[tuple[int, int, float]]:
    return [(r["step"], r["global_batch_size"], r["noise_scale_tokens"]) for r in step_rows(out)]


def _decisions(record: dict[str, Any]) -> list[tuple[int, int, int]]:
    return [(c["step"], c["from"], c["to"]) for c in record["batch_changes"]]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_decide_as_one_process_on_the_same_data(work, store, one_process, strategy):
    one, one_out = one_process
    decisions = _decisions(one)
    # the setting exercises both directions (else the comparison below would prove little)
    assert any(t > f for _, f, t in decisions) and any(t < f for _, f, t in decisions), decisions
    assert all("noise scale B_simple" in c["reason"] for c in one["batch_changes"])

    out = work / strategy
    spec = make_spec(store, strategy=strategy, **CONTROL)
    assert torchrun(work, write_config(work / f"{strategy}.json", spec), out, 2).returncode == 0
    record = json.loads((out / "record.json").read_text())
    assert record["status"] == "done" and record["world_size"] == 2
    assert _decisions(record) == decisions
    assert [c["reason"].split(":")[-1] for c in record["batch_changes"]] == [
        c["reason"].split(":")[-1] for c in one["batch_changes"]
    ]
    mine, ref = _noise(out), _noise(one_out)
    assert [(s, b) for s, b, _ in mine] == [(s, b) for s, b, _ in ref]
    for (step, _, x), (_, _, y) in zip(mine, ref, strict=True):
        assert abs(x - y) <= REL * abs(y), (step, x, y)
    assert record["tokens"] == one["tokens"]
    assert all(abs(a - b) <= 2e-5 * b for a, b in zip(losses(out), losses(one_out), strict=True))
