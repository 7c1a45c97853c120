"""Training controls reachable from a config: auto micro-batch, batch schedule, noise scale in metrics,
the noise-scale batch controller, and the spec checks around them."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from scalelab.errors import SpecError
from scalelab.spec import RunSpec, run_from_dict
from scalelab.train.batching import NoiseScaleBatchController
from scalelab.train.run import run_training
from scalelab.train.trainer import TrainState
from train_synthetic import SyntheticStore, synthetic_factory, tiny_run_spec

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SCALELAB_CACHE_DIR", str(tmp_path / "cache"))


def spec(steps: int = 12, **train) -> RunSpec:
    return tiny_run_spec(steps, train)


def run(s: RunSpec, out):
    return run_training(s, out, store=SyntheticStore(), loader_factory=synthetic_factory)


def metrics(out) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]


def test_default_run_id_is_pinned() -> None:
    """New TrainSpec fields are hashed only off their default: existing studies keep their run ids."""
    assert RunSpec().run_id == "d07512e2e739"


@pytest.mark.parametrize(
    ("train", "message"),
    [
        ({"noise_scale": True}, "noise_scale: needs at least two micro-batches"),
        ({"noise_scale": True, "micro_batch_size": 4}, "noise_scale: needs at least two micro-batches"),
        ({"max_global_batch_size": 16}, "max_global_batch_size: growing the batch .* needs noise_scale"),
        ({"batch_schedule": [[0, 4], [100, 6]]}, "batch_schedule: batch sizes must be multiples"),
        ({"batch_schedule": [[100, 8], [0, 4]]}, "batch_schedule: token counts must increase"),
        ({"micro_batch_size": 3}, "micro_batch_size: must divide"),
        ({"micro_batch_size": "big"}, "micro_batch_size"),
        ({"noise_scale": True, "micro_batch_size": 1, "noise_scale_shards": 3}, "noise_scale_shards: 3 must"),
        (
            {"noise_scale": True, "micro_batch_size": 1, "noise_scale_shards": 2, "strategy": "ddp"},
            "single-proc",
        ),
        ({"noise_scale_shards": 2}, "noise_scale_shards: needs noise_scale"),
        (
            {"noise_scale": True, "strategy": "fsdp", "tensor_parallel": 2},
            "noise_scale: data parallelism only",
        ),
        ({"noise_scale": True, "micro_batch_size": 1, "noise_scale_shrink_below": 0.5}, "needs max_global"),
        (
            {
                "noise_scale": True,
                "micro_batch_size": 1,
                "max_global_batch_size": 8,
                "noise_scale_shrink_below": 2,
            },
            "noise_scale_shrink_below: must be at most noise_scale_headroom / 2 = 1",
        ),
    ],
)
def test_bad_controls_are_refused_naming_the_field(train: dict, message: str) -> None:
    data = {"train": {"global_batch_size": 4, **train}}
    with pytest.raises(SpecError, match=message):
        run_from_dict(data, "run.toml")


def test_noise_scale_is_accepted_under_data_parallelism() -> None:
    """DDP/FSDP need no micro-batches: the ranks' local gradients are the small batches."""
    for strategy in ("ddp", "fsdp"):
        s = run_from_dict({"train": {"global_batch_size": 4, "noise_scale": True, "strategy": strategy}})
        assert s.train.noise_scale and s.train.micro_batch_size is None


def test_shards_of_single_micro_batches_estimate_as_the_micro_batches(tmp_path) -> None:
    """With one micro-batch per shard the two single-process estimators see the same small batches."""
    run(spec(steps=5, micro_batch_size=2, noise_scale=True), tmp_path / "micro")
    run(spec(steps=5, micro_batch_size=2, noise_scale=True, noise_scale_shards=2), tmp_path / "shards")
    a, b = metrics(tmp_path / "micro"), metrics(tmp_path / "shards")
    assert len(a) == len(b) == 5
    for x, y in zip(a, b, strict=True):
        assert x["loss"] == y["loss"]  # the estimator only reads gradients
        for key in ("noise_g2", "noise_trace", "noise_scale_tokens"):
            assert x[key] == pytest.approx(y[key], rel=1e-5), key


def test_auto_micro_batch_is_resolved_and_recorded(tmp_path) -> None:
    record = run(spec(micro_batch_size="auto"), tmp_path / "a")
    assert record["status"] == "done"
    assert record["micro_batch_size"] == 4  # a tiny model fits whole on CPU: no accumulation
    plain = run(spec(), tmp_path / "b")
    assert plain["final_train_loss"] == record["final_train_loss"]
    assert json.loads((tmp_path / "a" / "config.json").read_text())["train"]["micro_batch_size"] == "auto"


def test_batch_schedule_grows_the_batch_and_keeps_the_token_budget(tmp_path) -> None:
    record = run(spec(steps=12, batch_schedule=[[0, 4], [768, 8]]), tmp_path / "s")
    assert record["status"] == "done" and record["tokens"] == 12 * 128
    assert [(c["step"], c["from"], c["to"]) for c in record["batch_changes"]] == [(6, 4, 8)]
    sizes = [r["global_batch_size"] for r in metrics(tmp_path / "s")]
    assert sizes == [4] * 5 + [8] * 4  # 6 steps of 4 sequences, then 3 of 8 (the change shows from step 6)
    assert record["steps"] == 9


def test_noise_scale_goes_into_metrics(tmp_path) -> None:
    record = run(spec(steps=10, micro_batch_size=1, noise_scale=True), tmp_path / "n")
    assert record["status"] == "done"
    rows = metrics(tmp_path / "n")
    assert all({"noise_scale_tokens", "noise_g2", "noise_trace"} <= set(r) for r in rows)
    assert sum(1 for r in rows if r["noise_trace"] is not None) >= 9
    assert any(r["noise_scale_tokens"] is not None and r["noise_scale_tokens"] > 0 for r in rows)


def test_noise_scale_under_fp16_loss_scaling_matches_fp32(tmp_path) -> None:
    """The hooks see gradients × the fp16 loss scale (2^16 here); the estimate divides it out."""
    rows = {}
    for precision in ("fp32", "fp16"):
        run(spec(steps=6, micro_batch_size=1, noise_scale=True, precision=precision), tmp_path / precision)
        rows[precision] = metrics(tmp_path / precision)[-1]
    for key in ("noise_g2", "noise_trace"):
        assert 0.5 < rows["fp16"][key] / rows["fp32"][key] < 2.0, key


def test_noise_scale_controller_runs_in_training(tmp_path) -> None:
    s = spec(steps=40, micro_batch_size=1, noise_scale=True, max_global_batch_size=16)
    record = run(s, tmp_path / "c")
    assert record["status"] == "done" and record["tokens"] == 40 * 128
    changes = record["batch_changes"]
    assert changes  # the synthetic data's noise scale (~350 tokens) exceeds 2 × the 128-token batch
    assert all(c["to"] == 2 * c["from"] <= 16 and "noise scale" in c["reason"] for c in changes)
    sizes = [r["global_batch_size"] for r in metrics(tmp_path / "c")]
    assert sizes == sorted(sizes) and sizes[-1] == (changes[-1]["to"] if changes else 4)


class _Estimator:
    def __init__(self, b_simple: float, n: int = 50) -> None:
        self.b_simple, self.n = b_simple, n

    def estimate(self) -> SimpleNamespace:
        return SimpleNamespace(b_simple=self.b_simple, n=self.n)


class _Trainer:
    """The part of Trainer the controller uses: the base batch, its multiplier and tokens per step."""

    def __init__(self) -> None:
        self.train = SimpleNamespace(global_batch_size=4)
        self.batch_multiplier = 1

    @property
    def step_tokens(self) -> int:
        return 4 * 32 * self.batch_multiplier

    def set_batch_multiplier(self, m: int) -> None:
        self.batch_multiplier = m


def _drive(controller: NoiseScaleBatchController, steps: int) -> list[int]:
    trainer = _Trainer()
    controller.on_fit_start(trainer)  # type: ignore[arg-type]
    for step in range(1, steps + 1):
        controller.on_step_end(TrainState(step=step, tokens=step * 128))
    return [c["to"] for c in controller.changes]


def test_noise_scale_controller_doubles_while_below_the_critical_batch_and_stops_at_the_cap() -> None:
    # B_simple = 1000 tokens: batches of 128 and 256 tokens are ≤ B/2, 512 is not → grows 4 → 8 → 16
    assert _drive(NoiseScaleBatchController(_Estimator(1000.0), max_multiplier=8, min_steps=5), 40) == [8, 16]
    assert _drive(NoiseScaleBatchController(_Estimator(1e9), max_multiplier=4, min_steps=5), 40) == [8, 16]
    assert _drive(NoiseScaleBatchController(_Estimator(200.0), max_multiplier=8), 40) == []  # < 2 × 128
    assert _drive(NoiseScaleBatchController(_Estimator(1e9, n=5), max_multiplier=8), 40) == []  # too early
    assert _drive(NoiseScaleBatchController(_Estimator(math.nan), max_multiplier=8), 40) == []


class _Falling(_Estimator):
    """B_simple of 1000 tokens for the first 20 steps, then 50 (the noise scale collapses)."""

    def __init__(self) -> None:
        super().__init__(1000.0)
        self.step = 0

    def estimate(self) -> SimpleNamespace:
        self.step += 1
        return SimpleNamespace(b_simple=1000.0 if self.step <= 20 else 50.0, n=self.n)


def test_noise_scale_controller_shrinks_back_to_the_base_batch_and_says_why() -> None:
    ctl = NoiseScaleBatchController(_Falling(), max_multiplier=8, shrink_below=0.5, min_steps=5)
    assert _drive(ctl, 40) == [8, 16, 8, 4]  # never below the base batch of 4
    assert [c["step"] for c in ctl.changes] == [5, 10, 21, 26]  # B_simple falls at step 21
    assert "< 0.5 × batch 512 tokens: shrink" in ctl.changes[2]["reason"]
    assert "≥ 2 × batch 128 tokens: grow" in ctl.changes[0]["reason"]
    # without shrink_below the batch never shrinks
    assert _drive(NoiseScaleBatchController(_Falling(), max_multiplier=8, min_steps=5), 40) == [8, 16]
    with pytest.raises(ValueError, match="shrink_below"):
        NoiseScaleBatchController(_Falling(), max_multiplier=8, shrink_below=1.5)
