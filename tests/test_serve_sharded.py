"""Serve, quantize and distil from runs trained by 2 real ranks (torchrun, gloo) under DDP and FSDP.

The one loader (serve/loading.py) consolidates the DCP safetensors shards in one process after verifying
the manifest: the weights equal what the same 12 steps give in one process (float tolerance: all-reduce
sums in another order), and greedy generations equal those of the same weights written as a
single-process checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from scalelab.serve.distill import distill
from scalelab.serve.engine import Engine, Job
from scalelab.serve.loading import LoadedRun, load_run
from scalelab.serve.quantize import quantization_report
from scalelab.serve.sampling import SamplingParams
from scalelab.spec import config_hash
from scalelab.train.checkpoint import save_checkpoint
from scalelab.train.run import run_training
from test_dist_common import build_store, make_spec, torchrun, write_config

PROMPTS = ["def ", "import os\n", "class Loader:"]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("serve_sharded")


@pytest.fixture(scope="module")
def store(work) -> Path:
    return build_store(work)


@pytest.fixture(scope="module", autouse=True)
def _cache(work):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SCALELAB_CACHE_DIR", str(work / "cache"))
        yield


def _two_ranks(work: Path, store: Path, strategy: str) -> Path:
    out = work / strategy
    proc = torchrun(
        work, write_config(work / f"{strategy}.json", make_spec(store, strategy=strategy)), out, 2
    )
    assert proc.returncode == 0
    return out


@pytest.fixture(scope="module")
def single(work, store) -> LoadedRun:
    rec = run_training(make_spec(store, strategy="none"), work / "one")
    assert rec["status"] == "done", rec["error"]
    return load_run(work / "one")


def _generate(run: LoadedRun, max_tokens: int = 12) -> list[list[int]]:
    engine = Engine(run.model, max_batch=len(PROMPTS))
    jobs = [
        Job(
            "generate",
            [run.tokenizer.eod_id, *run.tokenizer.encode(p).tolist()],
            SamplingParams(max_tokens=max_tokens, temperature=0.0),
        )
        for p in PROMPTS
    ]
    engine.admit(jobs)
    while engine.active:
        engine.decode()
    return [list(j.generated) for j in jobs]


def _as_single_process_run(run: LoadedRun, dst: Path, store: Path) -> LoadedRun:
    """The same weights in a single-process run directory (strategy "none", model.safetensors)."""
    spec = make_spec(store, strategy="none")
    dst.mkdir(parents=True)
    (dst / "config.json").write_text(spec.canonical_json())
    save_checkpoint(
        dst / "checkpoint",
        step=run.step,
        model=run.model,
        tensor_state={},
        json_state={},
        config_hash=config_hash(spec),
    )
    return load_run(dst)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_rank_run_serves_quantizes_and_teaches(work, store, single, strategy):
    out = _two_ranks(work, store, strategy)
    run = load_run(out)
    assert run.step == 12 and (run.checkpoint / "weights").is_dir()
    for (name, got), ref in zip(
        run.model.state_dict().items(), single.model.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5, msg=name)
    same = _as_single_process_run(run, work / f"{strategy}-as-one", store)
    assert (same.checkpoint / "model.safetensors").is_file()
    assert _generate(run) == _generate(same)

    rep = quantization_report(out, "int8")
    assert rep["within_tolerance"] and rep["quantized_size_bytes"] < rep["fp32_size_bytes"]

    student = work / f"student-{strategy}.toml"
    student.write_text(
        "[model]\nwidth = 16\ndepth = 1\nn_heads = 2\ncontext_tokens = 16\n"
        "[train]\ntokens = 512\nglobal_batch_size = 8\nthreads = 1\neval_tokens = 128\n"
        "[distill]\ncompare_scratch = false\n"
    )
    report = distill(out, student, work / f"distilled-{strategy}")
    assert report["student_status"] == "done" and report["teacher_eval_loss"] is not None
