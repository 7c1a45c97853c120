"""A design axis over data sources (`study.sources`) or any axis (`study.group_by`) gives each run a
group; existing designs plan exactly the runs they did."""

from __future__ import annotations

from pathlib import Path

import pytest

from scalelab.errors import SpecError
from scalelab.spec import load_study, study_from_dict
from scalelab.study.plan import expand_runs

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _study(**extra: object) -> dict:
    return {
        "study": {
            "name": "g",
            "train": {"tokens": 65536},
            "design": {"kind": "grid", "axes": {"model.width": [32, 64]}, "seeds": [0, 1]},
            **extra,
        }
    }


def test_sources_cross_the_design_and_name_each_runs_group() -> None:
    spec = study_from_dict(
        _study(sources={"a": [{"kind": "text", "path": "x/a"}], "b": [{"kind": "text", "path": "x/b"}]})
    )
    runs = expand_runs(spec)
    assert len(runs) == 2 * 2 * 2 and len({r.run_id for r in runs}) == 8
    for r in runs:
        assert r.spec.data.sources[0].path == f"x/{r.point['group']}"
    assert sorted({r.point["group"] for r in runs}) == ["a", "b"]
    plain = expand_runs(study_from_dict(_study()))
    assert all("group" not in r.point for r in plain)  # no sources: ungrouped, same runs as before


def test_group_by_names_the_group_after_an_axis_value() -> None:
    runs = expand_runs(study_from_dict(_study(group_by="model.width")))
    assert {r.point["group"] for r in runs} == {"32", "64"}
    with pytest.raises(SpecError, match=r"group_by: 'model.depth' is not a design axis"):
        expand_runs(study_from_dict(_study(group_by="model.depth")))


def test_sources_and_group_by_together_are_an_error() -> None:
    with pytest.raises(SpecError, match="group_by"):
        study_from_dict(_study(sources={"a": [{"kind": "builtin"}]}, group_by="model.width"))
    with pytest.raises(SpecError, match="study.sources"):
        study_from_dict(_study(sources={"a": []}))


def test_two_corpora_example_plans_one_grid_per_corpus() -> None:
    runs = expand_runs(load_study(EXAMPLES / "two_corpora.toml"))
    by_group = {g: [r for r in runs if r.point["group"] == g] for g in ("python", "docs")}
    assert all(len(v) == 6 for v in by_group.values())
    # the same sizes and budgets on each corpus: the same FLOPs per run
    assert sorted(r.flops for r in by_group["python"]) == sorted(r.flops for r in by_group["docs"])
