"""`scalelab export --format hf`: transformers loads the directory and its logits equal scalelab's."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scalelab.serve.loading import load_run
from scalelab.spec import RunSpec
from scalelab.train.run import run_training

transformers = pytest.importorskip("transformers")
torch.set_num_threads(1)


#: every multiplier a parametrization sets is ≠ 1 here (depth-μP off its base shape, α_out ≠ 1), so the
#: export must fold each of them; tied and untied readouts, GQA.
CASES = {
    "gpt2-depth_mup-tied": {"family": "gpt2", "tie_embeddings": True},
    "gpt2-sp-untied": {"family": "gpt2", "tie_embeddings": False, "parametrization": "sp"},
    "llama-depth_mup-gqa": {"family": "llama", "tie_embeddings": False, "n_kv_heads": 2},
    "llama-mup-tied": {"family": "llama", "tie_embeddings": True, "parametrization": "mup"},
}


@pytest.mark.parametrize(
    "case",
    [
        "gpt2-depth_mup-tied",
        pytest.param("gpt2-sp-untied", marks=pytest.mark.slow),
        "llama-depth_mup-gqa",
        pytest.param("llama-mup-tied", marks=pytest.mark.slow),
    ],
)
def test_exported_model_matches_scalelab(tmp_path: Path, tiny_corpus: Path, case: str) -> None:
    model = {
        "width": 32,
        "depth": 2,
        "n_heads": 4,
        "context_tokens": 32,
        "parametrization": "depth_mup",
        "base_width": 16,
        "base_depth": 1,
        "output_multiplier": 2.0,
        **CASES[case],
    }
    spec = RunSpec.model_validate(
        {
            "model": model,
            "data": {
                "sources": [{"kind": "text", "path": str(tiny_corpus)}],
                "heldout_fraction": 0.2,
                "shard_tokens": 65536,
            },
            "train": {"tokens": 32 * 4 * 6, "global_batch_size": 4, "lr": 1e-2, "eval_tokens": 256},
            "execution": {"threads": 1, "checkpoint_interval_steps": 3},
        }
    )
    run_dir = tmp_path / "run"
    assert run_training(spec, run_dir)["status"] == "done"
    out = tmp_path / "hf"
    res = subprocess.run(
        [sys.executable, "-m", "scalelab", "export", str(run_dir), "--format", "hf", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}

    ours = load_run(run_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    text = "def f(x):\n    return x ** 2  # héllo"
    ids = tokenizer(text)["input_ids"]
    assert ids == ours.tokenizer.encode(text).tolist() and tokenizer.decode(ids) == text
    idx = torch.tensor([ids[:32]])
    with torch.no_grad():
        expected = ours.model(idx)
        got = hf(idx).logits
    print(
        f"\n{case}: max |logit diff| {(got - expected).abs().max().item():.2e}, max |logit| {expected.abs().max().item():.2f}"
    )
    assert (got - expected).abs().max().item() <= 1e-4


def test_export_refuses_unknown_format(tmp_path: Path) -> None:
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "scalelab",
            "export",
            str(tmp_path),
            "--format",
            "onnx",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2 and "--format: expected one of hf" in res.stderr
