"""A study of Llama-style models, and one of the example's own model, run end to end (tiny sizes)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from scalelab.registry import Registry
from scalelab.spec import load_study
from scalelab.study.executors import LocalExecutor, run_study
from tiny_study import tiny_study

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize(
    ("family", "extra"),
    [
        ("llama", "n_kv_heads = 1\ntie_embeddings = false\n"),
        pytest.param("python:custom_model:build", "", marks=pytest.mark.slow),
        pytest.param("hf:llama", "n_kv_heads = 1\n", marks=pytest.mark.slow),
    ],
)
def test_a_tiny_study_runs_end_to_end(
    tmp_path: Path, tiny_corpus: Path, monkeypatch: pytest.MonkeyPatch, family: str, extra: str
) -> None:
    if family.startswith("hf:"):
        pytest.importorskip("transformers")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(EXAMPLES), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.syspath_prepend(str(EXAMPLES))
    text = tiny_study(
        "fam",
        "[study.train]\ntokens = 1024\nglobal_batch_size = 4\nlr = 1e-2\n"
        "eval_interval_steps = 8\neval_tokens = 256\nthreads = 1\n"
        '[study.design]\nkind = "grid"\n[study.design.axes]\n"model.width" = [8, 16]\n',
    )
    text = text.replace("context_tokens = 16\n", f'context_tokens = 16\nfamily = "{family}"\n{extra}')
    spec = tmp_path / "study.toml"
    spec.write_text(text.format(corpus=tiny_corpus))
    result = run_study(load_study(spec), tmp_path / "out", executor=LocalExecutor(parallel=1))
    assert [o.status for o in result.outcomes] == ["done", "done"]
    with Registry(tmp_path / "out" / "registry.sqlite") as reg:
        rows = reg.runs(status="done")
    for row in rows:
        assert json.loads(row["config_json"])["model"]["family"] == family
        assert row["eval_loss"] is not None and math.isfinite(row["eval_loss"]) and row["eval_loss"] < 5.6
