"""Study identity and bookkeeping, tried as a careless user would: a changed base run on an existing study
directory, seeds set in two places, `--set` on a field the design controls, a truncated config.json, a
moved study directory, and `study add-run` with a run that is not comparable."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from scalelab.errors import RegistryError, SpecError
from scalelab.registry import Registry
from scalelab.spec import RunSpec, config_hash, load_study
from scalelab.study.add_run import add_run
from scalelab.study.executors import prepare_run_dirs, write_study_files
from tiny_study import tiny_study

STUDY = tiny_study(
    "ident",
    """[study.train]
tokens = 1024
global_batch_size = 4
lr = 1e-3
threads = 1
[study.design]
kind = "grid"
seeds = [0, 1]
[study.design.axes]
"model.width" = [8, 16]
""",
)


@pytest.fixture()
def spec_file(tmp_path: Path, tiny_corpus: Path) -> Path:
    path = tmp_path / "study.toml"
    path.write_text(STUDY.format(corpus=tiny_corpus))
    return path


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "scalelab", *args], capture_output=True, text=True, timeout=120, check=False
    )


def test_another_base_run_on_an_existing_study_dir_is_refused_naming_the_field(spec_file, tmp_path):
    out = tmp_path / "study"
    write_study_files(load_study(spec_file), out, None)  # the first `study run` froze this identity
    write_study_files(load_study(spec_file), out, None)  # the same study again: fine
    proc = _cli("study", "run", str(spec_file), "--out", str(out), "--set", "train.lr=1e-2", "--no-forecast")
    assert proc.returncode == 2, proc.stderr
    assert "study.train.lr: 0.001 → 0.01" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not (out / "registry.sqlite").exists() and not (out / "runs").exists()  # nothing trained
    with pytest.raises(SpecError, match=r"study\.design\.axes\.model\.width"):
        write_study_files(load_study(spec_file, ["design.axes.model.width=[8, 32]"]), out, None)


def test_seed_in_an_axis_or_a_list_entry_is_an_error(spec_file, tmp_path):
    text = spec_file.read_text()
    grid = tmp_path / "grid.toml"
    grid.write_text(text + '"train.seed" = [3, 4]\n')
    with pytest.raises(SpecError, match="study.design.seeds"):
        load_study(grid)
    listed = tmp_path / "list.toml"
    listed.write_text(
        text.split("[study.design]")[0]
        + '[study.design]\nkind = "list"\nruns = [{"model.width" = 8}, {"model.width" = 16, "train.seed" = 5}]\n'
    )
    with pytest.raises(SpecError, match=r"runs\[1\].*study.design.seeds"):
        load_study(listed)


def test_design_axes_are_overridable_and_a_shadowed_set_is_an_error(spec_file):
    study = load_study(
        spec_file, ["design.axes.model.width=[16, 32]", "study.design.axes.train.lr=[1e-3, 3e-3]"]
    )
    assert study.design.axes == {"model.width": [16, 32], "train.lr": [1e-3, 3e-3]}
    with pytest.raises(
        SpecError, match=r"--set 'model.width=32'.*axis 'model.width'.*design.axes.model.width"
    ):
        load_study(spec_file, ["model.width=32"])
    with pytest.raises(SpecError, match=r"--set 'train.seed=7'.*seeds"):
        load_study(spec_file, ["train.seed=7"])
    assert load_study(spec_file, ["train.lr=3e-3"]).train.lr == 3e-3  # not a design field: applied


def test_truncated_config_is_rewritten_and_run_dirs_survive_moving_the_study(spec_file, tmp_path):
    study = load_study(spec_file)
    out = tmp_path / "a" / "study"
    with Registry(out / "registry.sqlite") as reg:
        runs, todo = prepare_run_dirs(study, out, reg)
        stored = reg._conn.execute("SELECT run_dir FROM runs").fetchall()
    assert all(not Path(r[0]).is_absolute() and r[0].startswith("runs/") for r in stored), stored
    config = todo[0][1] / "config.json"
    config.write_text(config.read_text()[:20])  # a crash cut it short
    with Registry(out / "registry.sqlite") as reg:
        prepare_run_dirs(study, out, reg)
    assert RunSpec.model_validate_json(config.read_text()).run_id == todo[0][0].run_id
    moved = tmp_path / "elsewhere"
    shutil.move(out, moved)
    with Registry(moved / "registry.sqlite") as reg:
        for row in reg.runs():
            assert (Path(row["run_dir"]) / "config.json").is_file(), row["run_dir"]


def _finished_run(root: Path, spec: RunSpec, **record) -> Path:
    root.mkdir(parents=True)
    (root / "config.json").write_text(spec.canonical_json())
    rec = {"run_id": spec.run_id, "config_hash": config_hash(spec), "status": "done", "eval_loss": 3.0}
    (root / "record.json").write_text(json.dumps({**rec, **record}))
    return root


def test_add_run_refuses_a_mismatched_record_and_an_incomparable_run(spec_file, tmp_path):
    study = load_study(spec_file)
    out = tmp_path / "study"
    write_study_files(study, out, None)
    Registry(out / "registry.sqlite").close()
    base = study.base_run()
    other = base.model_copy(update={"train": base.train.model_copy(update={"lr": 5e-3})})
    forged = _finished_run(tmp_path / "forged", base, config_hash=config_hash(other))
    with pytest.raises(RegistryError, match="config_hash .* does not match config.json"):
        add_run(out, forged)
    longer = base.model_copy(update={"model": base.model.model_copy(update={"context_tokens": 32})})
    with pytest.raises(SpecError, match=r"model.context_tokens differs from the study's \(32, .* 16\)"):
        add_run(out, _finished_run(tmp_path / "longer", longer))
    bpe = base.model_copy(update={"data": base.data.model_copy(update={"tokenizer": "bpe"})})
    with pytest.raises(SpecError, match="data.tokenizer differs"):
        add_run(out, _finished_run(tmp_path / "bpe", bpe))
    row = add_run(out, _finished_run(tmp_path / "ok", base))  # comparable: accepted
    assert row["status"] == "done" and row["role"] == "target"
