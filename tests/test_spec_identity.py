"""A run id hashes what decides a run's result, never how it executes; every example's ids stay pinned."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from scalelab.serve.distill import load_student
from scalelab.spec import EXECUTION_FIELDS, RunSpec, load_run, load_study, run_from_dict, set_path
from scalelab.study.plan import expand_runs

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
#: run ids of every example spec and of every run its design expands to, computed on main before the
#: identity/execution split (commit aba8853; llama.toml and custom_model.toml when they were added); they
#: must never change.
PINNED = json.loads((Path(__file__).parent / "data" / "example_run_ids.json").read_text())


@pytest.fixture(autouse=True)
def _examples_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(EXAMPLES))  # custom_model.toml's factory


def _ids(path: Path) -> dict[str, object]:
    text = path.read_text()
    if "[study]" in text:
        study = load_study(path)
        return {"base": study.base_run().run_id, "runs": [r.run_id for r in expand_runs(study)]}
    if "[distill]" in text:
        student, _ = load_student(path, load_run(EXAMPLES / "run_tiny.toml"))
        return {"base": student.run_id, "runs": []}
    return {"base": load_run(path).run_id, "runs": []}


def test_every_example_is_pinned() -> None:
    assert sorted(p.name for p in EXAMPLES.glob("*.toml")) == sorted(PINNED)


@pytest.mark.parametrize("name", sorted(PINNED))
def test_example_run_ids_are_unchanged(name: str) -> None:
    assert _ids(EXAMPLES / name) == PINNED[name]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("threads", 3),
        ("sinks", ["tensorboard"]),
        ("log_interval_steps", 7),
        ("checkpoint_interval_steps", 9),
        ("keep_checkpoints", 5),
        ("strategy", "ddp"),
        ("compile", True),
        ("device", "cpu"),
    ],
)
def test_execution_settings_keep_the_run_id(field: str, value: object) -> None:
    base = load_run(EXAMPLES / "run_tiny.toml")
    changed = set_path(base, f"execution.{field}", value)
    assert getattr(changed.train, field) == value  # the run executes with it ...
    assert changed.run_id == base.run_id  # ... and is the same run
    again = RunSpec.model_validate_json(changed.canonical_json())  # config.json round trip
    assert again == changed and again.run_id == base.run_id


def test_identity_settings_change_the_run_id() -> None:
    base = load_run(EXAMPLES / "run_tiny.toml")
    for path, value in [
        ("train.lr", 1e-3),
        ("train.seed", 7),
        ("model.width", 48),
        ("train.tokens", 1 << 20),
    ]:
        assert set_path(base, path, value).run_id != base.run_id, path


def test_an_old_config_json_loads_with_its_old_id() -> None:
    """A config.json written before [execution] existed: every field under [train], hashed as it was."""
    base = load_run(EXAMPLES / "run_tiny.toml")
    old = json.loads(base.canonical_json())
    assert "execution" not in old and old["train"]["threads"] == 1
    assert run_from_dict(old).run_id == PINNED["run_tiny.toml"]["base"]


def test_launch_rewrites_the_strategy_without_changing_the_run_id(tmp_path: Path) -> None:
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "scalelab",
            "launch",
            str(EXAMPLES / "run_tiny.toml"),
            "--out",
            str(tmp_path),
            "--nproc",
            "2",
            "--dry-run",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    overrides = [a.split("=", 1) for a in res.stdout.split() if a.startswith("execution.")]
    assert overrides == [["execution.strategy", "ddp"]]
    launched = load_run(EXAMPLES / "run_tiny.toml", ["execution.strategy=ddp"])
    assert launched.train.strategy == "ddp"
    assert launched.run_id == load_run(EXAMPLES / "run_tiny.toml").run_id


def test_execution_fields_are_the_documented_ones() -> None:
    assert {"threads", "sinks", "strategy", "compile", "device", "keep_checkpoints"} <= set(EXECUTION_FIELDS)
    assert not {"lr", "seed", "tokens", "precision", "global_batch_size"} & set(EXECUTION_FIELDS)


def test_spec_imports_neither_study_nor_train() -> None:
    code = (
        "import sys, scalelab.spec; "
        "bad = [m for m in sys.modules if m.startswith(('scalelab.study', 'scalelab.train'))]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_a_study_keeps_every_run_id_under_execution_overrides() -> None:
    quickstart = EXAMPLES / "quickstart.toml"
    overrides = ["execution.threads=2", "execution.sinks=['tensorboard']", "execution.log_interval_steps=10"]
    changed = load_study(quickstart, overrides)
    assert changed.train.threads == 2 and changed.base_run().train.sinks == ["tensorboard"]
    assert [r.run_id for r in expand_runs(changed)] == PINNED["quickstart.toml"]["runs"]
    assert all(r.spec.train.threads == 2 for r in expand_runs(changed))


def test_a_bad_execution_value_is_still_checked() -> None:
    from scalelab.errors import SpecError

    with pytest.raises(SpecError, match="run_tiny.toml: execution.threads: Input should be greater than"):
        load_run(EXAMPLES / "run_tiny.toml", ["execution.threads=0"])
    with pytest.raises(SpecError, match="execution.nope: unknown field"):
        load_run(EXAMPLES / "run_tiny.toml", ["execution.nope=1"])
