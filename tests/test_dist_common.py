"""Shared helpers for the distributed tests (real processes on gloo), and the fast unit tests of
train/distributed.py that need no second process: torchrun environment parsing, mesh shapes, param
groups by name through wrapping, spec validation, the torchrun command, the commit protocol's choice of
checkpoint.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from scalelab.errors import DistributedError, SpecError
from scalelab.spec import RunSpec, TrainSpec, run_from_dict

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]

#: a tiny run: width 32, depth 2, context 16, global batch 8, 12 steps, checkpoints every 3 steps; μP at
#: twice its base width, so hidden matrices train at half the LR — a wrapper that lost the optimizer
#: groups would not match the single-process run
BASE: dict[str, Any] = {
    "model": {
        "width": 32,
        "depth": 2,
        "n_heads": 4,
        "context_tokens": 16,
        "parametrization": "mup",
        "base_width": 16,
    },
    "train": {
        "tokens": 16 * 8 * 12,
        "global_batch_size": 8,
        "micro_batch_size": 2,
        "threads": 1,
        "eval_interval_steps": 6,
        "eval_tokens": 128,
        "checkpoint_interval_steps": 3,
        "keep_checkpoints": 5,
        "strategy": "ddp",
    },
}


def build_store(root: Path) -> Path:
    """A small real token store (byte tokenizer) from scalelab's own sources; returns its path."""
    from scalelab.data.store import ensure_store
    from scalelab.spec import DataSpec, SourceSpec

    corpus = root / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(sorted((ROOT / "src" / "scalelab").rglob("*.py"))[:20]):
        (corpus / f"doc{i:03d}.txt").write_text(f.read_text())
    spec = DataSpec(
        sources=[SourceSpec(kind="text", path=str(corpus))], heldout_fraction=0.1, shard_tokens=65536
    )
    return ensure_store(spec, cache_dir=root / "cache").path


def make_spec(store: Path, *, model: dict[str, Any] | None = None, **train: Any) -> RunSpec:
    """BASE on `store`, with `train` (and `debug=…`) set in [train] and `model` merged into [model]."""
    data = json.loads(json.dumps(BASE))
    data["data"] = {"store": str(store)}
    data["model"].update(model or {})
    data["train"].update(train)
    debug = data["train"].pop("debug", None)
    if debug:
        data["debug"] = debug
    return run_from_dict(data)


def write_config(path: Path, spec: RunSpec) -> Path:
    """The spec as a config.json that `scalelab train` reads."""
    path.write_text(spec.canonical_json())
    return path


def child_env(tmp: Path) -> dict[str, str]:
    from scalelab.train.parallel.launch import torchrun_env

    env = torchrun_env()
    env.update(
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        SCALELAB_CACHE_DIR=str(tmp / "cache"),
        SCALELAB_DIST_TIMEOUT_SECONDS="120",
        # examples/: the custom model family (python:custom_model:build) imports from there
        PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT / "examples"), env.get("PYTHONPATH", "")]),
    )
    return env


def torchrun(
    tmp: Path, config: Path, out: Path, nproc: int, *, max_restarts: int = 0, timeout: float = 240
) -> subprocess.CompletedProcess:
    """`python -m torch.distributed.run --nproc-per-node N … -m scalelab train CONFIG --out OUT`."""
    from scalelab.train.parallel.launch import torchrun_command

    argv = torchrun_command(config, out, nproc=nproc, max_restarts=max_restarts)
    proc = subprocess.run(
        argv, env=child_env(tmp), capture_output=True, text=True, timeout=timeout, check=False
    )
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-5000:] + proc.stderr[-10000:])
    return proc


def step_rows(out: Path) -> list[dict[str, Any]]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in step_rows(out)]


# ------------------------------------------------------------------------------- unit tests
def test_env_parsing_names_the_variable():
    from scalelab.train.distributed import DistEnv

    assert DistEnv.from_env({}) == DistEnv()
    env = DistEnv.from_env(
        {
            "RANK": "1",
            "WORLD_SIZE": "2",
            "LOCAL_RANK": "1",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": "29500",
        }
    )
    assert (env.rank, env.world_size, env.local_rank, env.launched) == (1, 2, 1, True)
    with pytest.raises(DistributedError, match="RANK=2"):
        DistEnv.from_env({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"})
    with pytest.raises(DistributedError, match="WORLD_SIZE='two'"):
        DistEnv.from_env({"RANK": "0", "WORLD_SIZE": "two"})
    with pytest.raises(DistributedError, match="MASTER_ADDR"):
        DistEnv.from_env({"RANK": "0", "WORLD_SIZE": "1"})
    with pytest.raises(DistributedError, match="WORLD_SIZE is not set"):
        DistEnv.from_env({"RANK": "0"})


def test_mesh_shape_and_backend():
    from scalelab.train.distributed import backend_for, mesh_shape

    assert mesh_shape(4, TrainSpec(strategy="fsdp", tensor_parallel=2)) == (1, 2, 2)
    with pytest.raises(DistributedError, match="tensor_parallel=2"):
        mesh_shape(3, TrainSpec(strategy="fsdp", tensor_parallel=2))
    assert backend_for(torch.device("cpu")) == "gloo"
    assert backend_for(torch.device("cuda", 0)) == "nccl"


def test_model_parallel_needs_fsdp():
    with pytest.raises(SpecError, match="train.tensor_parallel"):
        run_from_dict({"train": {"strategy": "ddp", "tensor_parallel": 2}})
    assert run_from_dict({"train": {"strategy": "fsdp", "tensor_parallel": 2}}).train.tensor_parallel == 2


def test_param_groups_survive_wrapping_by_name():
    """μP groups (different lr_mult per group) are carried by name through a wrapper that renames."""
    from scalelab.models.gpt import build_model
    from scalelab.models.parametrization import apply_parametrization
    from scalelab.spec import ModelSpec
    from scalelab.train.distributed import param_group_index, regroup

    spec = ModelSpec(width=32, depth=2, n_heads=4, context_tokens=16, parametrization="mup", base_width=16)
    model = build_model(spec, 64)
    groups = apply_parametrization(model, spec)
    index = param_group_index(model, groups)

    class Wrapper(torch.nn.Module):  # like DDP: parameters appear under "module."
        def __init__(self, m):
            super().__init__()
            self.module = m

    wrapped = regroup(Wrapper(model), groups, index)
    assert [g["name"] for g in wrapped] == [g["name"] for g in groups]
    assert [g["lr_mult"] for g in wrapped] == [g["lr_mult"] for g in groups]
    assert [len(g["params"]) for g in wrapped] == [len(g["params"]) for g in groups]
    assert wrapped[0]["lr_mult"] == 0.5  # hidden matrices at 2× the base width


def test_compile_for_training_keeps_the_wrapper_and_its_names():
    """train.compile: the trainer calls a compiled module over the same parameters; the wrapper (for
    grad_sync, norms and checkpoints) is untouched; pipeline stages compile each block in place."""
    from scalelab.models.gpt import build_model
    from scalelab.spec import ModelSpec
    from scalelab.train.distributed import compile_for_training

    model = build_model(ModelSpec(width=32, depth=3, n_heads=4, context_tokens=16), 64)
    names = list(model.state_dict())
    assert compile_for_training(model, TrainSpec(compile=False)) is model
    called = compile_for_training(model, TrainSpec(compile=True))
    assert called is not model and called._orig_mod is model
    assert list(model.state_dict()) == names
    assert [p for p in called.parameters()] == [p for p in model.parameters()]
    stage = compile_for_training(model, TrainSpec(compile=True), pipelined=True)
    assert stage is model and list(model.state_dict()) == names
    assert all(block._compiled_call_impl is not None for block in model.blocks)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compiled_ddp_and_fsdp_on_one_gpu_match_eager(tmp_path):
    """torchrun on one GPU (nccl, bf16): compiled DDP and FSDP follow the eager DDP losses."""
    store = build_store(tmp_path)
    runs = {"ddp": False, "ddp-compiled": True, "fsdp-compiled": True}
    outs = {}
    for name, compiled in runs.items():
        spec = make_spec(
            store, strategy=name.split("-")[0], device="cuda", precision="bf16", compile=compiled
        )
        outs[name] = tmp_path / name
        proc = torchrun(tmp_path, write_config(tmp_path / f"{name}.json", spec), outs[name], 1, timeout=600)
        assert proc.returncode == 0
    eager = losses(outs["ddp"])
    for name in ("ddp-compiled", "fsdp-compiled"):
        other = losses(outs[name])
        assert len(other) == len(eager) == 12
        assert all(abs(x - y) < 2e-2 for x, y in zip(eager, other, strict=True)), (name, eager, other)


def test_torchrun_command_and_cli(tmp_path):
    import typer
    from typer.testing import CliRunner

    from scalelab.train.commands import register
    from scalelab.train.parallel.launch import torchrun_command

    argv = torchrun_command("c.toml", "out", nproc=2, max_restarts=1, nnodes="1:2", overrides=["a.b=1"])
    assert argv[1:3] == ["-m", "torch.distributed.run"]
    assert argv[argv.index("--nnodes") + 1] == "1:2" and argv[argv.index("--max-restarts") + 1] == "1"
    assert argv[argv.index("--rdzv-endpoint") + 1].startswith("127.0.0.1:")
    assert argv[-2:] == ["--set", "a.b=1"]
    with pytest.raises(DistributedError, match="--nnodes"):
        torchrun_command("c.toml", "out", nproc=2, nnodes="2:x")

    app = typer.Typer()
    register(app)

    @app.command("noop")
    def _noop() -> None:  # a second command keeps typer from collapsing the app into `launch`
        pass

    cfg = tmp_path / "run.toml"
    cfg.write_text("[train]\nglobal_batch_size = 4\ntokens = 4096\n[model]\ncontext_tokens = 16\n")
    res = CliRunner().invoke(app, ["launch", str(cfg), "--out", "o", "--nproc", "3", "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "--nproc-per-node 3" in res.output and "execution.strategy=ddp" in res.output


def test_only_committed_checkpoints_are_chosen(tmp_path):
    """A temp dir being written (killed mid-save) and a step dir with a damaged manifest are skipped."""
    from scalelab.train.checkpoint import file_table, write_manifest
    from scalelab.train.parallel.checkpoint import latest_committed

    ckpt = tmp_path / "checkpoint"
    good = ckpt / "step-000003"
    (good / "weights").mkdir(parents=True)
    (good / "weights" / "shard-00001-model-00001-of-00001.safetensors").write_bytes(b"abc")
    (good / "state.json").write_text("{}")
    (good / "rng.safetensors").write_bytes(b"r")
    names = ["weights/shard-00001-model-00001-of-00001.safetensors", "state.json", "rng.safetensors"]
    manifest = {"format": "dcp", "format_version": 2, "step": 3, "config_hash": "h"}
    write_manifest(good / "manifest.json", {**manifest, "files": file_table(good, names)})
    (ckpt / ".tmp-step-000006-1-2" / "weights").mkdir(parents=True)  # the save the kill interrupted
    bad = ckpt / "step-000005"
    bad.mkdir()
    write_manifest(bad / "manifest.json", {**manifest, "step": 5, "files": file_table(good, names)})
    assert latest_committed(ckpt, "h") == good  # step 5's files are missing
    (good / "weights" / "shard-00001-model-00001-of-00001.safetensors").write_bytes(b"abd")  # bit flip
    assert latest_committed(ckpt, "h") is None


def test_fsdp_mixed_precision_policy():
    """bf16/fp16: parameters gathered in low precision, gradients reduced in fp32; fp32: no casts."""
    from scalelab.train.parallel.fsdp import mixed_precision_policy

    bf16 = mixed_precision_policy("bf16")
    assert bf16.param_dtype == torch.bfloat16 and bf16.reduce_dtype == torch.float32
    assert mixed_precision_policy("fp16").param_dtype == torch.float16
    assert mixed_precision_policy("fp32").param_dtype is None


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices (NCCL)")
def test_ddp_and_fsdp_on_two_gpus_with_nccl(tmp_path):
    """The CUDA path: nccl backend, cuda:LOCAL_RANK devices, bf16 FSDP; DDP and FSDP agree."""
    store = build_store(tmp_path)
    outs = {}
    for strategy in ("ddp", "fsdp"):
        spec = make_spec(store, strategy=strategy, device="cuda", precision="bf16")
        outs[strategy] = tmp_path / strategy
        proc = torchrun(tmp_path, write_config(tmp_path / f"{strategy}.json", spec), outs[strategy], 2)
        assert proc.returncode == 0
    a, b = losses(outs["ddp"]), losses(outs["fsdp"])
    assert len(a) == len(b) == 12 and all(abs(x - y) < 2e-2 for x, y in zip(a, b, strict=True))
