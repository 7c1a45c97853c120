"""Serving every model family the trainer supports: a trained run of each is loaded and its batched greedy
generations equal a plain greedy decode with the model's own full forward — through the KV cache for the
built-in gpt2 and llama, through the cache-less forward for user factories and `hf:` models."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from scalelab.models.gpt import GPT
from scalelab.serve._testing import train_tiny_run
from scalelab.serve.engine import Engine, Job
from scalelab.serve.loading import LoadedRun, load_run
from scalelab.serve.quantize import quantize_model
from scalelab.serve.sampling import SamplingParams
from scalelab.serve.server import InferenceServer, ServeConfig

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
FAMILIES = {
    "gpt2": ({"model.family": "gpt2"}, True),
    "llama": ({"model.family": "llama", "model.n_kv_heads": 2, "model.qk_norm": True}, True),
    "custom": ({"model.family": "python:custom_model:build"}, False),
    "hf-llama": ({"model.family": "hf:llama", "model.n_kv_heads": 2, "model.tie_embeddings": False}, False),
}
PROMPTS = ["def ", "import email.utils\n", "class Message:\n    x = "]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_run(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, LoadedRun]]:
    name = request.param
    if name.startswith("hf-"):
        pytest.importorskip("transformers")
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp(f"serve_{name}")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SCALELAB_CACHE_DIR", str(root / "cache"))
        mp.syspath_prepend(str(EXAMPLES))
        run_dir = train_tiny_run(root, **{**FAMILIES[name][0], "train.tokens": 8 * 64 * 15})
        yield name, load_run(run_dir)


def _prompt_ids(run: LoadedRun) -> list[list[int]]:
    return [[run.tokenizer.eod_id, *run.tokenizer.encode(p).tolist()] for p in PROMPTS]


def _engine_greedy(model: nn.Module, prompts: list[list[int]], n: int) -> tuple[list[list[int]], Engine]:
    engine = Engine(model, max_batch=len(prompts))
    jobs = [Job("generate", p, SamplingParams(max_tokens=n, temperature=0.0)) for p in prompts]
    engine.admit(jobs[:1])  # one alone first, the others join mid-decode: mixed positions in a batch
    engine.decode()
    engine.admit(jobs[1:])
    while engine.active:
        engine.decode()
    return [j.generated for j in jobs], engine


@torch.inference_mode()
def _plain_greedy(model: nn.Module, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt) :]


def test_greedy_generation_equals_full_forward_greedy(family_run: tuple[str, LoadedRun]) -> None:
    name, run = family_run
    prompts = _prompt_ids(run)
    got, engine = _engine_greedy(run.model, prompts, 10)
    assert engine.cached is FAMILIES[name][1]
    assert got == [_plain_greedy(run.model, p, 10) for p in prompts]


def test_quantized_model_keeps_its_decode_path(family_run: tuple[str, LoadedRun]) -> None:
    name, run = family_run
    model = quantize_model(run.model, "int8")
    prompts = _prompt_ids(run)
    got, engine = _engine_greedy(model, prompts, 6)
    assert engine.cached is FAMILIES[name][1]
    assert got == [_plain_greedy(model, p, 6) for p in prompts]


def test_served_through_the_inference_server(family_run: tuple[str, LoadedRun]) -> None:
    _, run = family_run
    server = InferenceServer(run, ServeConfig(max_batch=4, max_wait_ms=1.0))
    server.start()
    try:
        params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
        (c,) = asyncio.run(server.complete(PROMPTS[1], params))
    finally:
        server.stop()
    assert c.tokens == _plain_greedy(run.model, server.encode(PROMPTS[1]), 8)


class _Misread(GPT):
    """A GPT whose forward differs from its modules' (logits doubled): the GPT adapter would misread it."""

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        return 2.0 * super().forward(idx, targets)


def test_an_adapter_that_misreads_the_model_falls_back_to_the_full_forward(
    family_run: tuple[str, LoadedRun],
) -> None:
    name, run = family_run
    if name != "gpt2":
        pytest.skip("one family is enough")
    model = _Misread(run.model.shape)
    model.load_state_dict(run.model.state_dict())
    model.eval()
    prompts = _prompt_ids(run)
    got, engine = _engine_greedy(model, prompts, 5)
    assert not engine.cached
    assert got == [_plain_greedy(model, p, 5) for p in prompts]
