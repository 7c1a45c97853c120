"""The optional metrics sinks, each read back with its own library's reader (TensorBoard's
EventAccumulator, MLflow's client on a local store, W&B's `wandb leet inspect`), and a missing sink
package as a spec error (exit 2) before anything runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scalelab.errors import SpecError
from scalelab.extras import SINK_EXTRAS, installed, require_sinks
from scalelab.spec import RunSpec
from scalelab.train.run import run_training
from scalelab.train.sinks import hyperparameters
from train_synthetic import SyntheticStore, synthetic_factory

torch.set_num_threads(1)
STEPS = 6
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SCALELAB_CACHE_DIR", str(tmp_path / "cache"))


def spec(sink: str, crash_at_step: int | None = None) -> RunSpec:
    train = {
        "tokens": 32 * 4 * STEPS,
        "global_batch_size": 4,
        "threads": 1,
        "eval_interval_steps": 3,
        "eval_tokens": 128,
        "checkpoint_interval_steps": 1000,
        "sinks": [sink],
    }
    model = {"width": 32, "depth": 1, "n_heads": 4, "context_tokens": 32}
    debug = {"crash_at_step": crash_at_step} if crash_at_step else {}
    return RunSpec.model_validate({"model": model, "train": train, "debug": debug})


def train(sink: str, out: Path) -> tuple[RunSpec, dict]:
    s = spec(sink)
    record = run_training(s, out, store=SyntheticStore(), loader_factory=synthetic_factory)
    assert record["status"] == "done", record["error"]
    return s, record


def losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def needs(sink: str):
    module, extra = SINK_EXTRAS[sink]
    return pytest.mark.skipif(not installed(module), reason=f"the {extra} extra is not installed")


def test_hyperparameters_are_flat_scalars_with_the_run_id() -> None:
    s = spec("tensorboard")
    params = hyperparameters(s)
    assert (
        params["run_id"] == s.run_id
        and params["model.width"] == 32
        and params["train.sinks"] == '["tensorboard"]'
    )
    assert params["model.vocab_size"] == "None"
    assert all(isinstance(v, bool | int | float | str) for v in params.values())


@needs("tensorboard")
def test_tensorboard_sink_read_back_with_event_accumulator(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    s, _ = train("tensorboard", tmp_path / "run")
    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    acc.Reload()
    loss = {e.step: e.value for e in acc.Scalars("train/loss")}
    assert loss == pytest.approx(losses(tmp_path / "run"))
    assert [e.step for e in acc.Scalars("eval/loss")] == [3, 6]
    for tag in ("train/lr", "train/grad_norm", "train/tokens_per_second", "train/mfu"):
        assert len(acc.Scalars(tag)) == STEPS, tag
    content = acc.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    hp = start.session_start_info.hparams
    assert hp["run_id"].string_value == s.run_id and hp["model.width"].number_value == 32
    assert hp["train.lr"].number_value == pytest.approx(s.train.lr)
    (text,) = acc.Tensors("run_id/text_summary")
    assert text.tensor_proto.string_val[0].decode() == s.run_id


@needs("mlflow")
def test_mlflow_sink_read_back_with_the_mlflow_client(tmp_path: Path, monkeypatch) -> None:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    s, _ = train("mlflow", tmp_path / "run")
    client = MlflowClient(uri)
    (run,) = client.search_runs(["0"], filter_string=f"tags.`scalelab.run_id` = '{s.run_id}'")
    assert run.info.run_name == s.run_id and run.info.status == "FINISHED"
    assert run.data.params["run_id"] == s.run_id and run.data.params["model.width"] == "32"
    assert float(run.data.params["train.lr"]) == pytest.approx(s.train.lr)
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/loss")}
    assert history == pytest.approx(losses(tmp_path / "run"))
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "eval/loss")) == [3, 6]


@needs("mlflow")
@needs("tensorboard")
def test_a_crashed_run_leaves_its_sinks_flushed_and_marked_failed(tmp_path: Path, monkeypatch) -> None:
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    for sink in ("mlflow", "tensorboard"):
        s = spec(sink, crash_at_step=4)
        record = run_training(s, tmp_path / sink, store=SyntheticStore(), loader_factory=synthetic_factory)
        assert record["status"] == "failed" and "injected crash" in record["error"]
    (run,) = MlflowClient(uri).search_runs(["0"])
    assert run.info.status == "FAILED"
    assert [m.step for m in MlflowClient(uri).get_metric_history(run.info.run_id, "train/loss")] == [1, 2, 3]
    acc = EventAccumulator(str(tmp_path / "tensorboard" / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3]


@needs("mlflow")
def test_a_resumed_run_continues_its_mlflow_run(tmp_path: Path, monkeypatch) -> None:
    from mlflow.tracking import MlflowClient

    from scalelab.train.trainer import Callback

    class Kill(Callback):
        def on_step_end(self, state) -> None:
            if state.step == 4:
                raise RuntimeError("killed at step 4")

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    plain = spec("mlflow").model_dump()
    s = RunSpec.model_validate(plain | {"train": plain["train"] | {"checkpoint_interval_steps": 2}})
    kw = {"store": SyntheticStore(), "loader_factory": synthetic_factory}
    assert run_training(s, tmp_path / "run", callbacks=[Kill()], **kw)["status"] == "failed"
    assert run_training(s, tmp_path / "run", **kw)["status"] == "done"
    client = MlflowClient(uri)
    (run,) = client.search_runs(["0"])
    assert run.info.status == "FINISHED" and run.data.tags["scalelab.run_id"] == s.run_id
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert sorted(set(steps)) == list(range(1, STEPS + 1))


@needs("wandb")
def test_wandb_sink_writes_an_offline_run_read_back_by_wandb(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("WANDB_MODE", raising=False)
    s, _ = train("wandb", tmp_path / "run")
    (log,) = (tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb")
    inspect = [sys.executable, "-m", "wandb", "leet", "inspect", "--json"]
    out = subprocess.run([*inspect, "--summary", str(log)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["run_id"] == s.run_id and summary["name"] == s.run_id and summary["state"] == "finished"
    assert summary["config"]["run_id"] == s.run_id and summary["config"]["model.width"] == 32
    assert summary["summary"]["eval/loss"] > 0 and summary["step"] == STEPS
    out = subprocess.run([*inspect, str(log)], capture_output=True, text=True, timeout=60)
    records = [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
    loss = {
        r["history"]["step"]["num"]: r["history"]["item"]["train/loss"]
        for r in records
        if r.get("type") == "history" and "train/loss" in r["history"]["item"]
    }
    assert loss == pytest.approx(losses(tmp_path / "run"))


def test_a_missing_sink_package_is_a_spec_error(monkeypatch) -> None:
    monkeypatch.setitem(SINK_EXTRAS, "wandb", ("scalelab_no_such_module", "wandb"))
    with pytest.raises(SpecError, match=r"train.sinks: 'wandb' needs a package .*scalelab\[wandb\]"):
        require_sinks(["tensorboard", "wandb"] if installed("tensorboard") else ["wandb"])


@pytest.mark.parametrize("command", ["train", "launch"])
def test_cli_refuses_a_missing_sink_before_anything_runs(tmp_path: Path, command: str) -> None:
    """`sys.modules[name] = None` is how Python blocks an import: the package reads as not installed."""
    out_dir = tmp_path / "run"
    argv = [command, str(EXAMPLES / "run_tiny.toml"), "--out", str(out_dir), "--set", 'train.sinks=["wandb"]']
    code = (
        "import sys; sys.modules['wandb'] = None; from scalelab.cli import main; "
        f"sys.argv = ['scalelab', *{argv!r}]; main()"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert "train.sinks: 'wandb' needs a package that is not installed" in " ".join(out.stderr.split())
    assert "Traceback" not in out.stderr and not out_dir.exists()


def test_study_run_refuses_a_missing_sink_before_any_run_or_token_store(
    tmp_path: Path, tiny_corpus: Path, monkeypatch
) -> None:
    from scalelab.spec import load_study
    from scalelab.study.executors import LocalExecutor, run_study
    from tiny_study import tiny_study

    monkeypatch.setitem(SINK_EXTRAS, "wandb", ("scalelab_no_such_module", "wandb"))
    text = tiny_study(
        "sinks",
        """[study.train]
tokens = 2048
global_batch_size = 4
sinks = ["wandb"]
[study.design]
kind = "grid"
[study.design.axes]
"model.width" = [8, 16]
""",
    )
    path = tmp_path / "study.toml"
    path.write_text(text.format(corpus=tiny_corpus))
    with pytest.raises(SpecError, match="study.train.sinks: 'wandb' needs a package"):
        run_study(load_study(path), tmp_path / "study", executor=LocalExecutor())
    assert not list((tmp_path / "study").glob("runs/*/metrics.jsonl"))
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").rglob("index.json"))
