"""Adversarial checkpoints: nothing in a run directory is unpickled, every file a resume or a load reads is
covered by a SHA-256 in a manifest whose own hash verifies, and a damaged latest checkpoint falls back to
the previous good one — for single-process and sharded (DDP/FSDP, DCP) checkpoints alike.

The sharded runs here are worlds of one (strategy "ddp"/"fsdp" without torchrun: the same on-disk
format as N ranks, seconds to train); tests/test_serve_sharded.py covers 2 real ranks.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from scalelab.errors import CheckpointError
from scalelab.serve._testing import tiny_corpus, tiny_spec
from scalelab.serve.loading import load_run
from scalelab.spec import RunSpec, config_hash
from scalelab.train.checkpoint import file_table, list_checkpoints, load_latest, write_manifest
from scalelab.train.parallel.checkpoint import latest_committed
from scalelab.train.run import run_training

STEPS = 8


class _Marker:
    """Unpickling this creates a marker file: proof that a pickle from the run directory was executed."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (os.makedirs, (str(self.path),))


def _spec(corpus: Path, strategy: str) -> RunSpec:
    return tiny_spec(
        corpus,
        **{
            "train.tokens": 8 * 64 * STEPS,
            "train.checkpoint_interval_steps": STEPS // 2,
            "train.keep_checkpoints": 3,
            "train.strategy": strategy,
        },
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple[RunSpec, Path]]]:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("adv_ckpt")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SCALELAB_CACHE_DIR", str(root / "cache"))
        corpus = tiny_corpus(root)
        out = {}
        for strategy in ("none", "ddp", "fsdp"):
            spec = _spec(corpus, strategy)
            rec = run_training(spec, root / strategy, resume=False)
            assert rec["status"] == "done", rec["error"]
            out[strategy] = (spec, root / strategy)
        yield out


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _latest_step(spec: RunSpec, run: Path) -> int:
    ckpt = run / "checkpoint"
    if spec.train.strategy == "none":
        loaded = load_latest(ckpt, config_hash(spec))
        return loaded.step if loaded else 0
    path = latest_committed(ckpt, config_hash(spec))
    return int(path.name[5:]) if path else 0


def _files(step_dir: Path) -> list[Path]:
    return sorted(p for p in step_dir.rglob("*") if p.is_file())


@pytest.mark.parametrize("strategy", ["none", "ddp", "fsdp"])
def test_planted_pickle_in_any_checkpoint_file_is_never_executed(runs, strategy, tmp_path):
    """Every file of the newest checkpoint replaced by a pickle (and DCP's `.metadata` / `rng.pt` /
    `state.pt` names planted beside them), once with the manifest left alone and once with a manifest
    re-hashed by the attacker: resuming and serving never run the pickle."""
    spec, src = runs[strategy]
    pickle.loads(pickle.dumps(_Marker(tmp_path / "canary")))  # the payload works when it is unpickled
    assert (tmp_path / "canary").exists()
    marker = tmp_path / "PWNED"
    payload = pickle.dumps(_Marker(marker))
    for rehash in (False, True):
        run = _copy(src, tmp_path / f"run-{rehash}")
        newest = list_checkpoints(run / "checkpoint")[-1][1]
        for f in _files(newest):
            if f.name != "manifest.json":
                f.write_bytes(payload)
        for extra in ("weights/.metadata", "dcp/.metadata", "dcp/__0_0.distcp", "rng.pt", "state.pt"):
            (newest / extra).parent.mkdir(exist_ok=True)
            (newest / extra).write_bytes(payload)
        if rehash:  # the attacker also rewrites the manifest so that every checksum matches
            manifest = json.loads((newest / "manifest.json").read_text())
            names = [f.relative_to(newest).as_posix() for f in _files(newest) if f.name != "manifest.json"]
            manifest.pop("manifest_sha256")
            write_manifest(newest / "manifest.json", {**manifest, "files": file_table(newest, names)})
        load_run(run)  # serving falls back to the previous checkpoint (or refuses); never unpickles
        rec = run_training(spec, run, resume=True)
        assert not marker.exists(), f"a planted pickle was executed (rehashed manifest: {rehash})"
        assert rec["status"] == "done", rec["error"]
        shutil.rmtree(run)


@pytest.mark.parametrize("strategy", ["none", "ddp"])
def test_bit_flip_in_weights_or_manifest_falls_back_to_the_previous_checkpoint(runs, strategy, tmp_path):
    spec, src = runs[strategy]
    weights = (
        "model.safetensors" if strategy == "none" else "weights/shard-00001-model-00001-of-00001.safetensors"
    )
    for target in (weights, "manifest.json"):
        run = _copy(src, tmp_path / target.replace("/", "_"))
        newest = list_checkpoints(run / "checkpoint")[-1][1]
        f = newest / target
        data = bytearray(f.read_bytes())
        if target == "manifest.json":  # one flipped bit in the config hash the manifest names
            i = data.index(b'"config_hash": "') + len(b'"config_hash": "')
            data[i] ^= 0x01
        else:
            data[len(data) * 3 // 4] ^= 0x10
        f.write_bytes(bytes(data))
        assert _latest_step(spec, run) == STEPS // 2, target
        assert load_run(run).step == STEPS // 2, target
        shutil.rmtree(run)


def test_unlisted_shard_file_is_not_read(runs, tmp_path):
    """DCP's reader reads every shard file of weights/; one the manifest does not list makes the
    checkpoint unusable rather than read unchecked."""
    spec, src = runs["ddp"]
    run = _copy(src, tmp_path / "run")
    newest = list_checkpoints(run / "checkpoint")[-1][1]
    shard = next((newest / "weights").iterdir())
    shutil.copy(shard, newest / "weights" / "shard-00009-model-00001-of-00001.safetensors")
    assert _latest_step(spec, run) == STEPS // 2


def test_sharded_run_serves_the_same_weights_as_its_resume(runs):
    """A world-of-one FSDP run's consolidated weights equal what DDP and FSDP trained (same seed, same
    data, one rank: identical arithmetic), and a run with every checkpoint damaged is refused by name."""
    ddp, fsdp = load_run(runs["ddp"][1]), load_run(runs["fsdp"][1])
    assert ddp.step == fsdp.step == STEPS
    for (name, a), b in zip(ddp.model.state_dict().items(), fsdp.model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_every_checkpoint_damaged_is_a_named_error(runs, tmp_path):
    spec, src = runs["ddp"]
    run = _copy(src, tmp_path / "run")
    for _, path in list_checkpoints(run / "checkpoint"):
        (path / "state.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no checkpoint verifies"):
        load_run(run)
