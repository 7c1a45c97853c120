"""The report's decision: a recommended run that `scalelab train` accepts and trains, next actions a lead can
act on, anomaly flags, and which N (total or non-embedding) every number counts."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest

from report_fixtures import TRUTH
from scalelab.fit.synthetic import chinchilla_loss
from scalelab.models.flops import ModelShape
from scalelab.registry import Registry
from scalelab.report.anomalies import find_anomalies, loss_spikes
from scalelab.report.decision import ScalingRule, shape_for_params
from scalelab.report.toml_out import dumps
from scalelab.spec import ModelSpec, RunSpec, load_run, run_from_dict
from scalelab.units import count, flops

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _study_with_configs(root: Path, corpus: Path, spike_in: str | None = None) -> Path:
    """A study of real tiny run configs (widths 16–64, 1 block, byte tokenizer, a text corpus) whose
    'finished' losses follow TRUTH; its target is 4× the largest run's compute."""
    study = root / "study"
    (study / "report").mkdir(parents=True)
    base = {
        "model": {"n_heads": 2, "width": 16, "depth": 1, "context_tokens": 16},
        "data": {
            "sources": [{"kind": "text", "path": str(corpus)}],
            "heldout_fraction": 0.2,
            "shard_tokens": 4096,
        },
        "train": {"global_batch_size": 8, "lr": 3e-3, "threads": 1, "eval_tokens": 512},
    }
    rng = np.random.default_rng(0)
    c_max = 0.0
    with Registry(study / "registry.sqlite") as reg:
        for width in (16, 32, 48, 64):
            for tokens in (2048, 4096, 8192):
                data = json.loads(json.dumps(base))
                data["model"]["width"], data["train"]["tokens"] = width, tokens
                spec = run_from_dict(data)
                shape = ModelShape.from_spec(spec.model, 257)
                n = shape.non_embedding_params
                loss = float(chinchilla_loss(TRUTH, n, tokens)) * float(np.exp(rng.normal(0, 0.003)))
                run_dir = study / "runs" / spec.run_id
                run_dir.mkdir(parents=True)
                metrics = [{"step": s, "tokens": 128 * s, "loss": 3.0 - 0.01 * s} for s in range(1, 30)]
                if spec.run_id == spike_in or (spike_in == "first" and width == 16 and tokens == 2048):
                    metrics[20]["loss"] = 7.3
                (run_dir / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
                reg.add_planned(spec.run_id, spec.canonical_json(), spec.run_id, run_dir=str(run_dir))
                c = shape.training_flops(tokens)
                c_max = max(c_max, c)
                reg.record_result(
                    spec.run_id,
                    {
                        "status": "done",
                        "n_params": n,
                        "n_params_total": shape.total_params,
                        "tokens": tokens,
                        "flops": c,
                        "eval_loss": loss,
                        "final_train_loss": loss,
                        "wall_seconds": 2.0,
                    },
                )
    meta = {
        "name": "decide",
        "fit": {"loss": "eval", "bootstrap": 20},
        "target": {"compute_flops": 4 * c_max},
    }
    (study / "study.json").write_text(json.dumps({**meta, **base}))
    return study


@pytest.fixture
def decided(tmp_path: Path, tiny_corpus: Path) -> Path:
    from scalelab.fit.api import fit_source
    from scalelab.report.html import build_report

    study = _study_with_configs(tmp_path, tiny_corpus, spike_in="first")
    fit_source(study, bootstrap=20, compare=False).save(study / "report" / "fit.json")
    build_report(study, usd_per_hour=2.5)
    return study


def test_recommended_run_is_written_shown_and_trains(decided: Path, tmp_path: Path) -> None:
    path = decided / "report" / "recommended_run.toml"
    spec = load_run(path)  # validates as a run spec
    fit = json.loads((decided / "report" / "fit.json").read_text())
    rec = fit["recommendation"]
    shape = ModelShape.from_spec(spec.model, 257)
    # the study scaled width with 2 heads and 1 block: so does the recommended run, at the N the fit chose
    assert (spec.model.depth, spec.model.n_heads) == (1, 2)
    assert abs(np.log(shape.non_embedding_params / rec["N_opt"])) < 0.35
    step_tokens = spec.train.global_batch_size * spec.model.context_tokens
    assert abs(spec.train.tokens - rec["D_opt"]) <= step_tokens / 2 + 1
    assert spec.train.checkpoint_interval_steps >= 1 and spec.train.eval_interval_steps >= 1
    text = path.read_text()
    assert (
        f"{count(shape.total_params)} parameters in total ({count(shape.non_embedding_params)} non-embedding)"
        in text
    )
    page = (decided / "report" / "index.html").read_text()
    assert 'download="recommended_run.toml"' in page and "Recommended run" in page
    assert "forecast cost" in page and "$" in page  # 2.5 $/h × the forecast hours
    summary = json.loads((decided / "report" / "summary.json").read_text())
    assert summary["recommended_run"]["toml"] == text
    # `scalelab train` accepts it as written and trains it (tiny: the fit's target is tiny)
    out = tmp_path / "big"
    proc = subprocess.run(
        [sys.executable, "-m", "scalelab", "train", str(path), "--out", str(out), "--set", "train.threads=1"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": SRC},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads((out / "record.json").read_text())
    assert record["status"] == "done"
    assert record["n_params"] == shape.non_embedding_params and record["tokens"] == spec.train.tokens


def test_decision_section_flags_and_actions(decided: Path) -> None:
    page = (decided / "report" / "index.html").read_text()
    summary = json.loads((decided / "report" / "summary.json").read_text())
    spikes = [a for a in summary["anomalies"] if a["kind"] == "spike"]
    assert len(spikes) == 1 and spikes[0]["loss"] == 7.3 and spikes[0]["step"] == 21
    assert "loss spike" in page  # the runs table's flag column
    actions = summary["next_actions"]
    assert actions and all(a.endswith(".") for a in actions)
    assert any("spiked to 7.3 at step 21" in a for a in actions)
    # a 4× extrapolation is not flagged; the seeds are not replicated, so the spread is an action
    assert any("seeds = [0, 1]" in a for a in actions)
    assert "N non-embedding" in page and "N total" in page  # both columns, named
    assert (
        'id="loss-vs-compute"' in page and (decided / "report" / "loss-vs-compute.png").stat().st_size > 1000
    )
    text = page.split('id="sec-loss-curves"')[0]  # the decision and the runs, less images and the TOML text
    text = re.sub(r'"data:[^"]*"|<pre class=toml>.*?</pre>', "", text, flags=re.S)
    assert not re.search(r"\de[+-]\d", text)  # no e-notation there (FLOPs are written 1e14, not 1e+14)


def test_actions_name_runs_to_add_when_the_target_is_far(tmp_path: Path, tiny_corpus: Path) -> None:
    from scalelab.fit.api import fit_source
    from scalelab.report.summary import summarize

    study = _study_with_configs(tmp_path, tiny_corpus)
    meta = json.loads((study / "study.json").read_text())
    meta["target"]["compute_flops"] *= 1000 / 4  # 1000× the largest run
    (study / "study.json").write_text(json.dumps(meta))
    fit_source(study, bootstrap=20, compare=False).save(study / "report" / "fit.json")
    s = summarize(study)
    far = [a for a in s.actions if "the largest run's compute: add a run at N≈" in a]
    assert len(far) == 1 and "to cut the extrapolation to 32×" in far[0], s.actions


def test_shape_search_follows_the_study_and_lands_nearest() -> None:
    base = ModelSpec(n_heads=4, width=128, depth=2)
    for target in (2e5, 3e6, 1.2e9):
        m = shape_for_params(
            base, 257, target, total=False, rule=ScalingRule(width=True, depth=False, fixed_heads=True)
        )
        assert (m.depth, m.n_heads) == (2, 4) and m.width % 8 == 0
        n = ModelShape.from_spec(m, 257).non_embedding_params
        for other in (m.width - 8, m.width + 8):  # its neighbours are no closer
            n2 = ModelShape.from_spec(m.model_copy(update={"width": other}), 257).non_embedding_params
            assert abs(np.log(n / target)) <= abs(np.log(n2 / target))
    m = shape_for_params(
        base, 257, 1e8, total=True, rule=ScalingRule(width=True, depth=True, fixed_heads=False)
    )
    assert m.width // m.n_heads == 32 and abs(m.width / m.depth - 64) < 8  # head size and aspect kept


def test_loss_spikes_and_off_fit_runs() -> None:
    steps = [{"step": i, "tokens": 100 * i, "loss": 3.0 - 0.01 * i} for i in range(40)]
    assert loss_spikes(steps) == []
    steps[25]["loss"] = 7.3
    (spike,) = loss_spikes(steps)
    assert spike["step"] == 25 and spike["loss"] == 7.3
    runs = [
        {"run_id": f"r{i}", "status": "done", "n_params": n, "tokens": 1e6, "eval_loss": 2.0 + 0.001 * i}
        for i, n in enumerate([1e5, 2e5, 4e5, 8e5, 1.6e6])
    ]
    runs[2]["eval_loss"] = 2.3  # 15 % above a flat fit
    runs.append({"run_id": "bad", "status": "diverged", "error": "loss 41.2 > 10 × best"})
    found = find_anomalies(runs, lambda r: [], lambda n, d: np.full_like(n, 2.0), "eval_loss", "n_params")
    kinds = {(a.run_id, a.kind) for a in found}
    assert kinds == {("r2", "off-fit"), ("bad", "diverged")}
    assert all(a.action for a in found)


def test_toml_writer_round_trips_a_run_spec() -> None:
    spec = run_from_dict(
        {
            "data": {"sources": [{"kind": "jsonl", "path": "a b.jsonl", "field": "text"}]},
            "train": {"batch_schedule": [[0, 16], [100_000, 32]], "sinks": ["tensorboard"], "lr": 1e-3},
        }
    )
    text = dumps(json.loads(spec.canonical_json()), header="hello\nworld", comments={"train.lr": "tuned"})
    assert text.startswith("# hello\n# world\n") and "lr = 0.001  # tuned" in text
    assert (
        run_from_dict(tomllib.loads(text)).run_id
        == spec.run_id
        == RunSpec.model_validate(spec.model_dump()).run_id
    )


def test_human_readable_numbers() -> None:
    assert (count(1.23e9), count(44_500), count(7)) == ("1.23B", "44.5k", "7")
    assert (flops(3.4e20), flops(1e14)) == ("3.4e20 FLOPs", "1e14 FLOPs")
