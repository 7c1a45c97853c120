"""WSD designs: the planner links trunks and branches, a branch equals its from-scratch run bitwise, and
the study executor runs branches from their trunk's snapshots (and from scratch when a snapshot is bad)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scalelab.errors import SpecError
from scalelab.spec import RunSpec, load_study, set_path
from scalelab.study.executors import Dependencies, LocalExecutor, run_study
from scalelab.study.plan import expand_runs
from scalelab.train.branch import BranchError, branch_step, check_branch, snapshot_path
from scalelab.train.run import run_training
from tiny_study import tiny_study

STUDY = tiny_study(
    "wsd",
    """[study.train]
global_batch_size = 4
lr = 1e-2
decay_fraction = 0.25
warmup_fraction = 0.1
eval_interval_steps = 10
eval_tokens = 256
checkpoint_interval_steps = 7
threads = 1
[study.design]
kind = "wsd"
tokens = [1280, 2560, 5120]
[study.design.axes]
"model.width" = {widths}
""",
)


def _study(tmp_path: Path, corpus: Path | str = "/nonexistent", widths: str = "[16]"):
    path = tmp_path / "wsd.toml"
    path.write_text(STUDY.format(corpus=corpus, widths=widths))
    return load_study(path)


def _losses(run_dir: Path) -> list[tuple[int, float | None, float | None]]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(x["step"], x.get("loss"), x.get("eval_loss")) for x in lines]


def test_planner_makes_one_trunk_per_size_with_snapshots_where_branches_cool_down(tmp_path: Path) -> None:
    runs = expand_runs(_study(tmp_path, widths="[16, 32]"))
    assert len(runs) == 6
    trunks = [r for r in runs if r.branch_of is None]
    assert sorted(r.spec.model.width for r in trunks) == [16, 32]
    assert all(r.tokens == 5120 for r in trunks)
    by_id = {r.run_id: r for r in runs}
    for r in runs:
        assert r.spec.train.schedule == "wsd"
        assert r.spec.train.warmup_tokens == 128  # 10 % of the smallest D, whole steps, shared by all
        if r.branch_of is None:
            continue
        trunk = by_id[r.branch_of]
        assert trunk.spec.model.width == r.spec.model.width
        # 20 / 40 steps with a 25 % cooldown start it at step 15 / 30: the trunk keeps those snapshots
        assert r.branch_step == {1280: 15, 2560: 30}[r.tokens] == branch_step(r.spec)
        assert r.branch_step in trunk.snapshot_steps
        assert r.tokens_to_train == r.tokens - r.branch_step * 64
    spend = sum(r.flops_to_spend for r in runs)
    grid = sum(r.flops for r in runs)
    # per size: grid 1 + 2 + 4 = 7 units; WSD 4 + 0.25·2 + 0.25·1 = 4.75 units
    assert spend / grid == pytest.approx(4.75 / 7)


def test_warmup_tokens_is_hashed_only_when_set() -> None:
    spec = RunSpec()
    assert "warmup_tokens" not in spec.canonical_json()
    assert set_path(spec, "train.warmup_tokens", 64).run_id != spec.run_id


def test_wsd_design_refuses_axes_it_sets_itself(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(STUDY.format(corpus="/x", widths="[16]").replace('"model.width"', '"train.tokens"'))
    with pytest.raises(SpecError, match="train.tokens.*set by the design"):
        load_study(path)


def test_check_branch_refuses_other_configs_and_other_learning_rates(tmp_path: Path) -> None:
    runs = {r.tokens: r.spec for r in expand_runs(_study(tmp_path))}
    trunk, branch = runs[5120], runs[2560]
    check_branch(trunk, branch, branch_step(branch))
    with pytest.raises(BranchError, match="model.width"):
        check_branch(set_path(trunk, "model.width", 32), branch, branch_step(branch))
    with pytest.raises(BranchError, match="learning rates differ at step 31"):
        check_branch(trunk, branch, branch_step(branch) + 2)  # into the branch's own cooldown
    relative = set_path(branch, "train.warmup_tokens", None)  # warmup_fraction of each run's own length
    with pytest.raises(BranchError, match="warmup_tokens"):
        check_branch(set_path(trunk, "train.warmup_tokens", None), relative, branch_step(relative))


def test_dependencies_start_branches_after_their_trunk(tmp_path: Path) -> None:
    runs = expand_runs(_study(tmp_path, widths="[16, 32]"))
    deps = Dependencies([(r, tmp_path / r.run_id) for r in runs])
    assert {p.run_id for p, _ in deps.ready} == {r.run_id for r in runs if r.branch_of is None}
    trunk = deps.ready[0][0]
    released = deps.finished(trunk.run_id)
    assert {p.branch_of for p, _ in released} == {trunk.run_id} and len(released) == 2
    assert deps.finished(trunk.run_id) == []
    # a branch whose trunk is already done (not in this invocation's work) is ready at once
    only_branch = [(r, tmp_path / r.run_id) for r in runs if r.branch_of == trunk.run_id]
    assert len(Dependencies(only_branch).ready) == 2


def test_wsd_study_branches_equal_their_from_scratch_runs(tmp_path: Path, tiny_corpus: Path) -> None:
    study = _study(tmp_path, tiny_corpus)
    out = tmp_path / "study"
    result = run_study(study, out, executor=LocalExecutor(parallel=2))
    assert sorted(o.status for o in result.outcomes) == ["done"] * 3
    runs = {r.tokens: r for r in expand_runs(study)}
    trunk = runs[5120]
    trunk_dir = out / "runs" / trunk.run_id
    assert sorted(p.name for p in (trunk_dir / "snapshots").iterdir()) == ["step-000015", "step-000030"]
    for tokens in (1280, 2560):
        planned = runs[tokens]
        run_dir = out / "runs" / planned.run_id
        record = json.loads((run_dir / "record.json").read_text())
        assert record["branch"]["trunk_run_id"] == trunk.run_id
        assert record["branch"]["step"] == planned.branch_step
        assert record["tokens"] == tokens and record["steps"] == tokens // 64
        scratch = run_training(planned.spec, tmp_path / f"scratch-{tokens}", resume=False)
        assert scratch["branch"] is None
        assert scratch["final_train_loss"] == record["final_train_loss"]  # bitwise, on CPU
        assert scratch["eval_loss"] == record["eval_loss"]
        assert _losses(tmp_path / f"scratch-{tokens}") == _losses(
            run_dir
        )  # whole curve, trunk prefix included


def test_corrupt_snapshot_trains_the_branch_from_scratch(tmp_path: Path, tiny_corpus: Path) -> None:
    runs = {r.tokens: r for r in expand_runs(_study(tmp_path, tiny_corpus))}
    trunk, branch = runs[5120], runs[1280]
    trunk_dir = tmp_path / "trunk"
    run_training(trunk.spec, trunk_dir, snapshot_steps=trunk.snapshot_steps)
    snap = snapshot_path(trunk_dir, branch.branch_step)
    good = run_training(branch.spec, tmp_path / "good", branch_from=snap)
    assert good["branch"]["step"] == branch.branch_step
    wrong = run_training(set_path(branch.spec, "train.lr", 5e-3), tmp_path / "wrong", branch_from=snap)
    assert wrong["status"] == "failed" and "BranchError" in wrong["error"] and "train.lr" in wrong["error"]
    weights = snap / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    fallback = run_training(branch.spec, tmp_path / "fallback", branch_from=snap)
    assert fallback["status"] == "done" and fallback["branch"] is None
    assert fallback["eval_loss"] == good["eval_loss"]
