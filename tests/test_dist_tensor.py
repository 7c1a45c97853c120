"""Tensor parallelism on gloo (CPU) with real processes: DTensor column/row-parallel attention and MLP.

`tensor_parallel=2` on 2 ranks (data-parallel size 1, FSDP over it) must match one process to float
tolerance, loss for loss; the 2-D mesh (data 2 × tensor 2 on 4 ranks) is the slow variant.
"""

from __future__ import annotations

import json

import pytest
import torch

from scalelab.train.parallel.tensor import qkv_row_order
from scalelab.train.run import run_training
from test_dist_common import build_store, losses, make_spec, torchrun, write_config

REL = 2e-5


def _close(a, b, rel=REL):
    return len(a) == len(b) and all(abs(x - y) <= rel * max(1.0, abs(y)) for x, y in zip(a, b, strict=True))


def test_qkv_row_order_gives_each_rank_its_heads():
    width, heads, tp = 8, 4, 2  # d_head 2; rank 0 owns heads 0-1 (rows 0-3 of each of q, k, v)
    order = qkv_row_order(width, heads, tp).tolist()
    assert order[:12] == [0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19]
    assert sorted(order) == list(range(3 * width))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    work = tmp_path_factory.mktemp("tp")
    return work, build_store(work)


def test_tensor_parallel_two_ranks_matches_one_process(setup, monkeypatch):
    work, store = setup
    monkeypatch.setenv("SCALELAB_CACHE_DIR", str(work / "cache"))
    torch.set_num_threads(1)
    one = run_training(make_spec(store, strategy="none"), work / "one")
    assert one["status"] == "done", one["error"]
    spec = make_spec(store, strategy="fsdp", tensor_parallel=2)
    out = work / "tp2"
    assert torchrun(work, write_config(work / "tp.json", spec), out, 2).returncode == 0
    assert _close(losses(out), losses(work / "one")), (losses(out), losses(work / "one"))
    rec = json.loads((out / "record.json").read_text())
    assert rec["eval_loss"] == pytest.approx(one["eval_loss"], rel=REL)


@pytest.mark.slow
def test_tensor_and_data_parallel_2d_mesh_on_four_ranks(setup, monkeypatch):
    work, store = setup
    if not (work / "one").exists():
        monkeypatch.setenv("SCALELAB_CACHE_DIR", str(work / "cache"))
        run_training(make_spec(store, strategy="none"), work / "one")
    spec = make_spec(store, strategy="fsdp", tensor_parallel=2)
    out = work / "tp2dp2"
    assert torchrun(work, write_config(work / "tp2d.json", spec), out, 4, timeout=400).returncode == 0
    assert _close(losses(out), losses(work / "one")), (losses(out), losses(work / "one"))
