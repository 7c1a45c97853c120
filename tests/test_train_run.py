"""run_training end to end on a real token store (data/ + BlockLoader), and the example config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from scalelab.spec import RunSpec, load_run
from scalelab.train.checkpoint import list_checkpoints
from scalelab.train.run import exit_code, run_training

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SCALELAB_CACHE_DIR", str(tmp_path / "cache"))


def _corpus(tmp_path: Path) -> Path:
    d = tmp_path / "corpus"
    d.mkdir()
    for i, f in enumerate(sorted((ROOT / "src" / "scalelab").rglob("*.py"))[:30]):
        (d / f"doc{i:03d}.txt").write_text(f.read_text())
    return d


def _spec(corpus: Path, steps: int = 9) -> RunSpec:
    return RunSpec.model_validate(
        {
            "model": {"width": 32, "depth": 2, "n_heads": 4, "context_tokens": 32},
            "data": {
                "sources": [{"kind": "text", "path": str(corpus)}],
                "heldout_fraction": 0.1,
                "shard_tokens": 65536,
            },
            "train": {
                "tokens": 32 * 4 * steps,
                "global_batch_size": 4,
                "micro_batch_size": 2,
                "threads": 1,
                "eval_interval_steps": 4,
                "eval_tokens": 512,
                "checkpoint_interval_steps": 3,
                "keep_checkpoints": 3,
            },
        }
    )


def test_real_store_run_and_resume_from_previous_checkpoint(tmp_path):
    spec = _spec(_corpus(tmp_path))
    ref = run_training(spec, tmp_path / "ref")
    assert ref["status"] == "done", ref["error"]
    assert exit_code(ref) == 0 and ref["n_params_total"] > ref["n_params"]
    prov = json.loads((tmp_path / "ref" / "provenance.json").read_text())
    assert prov["config_hash"] == ref["config_hash"]
    out = tmp_path / "run"
    run_training(spec, out)
    # drop the newest checkpoint: the run resumes the BlockLoader from step 6 and replays 7..9 exactly
    latest = list_checkpoints(out / "checkpoint")[-1][1]
    (latest / "state.json").write_text("{}")
    rec = run_training(spec, out, resume=True)
    assert rec["status"] == "done"
    assert (out / "metrics.jsonl").read_text().count("\n") == (
        tmp_path / "ref" / "metrics.jsonl"
    ).read_text().count("\n")
    strip = lambda p: [  # noqa: E731
        {k: v for k, v in json.loads(x).items() if k in ("step", "loss", "eval_loss", "lr", "grad_norm")}
        for x in p.read_text().splitlines()
    ]
    assert strip(out / "metrics.jsonl") == strip(tmp_path / "ref" / "metrics.jsonl")
    assert rec["eval_loss"] == ref["eval_loss"]


def test_vocab_too_small_fails_cleanly(tmp_path):
    spec = _spec(_corpus(tmp_path))
    spec = RunSpec.model_validate(
        {**spec.model_dump(), "model": {**spec.model.model_dump(), "vocab_size": 100}}
    )
    rec = run_training(spec, tmp_path / "run")
    assert rec["status"] == "failed" and "vocab_size=100" in rec["error"]


def test_example_run_tiny_is_valid():
    spec = load_run(ROOT / "examples" / "run_tiny.toml")
    steps = spec.train.tokens // (spec.train.global_batch_size * spec.model.context_tokens)
    assert steps == 200 and spec.train.checkpoint_interval_steps < steps


def test_mfu_is_at_most_one_on_every_logged_step_of_a_cpu_run(tmp_path):
    spec = _spec(_corpus(tmp_path), steps=6)
    spec = spec.model_copy(
        update={
            "model": spec.model.model_copy(update={"width": 128, "context_tokens": 64}),
            "train": spec.train.model_copy(
                update={
                    "tokens": 64 * 8 * 6,
                    "global_batch_size": 8,
                    "micro_batch_size": 8,
                    "log_interval_steps": 1,
                }
            ),
        }
    )
    rec = run_training(spec, tmp_path / "run")  # SCALELAB_STRICT_MFU (conftest): an MFU > 1 raises
    assert rec["status"] == "done", rec["error"]
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    mfus = [r["mfu"] for r in rows if "loss" in r]
    assert len(mfus) == 6 and all(0.0 < m <= 1.0 for m in mfus), mfus
