"""The benchmark harness: every result line carries the harness fields; every benchmark's docstring names
its baseline; a served side answers rounds from a long-lived child process."""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def harness():
    spec = importlib.util.spec_from_file_location("bench_harness", BENCH / "harness.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


@pytest.mark.parametrize("script", sorted(p.name for p in BENCH.glob("bench_*.py")))
def test_docstring_states_the_baseline(script):
    doc = (ast.get_docstring(ast.parse((BENCH / script).read_text())) or "").lower()
    assert "baseline" in doc, f"{script}: the docstring does not name its baseline"
    assert "fair" in doc or "the same" in doc, (
        f"{script}: the docstring does not say why the baseline is fair"
    )


def test_every_kind_of_result_has_the_harness_fields(harness):
    def side():
        return harness.Sample(10.0, 0.5, 0.25)

    results = [
        harness.compare("a", side, lambda: side(), "tokens/s", rounds=3),
        harness.report("b", [1.0, 2.0], [2.0, 3.0], "x/s"),
        harness.measured("c", 3.0, 4.0, "MiB"),
        harness.measured("d", 3.0, 4.0, "s", values=[3.0, 2.0, 5.0], higher_is_better=False),
        harness.measured("e", 1.0, None, "-"),
    ]
    for r in results:
        assert harness.missing_fields(r) == [], r["name"]
    assert results[0]["rounds"] == 3 and results[0]["cpu_ratio"] == pytest.approx(1.0)
    assert (results[3]["value_min"], results[3]["value_median"], results[3]["value_max"]) == (2.0, 3.0, 5.0)
    assert harness.missing_fields({"name": "f", "value": 1.0, "baseline": 2.0}) == [
        f for f in harness.FIELDS if f not in ("name", "value", "baseline")
    ]
    assert harness.missing_fields(harness.skip("g", "no GPU")) == []


def test_served_side_answers_each_round_from_one_child(harness):
    child = (
        f"import os, sys; sys.path.insert(0, {str(BENCH)!r}); import harness; "
        "harness.serve_rounds(lambda: harness.Sample(float(os.getpid()), 0.5, 0.25))"
    )
    served = harness.ServedSide([sys.executable, "-c", child])
    try:
        samples = [served() for _ in range(3)]
    finally:
        served.close()
    assert len({s.work for s in samples}) == 1  # the same process every round
    assert samples[0].work == served.proc.pid and samples[0].wall == 0.5 and samples[0].cpu == 0.25
    assert served.proc.returncode == 0
