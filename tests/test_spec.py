"""Spec validation names the field at fault; the run id is a stable canonical hash."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scalelab.errors import ScalelabError, SpecError
from scalelab.spec import (
    RunSpec,
    apply_overrides,
    canonical_json,
    load_run,
    load_study,
    parse_toml,
    run_id,
    study_from_dict,
)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

GOOD = """
[study]
name = "t"
[study.model]
n_heads = 4
width = 32
context_tokens = 16
[study.train]
tokens = 4096
global_batch_size = 4
[study.design]
kind = "grid"
[study.design.axes]
"model.width" = [16, 32]
"""


def _write(tmp_path: Path, text: str, name: str = "s.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_good_study_loads(tmp_path: Path) -> None:
    study = load_study(_write(tmp_path, GOOD))
    assert study.name == "t" and study.model.width == 32


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("model.width=30", "s.toml: study.model.width: must be a multiple of n_heads=4, got 30"),
        ("model.depth=0", "s.toml: study.model.depth: "),
        ("train.lr=-1", "s.toml: study.train.lr: "),
        ("train.schedule='linear'", "s.toml: study.train.schedule: "),
        ("model.widht=64", "s.toml: study.model.widht: unknown field"),
        ("train.micro_batch_size=3", "s.toml: study.train.micro_batch_size: must divide global_batch_size=4"),
        ("train.tokens=10", "s.toml: study.train.tokens: must be at least one step"),
        ("data.heldout_fraction=0.9", "s.toml: study.data.heldout_fraction: "),
        ("design.axes={'model.nope'=[1]}", "'model.nope': no such field"),
        ("design.axes={'model.width'=[30]}", "model.width: must be a multiple of n_heads=4, got 30"),
        ("name='has space'", "s.toml: study.name: "),
        ("design.kind='spiral'", "s.toml: study.design"),
    ],
)
def test_bad_spec_names_the_field(tmp_path: Path, override: str, expected: str) -> None:
    from scalelab.study.plan import expand_runs  # the design's runs are checked where they are made

    with pytest.raises(SpecError) as err:
        expand_runs(load_study(_write(tmp_path, GOOD), [override]), source="s.toml")
    assert expected in str(err.value)


def test_the_quickstart_example_error_message() -> None:
    with pytest.raises(
        SpecError,
        match=r"^quickstart\.toml: study\.model\.width: must be a multiple of "
        r"n_heads=4, got 30$",
    ):
        load_study(EXAMPLES / "quickstart.toml", ["model.width=30"])


def test_missing_file_and_bad_toml_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="nope.toml: cannot read"):
        load_study(tmp_path / "nope.toml")
    with pytest.raises(SpecError, match=r"bad.toml: not valid TOML: .*line 1"):
        load_study(_write(tmp_path, "[study\n", "bad.toml"))
    with pytest.raises(SpecError, match="needs a \\[study\\] table"):
        load_study(_write(tmp_path, "x = 1\n", "x.toml"))


def test_override_path_must_be_dotted() -> None:
    with pytest.raises(SpecError, match="expected dotted.path=value"):
        apply_overrides({}, ["model.width"])
    with pytest.raises(SpecError, match="not a dotted field path"):
        apply_overrides({}, ["mo del=1"])


def test_overrides_are_parsed_as_toml_values() -> None:
    data = apply_overrides(
        {"study": {}},
        ["model.width=64", "train.lr=3e-4", "name=abc", "study.train.compile=true"],
        root="study",
    )
    assert data["study"]["model"]["width"] == 64
    assert data["study"]["train"]["lr"] == 3e-4
    assert data["study"]["name"] == "abc"
    assert data["study"]["train"]["compile"] is True


# ------------------------------------------------------------------------------------------ run id
def test_run_id_stable_under_key_order_and_number_format(tmp_path: Path) -> None:
    a = _write(
        tmp_path, "[train]\ntokens = 1_000_000\nlr = 0.0003\n[model]\nwidth = 64\nn_heads = 4\n", "a.toml"
    )
    b = _write(tmp_path, "[model]\nn_heads = 4\nwidth = 64\n[train]\nlr = 3e-4\ntokens = 1000000\n", "b.toml")
    c = _write(tmp_path, "[model]\nwidth = 64\n[train]\nlr = 3.0e-4\ntokens = 1e6\n", "c.toml")
    ids = {run_id(load_run(p)) for p in (a, b, c)}
    assert len(ids) == 1, ids
    # defaults filled in: spelling a default out does not change the id
    d = _write(
        tmp_path, "[model]\nwidth = 64\ndepth = 2\n[train]\nlr = 3e-4\ntokens = 1000000\nseed = 0\n", "d.toml"
    )
    assert run_id(load_run(d)) in ids
    # a real change does
    e = _write(tmp_path, "[model]\nwidth = 64\n[train]\nlr = 3e-4\ntokens = 1000000\nseed = 1\n", "e.toml")
    assert run_id(load_run(e)) not in ids


def test_run_id_roundtrips_through_config_json(tmp_path: Path) -> None:
    spec = RunSpec()
    p = tmp_path / "config.json"
    p.write_text(spec.canonical_json())
    assert load_run(p).run_id == spec.run_id


def test_canonical_json_normalises_numbers() -> None:
    assert canonical_json({"b": 1.0, "a": [2.50, 1e6]}) == '{"a":[2.5,1000000],"b":1}'


# ------------------------------------------------------------------------------------------- fuzz
_keys = st.sampled_from(
    [
        "study",
        "name",
        "model",
        "width",
        "n_heads",
        "train",
        "tokens",
        "design",
        "axes",
        "kind",
        "lr",
        "data",
        "sources",
        "fit",
        "x",
    ]
)
_scalars = st.one_of(
    st.integers(-(2**70), 2**70), st.floats(allow_nan=True), st.text(max_size=8), st.booleans()
)
_values = st.recursive(
    _scalars,
    lambda c: st.one_of(st.lists(c, max_size=3), st.dictionaries(_keys, c, max_size=4)),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=200))
def test_fuzz_toml_text_only_raises_scalelab_errors(text: str) -> None:
    try:
        study_from_dict(parse_toml(text, "fuzz.toml"), "fuzz.toml")
    except ScalelabError:
        pass


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(_keys, _values, max_size=5))
def test_fuzz_structured_specs_only_raise_scalelab_errors(data: dict) -> None:
    try:
        study_from_dict({"study": data}, "fuzz.toml")
    except ScalelabError:
        pass
