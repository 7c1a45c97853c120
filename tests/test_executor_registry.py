"""Executors behind one registry (`study.executors.EXECUTORS`): `--executor NAME` builds each from the same
options, an unknown name is refused by flag, and a new executor is one class plus one registry line."""

from __future__ import annotations

import pytest

from scalelab.errors import SpecError
from scalelab.spec import load_study
from scalelab.study import executors
from scalelab.study.executors import EXECUTORS, Executor, ExecutorOptions, LocalExecutor, make_executor

SPEC = """
[study]
name = "tiny"
[study.model]
width = 16
depth = 1
n_heads = 2
context_tokens = 16
[study.data]
sources = [{{kind = "text", path = "{corpus}"}}]
heldout_fraction = 0.2
[study.train]
tokens = 128
global_batch_size = 4
eval_tokens = 32
threads = 1
[study.design]
kind = "grid"
[study.design.axes]
"model.width" = [16]
"""


class CountingExecutor(LocalExecutor):
    """A 'new executor': local runs, counting what it was asked to execute."""

    executed: list[str] = []

    @classmethod
    def from_options(cls, study, o: ExecutorOptions) -> CountingExecutor:
        return cls(parallel=o.parallel)

    def execute(self, todo, registry, progress=None):
        CountingExecutor.executed += [planned.run_id for planned, _ in todo]
        return super().execute(todo, registry, progress)


def test_every_registered_executor_builds_from_the_same_options(tmp_path, tiny_corpus):
    pytest.importorskip("submitit")
    (tmp_path / "s.toml").write_text(SPEC.format(corpus=tiny_corpus))
    study = load_study(tmp_path / "s.toml")
    opts = ExecutorOptions(parallel=2, retries=1, timeout_seconds=60.0)
    for name in EXECUTORS:
        ex = make_executor(name, study, opts)
        assert isinstance(ex, Executor) and ex.retries == 1 and ex.timeout_seconds == 60.0, name
    with pytest.raises(SpecError, match="--executor: expected one of local, ray, slurm"):
        make_executor("kubernetes", study, opts)


def test_a_new_executor_is_one_class_and_one_line(tmp_path, tiny_corpus, monkeypatch):
    (tmp_path / "s.toml").write_text(SPEC.format(corpus=tiny_corpus))
    study = load_study(tmp_path / "s.toml")
    monkeypatch.setitem(EXECUTORS, "counting", f"{__name__}:CountingExecutor")
    result = executors.run_study(
        study, tmp_path / "out", executor=make_executor("counting", study, ExecutorOptions())
    )
    assert [o.status for o in result.outcomes] == ["done"] and len(CountingExecutor.executed) == 1
