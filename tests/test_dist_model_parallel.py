"""Model parallelism on gloo (CPU) with real processes, against one process, loss for loss.

* tensor parallel: DTensor column/row-parallel attention and MLP, `tensor_parallel=2` on 2 ranks
  (data-parallel size 1, FSDP over it);
* pipeline parallel: 2 stages, 1F1B over 4 micro-batches, tied embedding/output weight across stages;
* slow: the 2-D mesh data 2 × tensor 2, and pipeline 2 × tensor 2, on 4 ranks.
Tolerance: float (the all-reduces sum in another order than one process does).
"""

from __future__ import annotations

import json

import pytest
import torch

from scalelab.train.parallel.tensor import qkv_row_order
from scalelab.train.run import run_training
from test_dist_common import build_store, losses, make_spec, step_rows, torchrun, write_config

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
    work = tmp_path_factory.mktemp("mp")
    store = build_store(work)
    mp = pytest.MonkeyPatch()
    mp.setenv("SCALELAB_CACHE_DIR", str(work / "cache"))
    torch.set_num_threads(1)
    one = run_training(make_spec(store, strategy="none"), work / "one")
    mp.undo()
    assert one["status"] == "done", one["error"]
    return work, store, one


def test_tensor_parallel_two_ranks_matches_one_process(setup):
    work, store, one = setup
    spec = make_spec(store, strategy="fsdp", tensor_parallel=2)
    out = work / "tp2"
    assert torchrun(work, write_config(work / "tp.json", spec), out, 2).returncode == 0
    assert _close(losses(out), losses(work / "one")), (losses(out), losses(work / "one"))
    rec = json.loads((out / "record.json").read_text())
    assert rec["eval_loss"] == pytest.approx(one["eval_loss"], rel=REL)


def test_pipeline_two_stages_matches_one_process(setup):
    work, store, one = setup
    spec = make_spec(store, strategy="fsdp", pipeline_parallel=2, pipeline_microbatches=4)
    out = work / "pp2"
    assert torchrun(work, write_config(work / "pp.json", spec), out, 2).returncode == 0
    assert _close(losses(out), losses(work / "one")), (losses(out), losses(work / "one"))
    rec = json.loads((out / "record.json").read_text())
    assert rec["eval_loss"] == pytest.approx(one["eval_loss"], rel=REL)
    first = step_rows(out)[0]
    assert first["grad_norm"] == pytest.approx(step_rows(work / "one")[0]["grad_norm"], rel=REL)


def test_stage_blocks_are_contiguous_and_cover_the_model():
    from scalelab.train.parallel.pipeline import stage_blocks

    assert [list(stage_blocks(5, 2, s)) for s in range(2)] == [[0, 1, 2], [3, 4]]
    assert [i for s in range(3) for i in stage_blocks(7, 3, s)] == list(range(7))


@pytest.mark.slow
def test_pipeline_and_tensor_parallel_on_four_ranks(setup):
    work, store, one = setup
    spec = make_spec(store, strategy="fsdp", pipeline_parallel=2, tensor_parallel=2, pipeline_microbatches=4)
    out = work / "pp2tp2"
    assert torchrun(work, write_config(work / "pp2tp2.json", spec), out, 4, timeout=400).returncode == 0
    assert _close(losses(out), losses(work / "one")), (losses(out), losses(work / "one"))


@pytest.mark.slow
def test_tensor_and_data_parallel_2d_mesh_on_four_ranks(setup):
    work, store, one = setup
    spec = make_spec(store, strategy="fsdp", tensor_parallel=2)
    out = work / "tp2dp2"
    assert torchrun(work, write_config(work / "tp2d.json", spec), out, 4, timeout=400).returncode == 0
    assert _close(losses(out), losses(work / "one")), (losses(out), losses(work / "one"))
