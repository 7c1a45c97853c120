"""Pre-registered hypotheses are judged by whole intervals, never by point estimates alone."""

from __future__ import annotations

import pytest

from scalelab.report.hypotheses import evaluate

FIT = {
    "fit": {
        "params": {"alpha": 0.34, "beta": 0.28, "E": 1.7},
        "intervals": {"alpha": [0.30, 0.38], "beta": [0.1, 0.5]},
        "derived": {"a": 0.45},
        "derived_intervals": {"a": [0.41, 0.49]},
    },
    "recommendation": {"N_opt": 1e9, "intervals": {"N_opt": [5e8, 2e9]}},
}


@pytest.mark.parametrize(
    ("hypothesis", "outcome"),
    [
        ("alpha > 0.2", "supported"),
        ("alpha < 0.2", "contradicted"),
        ("beta > 0.3", "inconclusive"),
        ("a between 0.4 and 0.6", "supported"),
        ("a between 0.6 and 0.9", "contradicted"),
        ("N_opt >= 1e8", "supported"),
        ("E > 1.5", "holds at the point estimate"),
        ("gamma > 1", "cannot evaluate"),
        ("bigger models are better", "not machine-checkable"),
    ],
)
def test_outcomes(hypothesis: str, outcome: str) -> None:
    assert evaluate(hypothesis, FIT).startswith(outcome) or outcome in evaluate(hypothesis, FIT)


def test_without_a_fit() -> None:
    assert evaluate("alpha > 0.2", None).startswith("not evaluated yet")
