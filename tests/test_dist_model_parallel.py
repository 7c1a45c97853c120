"""Model parallelism on gloo (CPU) with real processes, against one process, loss for loss.

* tensor parallel: DTensor column/row-parallel attention and MLP, `tensor_parallel=2` on 2 ranks
  (data-parallel size 1, FSDP over it);
* pipeline parallel: 2 stages, 1F1B over 4 micro-batches, tied embedding/output weight across stages;
* the cross-rank gradient-norm spread (grad_norm_min/max/std) under both: per-rank norms of the rank's
  shard / stage, bounded by the global norm as train/distributed.py derives (slow: with untied weights
  the stages' squared norms add up to the global one);
* slow: the 2-D mesh data 2 × tensor 2, and pipeline 2 × tensor 2, on 4 ranks.
Tolerance: float (the all-reduces sum in another order than one process does).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from scalelab.train.parallel.tensor import fused_row_order
from scalelab.train.run import run_training
from test_dist_common import build_store, losses, make_spec, step_rows, torchrun, write_config

REL = 2e-5


def _close(a, b, rel=REL):
    return len(a) == len(b) and all(abs(x - y) <= rel * max(1.0, abs(y)) for x, y in zip(a, b, strict=True))


def test_fused_row_order_gives_each_rank_its_heads():
    width, tp = 8, 2  # [q; k; v] of width 8, 4 heads of 2; rank 0 owns heads 0-1 (rows 0-3 of q, k, v)
    order = fused_row_order(3 * width, 3, tp).tolist()
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


def _torchrun_ok(work: Path, name: str, spec, nproc: int = 2, timeout: float = 240) -> Path:
    """Run `spec` on `nproc` ranks into work/name; the output directory."""
    out = work / name
    proc = torchrun(work, write_config(work / f"{name}.json", spec), out, nproc, timeout=timeout)
    assert proc.returncode == 0
    return out


@pytest.fixture(scope="module")
def tp_run(setup) -> Path:
    """tensor_parallel=2 on 2 ranks (data-parallel size 1)."""
    work, store, _ = setup
    return _torchrun_ok(work, "tp2", make_spec(store, strategy="fsdp", tensor_parallel=2))


@pytest.fixture(scope="module")
def pp_run(setup) -> Path:
    """2 pipeline stages on 2 ranks, 4 micro-batches, tied embedding/output weight."""
    work, store, _ = setup
    spec = make_spec(store, strategy="fsdp", pipeline_parallel=2, pipeline_microbatches=4)
    return _torchrun_ok(work, "pp2", spec)


def test_tensor_parallel_two_ranks_matches_one_process(setup, tp_run):
    work, _, one = setup
    assert _close(losses(tp_run), losses(work / "one")), (losses(tp_run), losses(work / "one"))
    rec = json.loads((tp_run / "record.json").read_text())
    assert rec["eval_loss"] == pytest.approx(one["eval_loss"], rel=REL)


def test_pipeline_two_stages_matches_one_process(setup, pp_run):
    work, _, one = setup
    assert _close(losses(pp_run), losses(work / "one")), (losses(pp_run), losses(work / "one"))
    rec = json.loads((pp_run / "record.json").read_text())
    assert rec["eval_loss"] == pytest.approx(one["eval_loss"], rel=REL)


def _spread_rows(out: Path, reference: Path, world_size: int = 2) -> list[dict]:
    """The step rows of `out`, after checking that every one carries the cross-rank spread (finite,
    min ≤ max, std ≥ 0) and that the global grad_norm equals the single-process run's at every step."""
    rows = step_rows(out)
    assert len(rows) == 12
    for row in rows:
        for key in ("grad_norm", "grad_norm_min", "grad_norm_max", "grad_norm_std"):
            assert key in row and math.isfinite(row[key]), (key, row)
        for key in ("step_seconds_min", "step_seconds_max", "step_seconds_std"):
            assert key in row and math.isfinite(row[key]), (key, row)
        assert 0 < row["grad_norm_min"] <= row["grad_norm_max"] and row["grad_norm_std"] >= 0
        assert row["step_seconds_min"] <= row["step_seconds_max"] == row["step_seconds"]
        assert row["world_size"] == world_size
    ref = step_rows(reference)
    assert _close([r["grad_norm"] for r in rows], [r["grad_norm"] for r in ref])
    return rows


def test_grad_norm_spread_is_logged_under_tensor_and_pipeline_parallel(setup, tp_run, pp_run):
    """grad_norm_min/max/std in metrics.jsonl under TP and PP; the global norm still matches one process.

    Tensor parallel (data-parallel size 1): rank r's norm² is R² + S_r² (replicated parameters R, its
    shard S_r) and grad_norm² = R² + S_0² + S_1², so max ≤ grad_norm ≤ sqrt(min² + max²) — a norm of the
    whole model, or of the shard alone, would break one side.
    """
    work, _, _ = setup
    for row in _spread_rows(tp_run, work / "one"):
        g, lo, hi = row["grad_norm"], row["grad_norm_min"], row["grad_norm_max"]
        assert hi <= g * (1 + REL) and g <= math.hypot(lo, hi) * (1 + REL), row
    _spread_rows(pp_run, work / "one")


@pytest.mark.slow
def test_pipeline_stage_grad_norms_add_up_to_the_global_norm(setup):
    """Untied weights, 2 stages, data-parallel size 1: the stages hold disjoint parameters, so their
    local squared norms (measured inside FSDP's reduction, rescaled by 1/micro-batches) sum to
    grad_norm² — checks the rescaling and that no stage counts a parameter twice."""
    work, store, _ = setup
    untied = {"tie_embeddings": False}
    spec = make_spec(store, strategy="fsdp", pipeline_parallel=2, pipeline_microbatches=4, model=untied)
    one_spec = make_spec(store, strategy="none", model=untied)
    mp = pytest.MonkeyPatch()
    mp.setenv("SCALELAB_CACHE_DIR", str(work / "cache"))
    one = run_training(one_spec, work / "one-untied")
    mp.undo()
    assert one["status"] == "done", one["error"]
    out = _torchrun_ok(work, "pp2-untied", spec)
    for row in _spread_rows(out, work / "one-untied"):
        g, lo, hi = row["grad_norm"], row["grad_norm_min"], row["grad_norm_max"]
        assert math.hypot(lo, hi) == pytest.approx(g, rel=1e-5), row


def test_stage_blocks_are_contiguous_and_cover_the_model():
    from scalelab.train.parallel.pipeline import stage_blocks

    assert [list(stage_blocks(5, 2, s)) for s in range(2)] == [[0, 1, 2], [3, 4]]
    assert [i for s in range(3) for i in stage_blocks(7, 3, s)] == list(range(7))


@pytest.mark.slow
def test_pipeline_and_tensor_parallel_on_four_ranks(setup):
    work, store, one = setup
    spec = make_spec(store, strategy="fsdp", pipeline_parallel=2, tensor_parallel=2, pipeline_microbatches=4)
    out = _torchrun_ok(work, "pp2tp2", spec, 4, timeout=400)
    assert _close(losses(out), losses(work / "one")), (losses(out), losses(work / "one"))
    _spread_rows(out, work / "one", world_size=4)


@pytest.mark.slow
def test_tensor_and_data_parallel_2d_mesh_on_four_ranks(setup):
    work, store, one = setup
    spec = make_spec(store, strategy="fsdp", tensor_parallel=2)
    out = _torchrun_ok(work, "tp2dp2", spec, 4, timeout=400)
    assert _close(losses(out), losses(work / "one")), (losses(out), losses(work / "one"))
    _spread_rows(out, work / "one", world_size=4)


@pytest.mark.parametrize("which", ["tp2", "pp2"])
def test_tensor_and_pipeline_parallel_runs_serve_the_weights_one_process_trains(setup, tp_run, pp_run, which):
    """The one loader behind serve/distill/quantize consolidates TP and PP shards into the plain model."""
    from scalelab.serve.loading import load_run

    work, _, _ = setup
    mp = pytest.MonkeyPatch()
    mp.setenv("SCALELAB_CACHE_DIR", str(work / "cache"))
    try:
        sharded, single = load_run(work / which), load_run(work / "one")
    finally:
        mp.undo()
    assert sharded.step == single.step == 12
    for (name, got), ref in zip(
        sharded.model.state_dict().items(), single.model.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5, msg=name)
