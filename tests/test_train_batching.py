"""Micro-batch search, document packing and the batch-size controller."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from scalelab.models.flops import ModelShape
from scalelab.spec import ModelSpec, RunSpec
from scalelab.train.batching import (
    BatchSizeController,
    estimate_train_bytes,
    find_micro_batch,
    pack_documents,
)
from scalelab.train.run import run_training
from train_synthetic import SyntheticStore, synthetic_factory

torch.set_num_threads(1)
SHAPE = ModelShape.from_spec(ModelSpec(width=32, depth=2, n_heads=4, context_tokens=32), 64)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SCALELAB_CACHE_DIR", str(tmp_path / "cache"))


def test_find_micro_batch_cpu_estimate():
    budget = estimate_train_bytes(SHAPE, 6)
    assert find_micro_batch(SHAPE, 24, memory_budget_bytes=budget) == 6
    assert find_micro_batch(SHAPE, 24, memory_budget_bytes=budget - 1) == 4
    assert find_micro_batch(SHAPE, 24, memory_budget_bytes=10**15) == 24
    assert find_micro_batch(SHAPE, 24, memory_budget_bytes=1) == 1


def test_find_micro_batch_backs_off_on_oom():
    tried = []

    def probe(mb: int) -> None:
        tried.append(mb)
        if mb > 5:
            raise torch.cuda.OutOfMemoryError("fake")

    assert find_micro_batch(SHAPE, 16, try_step=probe) == 4
    assert tried == [16, 8, 4]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(1, 50), max_size=40), st.integers(1, 60))
def test_pack_documents_property(lengths, budget):
    bins = pack_documents(lengths, budget)
    flat = sorted(i for b in bins for i in b)
    assert flat == list(range(len(lengths)))
    for b in bins:
        total = sum(lengths[i] for i in b)
        assert total <= budget or len(b) == 1


def test_pack_documents_example():
    assert pack_documents([5, 3, 2, 4, 1], 6) == [[0, 4], [2, 3], [1]]


def _spec(steps=12):
    return RunSpec.model_validate(
        {
            "model": {"width": 32, "depth": 2, "n_heads": 4, "context_tokens": 32},
            "train": {
                "tokens": 32 * 4 * steps,
                "global_batch_size": 4,
                "threads": 1,
                "eval_interval_steps": 100,
                "eval_tokens": 128,
                "checkpoint_interval_steps": 2,
                "lr": 1e-2,
            },
        }
    )


def _step_rows(out):
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]


def test_controller_grows_batch_keeps_token_budget_and_resumes(tmp_path):
    spec = _spec()
    sched = [(4 * 128, 2), (8 * 128, 4)]  # base step = 4 × 32 = 128 tokens
    ctrl = BatchSizeController(sched)
    rec = run_training(
        spec, tmp_path / "a", store=SyntheticStore(), loader_factory=synthetic_factory, callbacks=[ctrl]
    )
    assert rec["status"] == "done" and rec["tokens"] == spec.train.tokens
    rows = _step_rows(tmp_path / "a")
    sizes = [r["global_batch_size"] for r in rows]
    assert sizes == [4, 4, 4, 4, 8, 8, 16]  # 4 steps × 128 + 2 × 256 + 1 × 512 = 1536 tokens
    assert [(c["from"], c["to"]) for c in ctrl.changes] == [(4, 8), (8, 16)]
    assert "tokens seen" in ctrl.changes[0]["reason"]
    # resume from the checkpoint at step 4 (delete the later ones): same losses, same changes
    for p in sorted((tmp_path / "a" / "checkpoint").iterdir()):
        if p.name > "step-000004":
            shutil.rmtree(p)
    ctrl2 = BatchSizeController(sched)
    rec2 = run_training(
        spec, tmp_path / "a", store=SyntheticStore(), loader_factory=synthetic_factory, callbacks=[ctrl2]
    )
    rows2 = _step_rows(tmp_path / "a")
    assert [r["loss"] for r in rows2] == [r["loss"] for r in rows]
    assert ctrl2.changes == ctrl.changes and rec2["final_train_loss"] == rec["final_train_loss"]
