"""`study advise`: candidates ranked by the expected shrink of the target's calibrated interval per FLOP,
the chosen runs written as a list design, the sample-size answer, and backtests of both (slow)."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console
from typer.testing import CliRunner

from scalelab.cli import app
from scalelab.cli_study import advise_view
from scalelab.fit.synthetic import chinchilla_loss, grid_design, simulate
from scalelab.registry import Registry
from scalelab.spec import study_from_dict
from scalelab.study.advise import (
    Candidate,
    FitSettings,
    Scored,
    half_width,
    ladder_candidates,
    sample_size,
    score_candidates,
    target_width,
)
from scalelab.study.advise_check import sample_size_trial, simulated_trial, win_rate
from scalelab.study.advise_study import advise_study, choose
from scalelab.study.plan import expand_runs

TRUTH = {"E": 1.2, "A": 40.0, "B": 60.0, "alpha": 0.32, "beta": 0.3}


def _study_dir(root: Path, truths: dict[str, dict[str, float]] | None = None, **extra: object) -> Path:
    """A grid study (3 widths × 3 token budgets) whose runs 'finished' with losses from TRUTH (or, for a
    grouped study, from `truths[group]`)."""
    data = {
        "name": "adv",
        "train": {"tokens": 65536},
        "design": {
            "kind": "grid",
            "axes": {"model.width": [32, 64, 128], "train.tokens": [65536, 262144, 1048576]},
        },
        "target": {"compute_flops": 1e14},
        **extra,
    }
    spec = study_from_dict({"study": data})
    d = root / "study"
    d.mkdir(parents=True)
    (d / "study.json").write_text(spec.model_dump_json())
    rng = np.random.default_rng(0)
    with Registry(d / "registry.sqlite") as reg:
        for r in expand_runs(spec):
            truth = truths[r.point["group"]] if truths else TRUTH
            loss = float(chinchilla_loss(truth, r.n_params, r.tokens)) * float(
                np.exp(0.01 * rng.standard_normal())
            )
            reg.add_planned(r.run_id, r.spec.canonical_json(), "h", point=r.point)
            reg.record_result(
                r.run_id,
                {
                    "status": "done",
                    "n_params": r.n_params,
                    "n_params_total": r.n_params_total,
                    "tokens": r.tokens,
                    "flops": r.flops,
                    "eval_loss": loss,
                    "final_train_loss": loss,
                },
            )
    return d


def test_advise_ranks_candidates_and_writes_a_list_design(tmp_path: Path) -> None:
    d = _study_dir(tmp_path)
    advice = advise_study(d, budget_flops=None, draws=1, width=0.5)
    per_flop = [s.shrink_per_flop for s in advice.ranked]
    assert per_flop == sorted(per_flop, reverse=True)
    assert advice.chosen and all(s.shrink > 0 for s in advice.chosen)
    design = tomllib.loads(advice.design_path.read_text())["advice"]
    runs = [run for table in design for run in table["runs"]]
    assert len(runs) == len(advice.chosen)
    assert all(table["kind"] == "list" for table in design)
    # the written overrides plan into valid runs of the study
    spec = study_from_dict({"study": {**json.loads((d / "study.json").read_text()), "design": design[0]}})
    assert len(expand_runs(spec)) == len(design[0]["runs"])
    assert advice.sample is not None and advice.sample.goal_half_width == 0.5


def test_advise_cli_json_keeps_within_the_budget(tmp_path: Path) -> None:
    d = _study_dir(tmp_path)
    res = CliRunner().invoke(app, ["study", "advise", str(d), "--draws", "0", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["target_flops"] == 1e14 and out["ranked"] and out["chosen"]
    ranked = [
        Scored(
            Candidate(r["N"], r["D"], r["flops"], r["label"]),
            r["width_before"],
            r["width_after"],
            r["shrink"],
        )
        for r in out["ranked"]
    ]
    budget = min(s.candidate.flops for s in ranked if s.shrink > 0) * 1.01
    chosen = choose(ranked, budget, top=3)
    assert chosen and sum(s.candidate.flops for s in chosen) <= budget
    assert len(choose(ranked, None, top=2)) == 2


def test_advise_on_a_directory_that_is_no_study_exits_2(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "scalelab", "study", "advise", str(tmp_path)], capture_output=True, text=True
    )
    assert proc.returncode == 2 and "study.json" in proc.stderr and "Traceback" not in proc.stderr


def test_a_run_nearer_the_target_shrinks_the_interval_more_than_a_replicate() -> None:
    N, D = grid_design(np.geomspace(1e7, 6e7, 3), (5, 20, 80))
    table = simulate(TRUTH, N, D, noise=0.01, seed=3)
    ladder = ladder_candidates(table)
    biggest = max(ladder, key=lambda c: c.flops)
    scored = {s.candidate.label: s for s in score_candidates(table, [biggest, ladder[-1]], 1e21, draws=0)}
    assert ladder[-1].label == "replicate"
    assert scored[biggest.label].shrink > scored["replicate"].shrink > -1e-3


def test_sample_size_answers_a_reachable_width() -> None:
    N, D = grid_design(np.geomspace(1e7, 6e7, 3), (5, 20, 80))
    table = simulate(TRUTH, N, D, noise=0.01, seed=3)
    now = half_width(target_width(FitSettings().fit(table), 1e21))
    goal = now / 2
    ss = sample_size(table, 1e21, goal, iterations=1, draws=4)
    assert ss.half_width_now == pytest.approx(now)
    assert ss.reachable and len(ss.runs) == 3
    assert ss.half_width_expected <= goal and table.C.max() < ss.rung_flops < 1e21
    lo, hi = ss.half_width_range
    assert lo <= ss.half_width_expected <= hi  # the median of the simulated outcomes, inside their range


SOURCES = {"a": [{"kind": "text", "path": "x/a"}], "b": [{"kind": "text", "path": "x/b"}]}


def test_a_grouped_study_is_advised_per_group_and_ranked_across_groups(tmp_path: Path) -> None:
    # group b's law is steeper in D: its runs are far from b's target in a way a's are not
    truths = {"a": TRUTH, "b": {**TRUTH, "B": 400.0, "beta": 0.4}}
    d = _study_dir(tmp_path, truths, sources=SOURCES)
    advice = advise_study(d, draws=1)
    assert advice.group is None and advice.groups == ["a", "b"]
    assert {s.candidate.group for s in advice.ranked} == {"a", "b"}
    per_flop = [s.safe_shrink_per_flop for s in advice.ranked]
    assert per_flop == sorted(per_flop, reverse=True)
    # each group is scored against its own interval: the widths before differ by group
    now = advice.width_now()
    assert set(now) == {"a", "b"} and now["a"] != now["b"]
    text = advice.design_path.read_text()
    for s in advice.chosen:
        assert f'# group "{s.candidate.group}"' in text
    out = advice.to_dict()
    assert out["groups"] == ["a", "b"] and all(r["group"] in ("a", "b") for r in out["ranked"])
    assert all(r["label"].startswith(f"[{r['group']}]") for r in out["ranked"])
    console = Console(record=True, width=160)
    console.print(advise_view(advice))
    shown = console.export_text()
    assert "[a] width" in shown and "[b] width" in shown  # the group label is text, not rich markup
    assert "now a ±" in shown and ", b ±" in shown

    only_b = advise_study(d, draws=1, group="b")
    assert only_b.group == "b" and {s.candidate.group for s in only_b.ranked} == {"b"}
    # the same group's candidates score the same alone as when ranked with the other group's
    across = {s.candidate.label: s.shrink for s in advice.ranked if s.candidate.group == "b"}
    assert {s.candidate.label: s.shrink for s in only_b.ranked} == pytest.approx(across)


def test_group_by_advice_pins_the_groups_axis_value(tmp_path: Path) -> None:
    d = _study_dir(
        tmp_path,
        {"1": TRUTH, "2": {**TRUTH, "E": 1.4}},
        group_by="model.depth",
        design={
            "kind": "grid",
            "axes": {
                "model.width": [32, 64, 128],
                "train.tokens": [65536, 262144, 1048576],
                "model.depth": [1, 2],
            },
        },
    )
    advice = advise_study(d, draws=1, group="2")
    assert advice.chosen
    assert all(s.candidate.overrides["model.depth"] == 2 for s in advice.ranked)
    design = tomllib.loads(advice.design_path.read_text())["advice"]
    assert all(run["model.depth"] == 2 for table in design for run in table["runs"])


def test_advise_with_an_unknown_group_exits_2_naming_the_flag(tmp_path: Path) -> None:
    d = _study_dir(tmp_path, {"a": TRUTH, "b": TRUTH}, sources=SOURCES)
    plain = _study_dir(tmp_path / "plain")
    for study, words in ((d, ("'c'", "groups: a, b")), (plain, ("no groups",))):
        proc = subprocess.run(
            [sys.executable, "-m", "scalelab", "study", "advise", str(study), "--group", "c"],
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 2 and "--group" in proc.stderr, proc.stderr
        assert all(w in proc.stderr for w in words) and "Traceback" not in proc.stderr, proc.stderr


@pytest.mark.slow
def test_sample_size_answer_reaches_the_asked_width_in_simulation() -> None:
    """Following the answer (the rung run with the true law, 4 noise draws each, seeds 0–19: the
    benchmark's set) reaches the asked half-width in the median within ±15 % (measured 0.98) and within
    ±25 % in at least half of the draws (measured 58 %; the previous method 26 %). Not in every study:
    the pilot's miss at the rung, which only the rung reveals, scatters single studies (docs/studies.md)."""
    results = [sample_size_trial(seed) for seed in range(20)]
    ratios = np.array([r["ratios"] for r in results if r["reachable"]])
    assert len(ratios) >= 18
    assert abs(float(np.median(ratios)) - 1) <= 0.15, ratios
    assert float(np.mean(np.abs(ratios - 1) <= 0.25)) >= 0.5, ratios
    # the rung's own noise is not what scatters them: draws of one design stay close
    assert float(np.median(ratios.std(axis=1))) <= 0.2, ratios


@pytest.mark.slow
def test_top_suggestion_beats_the_median_candidate_in_80_percent_of_50_simulated_studies() -> None:
    rate = win_rate([simulated_trial(seed) for seed in range(50)])
    assert rate["studies"] == 50 and rate["win_rate"] >= 0.8, rate


@pytest.mark.slow
def test_n_opt_top_suggestion_beats_a_random_pick_in_simulated_studies() -> None:
    """Target N_opt (bootstrap of 64 per refit): measured 33 of 48 wins (0.69; 2 studies declined: no
    finite N_opt interval), against 0.50 for a random pick; below the loss target's 80 % (docs/studies.md).
    Tolerance: at least 0.6 of the studies advised."""
    from scalelab.errors import FitError

    trials = []
    for seed in range(50):
        try:
            trials.append(simulated_trial(seed, settings=FitSettings(bootstrap=64), quantity="N_opt"))
        except FitError:
            continue
    rate = win_rate(trials)
    assert rate["studies"] >= 45 and rate["win_rate"] >= 0.6, rate


REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "chinchilla_epoch.csv"


@pytest.mark.slow
@pytest.mark.skipif(not REFERENCE.is_file(), reason="../shared/reference/chinchilla_epoch.csv is absent")
def test_top_suggestion_beats_the_median_candidate_on_chinchillas_measured_runs() -> None:
    """Pilots of 14 runs from the lower half of Chinchilla's compute; candidates among the measured runs
    above them, their published losses the truth (measured: 14 of 15)."""
    from scalelab.fit.reference import chinchilla_epoch
    from scalelab.study.advise_check import reference_trial

    table = chinchilla_epoch(REFERENCE)
    rate = win_rate([reference_trial(table, seed) for seed in range(15)])
    assert rate["win_rate"] >= 0.8, rate
