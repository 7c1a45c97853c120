"""One error path for the CLI: every user-caused failure exits 2 with one paragraph naming the file, field or
flag, never a traceback. The inputs that used to crash with a traceback are each tried through the real
`scalelab` process; a hypothesis fuzz over arguments runs the CLI's `main` in this process (fast) and
asserts "exit 0 or 2, never a traceback"."""

from __future__ import annotations

import contextlib
import io
import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scalelab.registry import Registry

ROOT = Path(__file__).resolve().parents[1]
RUN_TOML = ROOT / "examples" / "run_tiny.toml"
STUDY = """[study]
name = "fuzz"
[study.model]
width = 16
n_heads = 2
depth = 1
context_tokens = 16
[study.train]
tokens = 1024
global_batch_size = 4
[study.design]
kind = "grid"
[study.design.axes]
"model.width" = [8, 16]
"""


def _scalelab(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "scalelab", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        check=False,
    )


def _named_error(proc: subprocess.CompletedProcess, *names: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr and proc.stderr.startswith("error:"), proc.stderr[-2000:]
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr  # one paragraph
    for name in names:
        assert name in proc.stderr, (name, proc.stderr)


def _damaged_registry(study: Path) -> None:
    with Registry(study / "registry.sqlite") as reg:
        for i in range(200):
            reg.add_planned(
                f"run{i:04d}", "{}" * 50, "h", point={"i": i}, run_dir=str(study / "runs" / str(i))
            )
    con = sqlite3.connect(study / "registry.sqlite")
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    path = study / "registry.sqlite"
    data = bytearray(path.read_bytes())
    for i in range(2 * 4096, len(data), 997):  # pages after the header: opens fine, reads fail
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))


GOOD_ROWS = "n_params,tokens,loss\n" + "".join(
    f"{(i + 1) * 1e6},{(i + 3) * 1e8},{3 - 0.1 * i}\n" for i in range(8)
)


def test_deep_toml_and_out_paths_are_named_errors(tmp_path: Path) -> None:
    (tmp_path / "deep.toml").write_text("[" + ".".join(["a"] * 600) + "]\nx = 1\n")
    _named_error(_scalelab("train", "deep.toml", "--out", "o", cwd=tmp_path), "deep.toml", "nested")
    (tmp_path / "afile").write_text("x")
    _named_error(_scalelab("train", str(RUN_TOML), "--out", "afile", cwd=tmp_path), "--out afile")
    _named_error(_scalelab("train", str(RUN_TOML), "--out", "/proc/x/y", cwd=tmp_path), "--out /proc/x/y")
    (tmp_path / "study.toml").write_text(STUDY)
    _named_error(_scalelab("study", "run", "study.toml", "--out", "afile", cwd=tmp_path), "--out afile")


def test_seed_and_size_out_of_range_are_named_errors(tmp_path: Path) -> None:
    for item, field in (
        ("train.seed=18446744073709551616", "train.seed"),
        ("train.seed=-1", "train.seed"),
        ("model.width=4e12", "model.width"),
    ):
        _named_error(_scalelab("train", str(RUN_TOML), "--out", "o", "--set", item, cwd=tmp_path), field)


def test_bad_fit_inputs_are_named_errors(tmp_path: Path) -> None:
    rows = "n_params,tokens,loss\n" + "".join(f"{i + 1}e300,{i + 2}e299,{i + 1}\n" for i in range(8))
    (tmp_path / "huge.csv").write_text(rows)
    _named_error(_scalelab("fit", "huge.csv", cwd=tmp_path), "huge.csv", "column 'N'")
    (tmp_path / "bad.csv").write_bytes(b"n_params,tokens,loss\n\xff\xfe1,2,3\n")
    _named_error(_scalelab("fit", "bad.csv", cwd=tmp_path), "bad.csv", "UnicodeDecodeError")
    (tmp_path / "bad.parquet").write_bytes(b"PAR1" + b"\x00garbage" * 8 + b"PAR1")
    _named_error(_scalelab("fit", "bad.parquet", cwd=tmp_path), "bad.parquet")
    (tmp_path / "runs.csv").write_text(GOOD_ROWS)
    assert _scalelab("fit", "runs.csv", "--bootstrap", "0", "--out", "fit.json", cwd=tmp_path).returncode == 0
    fit = json.loads((tmp_path / "fit.json").read_text())  # as `fit` wrote it, marked not converged
    fit["fit"]["convergence"]["converged"] = False
    (tmp_path / "fit.json").write_text(json.dumps(fit))
    _named_error(
        _scalelab("recommend", "fit.json", "--compute", "1e20", cwd=tmp_path), "fit.json", "converge"
    )
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_text("x")
    _named_error(_scalelab("fit", "runs.csv", "--bootstrap", "0", "--out", "adir", cwd=tmp_path), "adir")
    _named_error(
        _scalelab("fit", "runs.csv", "--bootstrap", "0", "--out", "afile/f.json", cwd=tmp_path), "afile"
    )


def test_damaged_registry_is_a_named_error(tmp_path: Path) -> None:
    (tmp_path / "study.toml").write_text(STUDY)
    study = tmp_path / "damaged"
    _damaged_registry(study)
    for cmd in (("study", "status", str(study)), ("fit", str(study)), ("report", str(study))):
        _named_error(_scalelab(*cmd, cwd=tmp_path), "registry.sqlite", "damaged")
    _named_error(
        _scalelab("study", "run", "study.toml", "--out", str(study), "--no-forecast", cwd=tmp_path), "damaged"
    )


# --------------------------------------------------------------------------------------------- fuzz
@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli_fuzz")
    (root / "study.toml").write_text(STUDY)
    (root / "table.csv").write_text(GOOD_ROWS)
    (root / "fit.json").write_text("{}")
    (root / "empty").mkdir()
    return {"root": root, "study": root / "study.toml", "table": root / "table.csv", "fit": root / "fit.json"}


def _main(argv: list[str]) -> tuple[int, str]:
    """`scalelab ARGV` through the CLI's real entry point in this process: (exit code, stderr)."""
    from scalelab import cli

    err = io.StringIO()
    old_argv = sys.argv
    sys.argv = ["scalelab", *argv]
    code = 0
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            cli.main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    finally:
        sys.argv = old_argv
        cli._state["debug"] = False
    return code, err.getvalue()


FIELDS = [
    "model.width",
    "model.depth",
    "model.n_heads",
    "model.context_tokens",
    "model.vocab_size",
    "train.lr",
    "train.seed",
    "train.tokens",
    "train.global_batch_size",
    "train.schedule",
    "design.seeds",
    "design.axes.model.width",
    "design.kind",
    "data.tokenizer",
    "nosuch.field",
    "model",
    "train.lr.x",
]
values = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(
        ["nan", "inf", "-inf", "1e300", "4e12", "[]", "[1, 2]", '"x"', "{a = 1}", "[[[[]]]]", "true"]
    ),
    st.text(max_size=12),
)
set_item = st.one_of(
    st.tuples(st.sampled_from(FIELDS), values).map(lambda t: f"{t[0]}={t[1]}"), st.text(max_size=20)
)
argv = st.one_of(
    st.tuples(
        st.just("study"),
        st.just("plan"),
        st.just("STUDY"),
        st.just("--no-measure"),
        st.just("--set"),
        set_item,
    ),
    st.tuples(
        st.just("launch"),
        st.just("RUN"),
        st.just("--out"),
        st.just("o"),
        st.just("--dry-run"),
        st.just("--set"),
        set_item,
    ),
    st.tuples(st.just("recommend"), st.just("FIT"), st.sampled_from(["--compute", "--target-loss"]), values),
    st.tuples(
        st.just("fit"),
        st.just("TABLE"),
        st.just("--law"),
        st.text(max_size=12),
        st.just("--bootstrap"),
        st.just("0"),
    ),
    st.tuples(
        st.just("fit"),
        st.just("TABLE"),
        st.just("--bootstrap"),
        st.just("0"),
        st.just("--out"),
        st.one_of(
            st.sampled_from(["empty", "TABLE", "TABLE/x.json", "/proc/x/y.json", ""]), st.text(max_size=12)
        ),
    ),
    st.tuples(
        st.sampled_from(
            [
                "study status",
                "report",
                "fit",
                "data verify",
                "data inspect",
                "study watch --once",
                "recommend",
            ]
        ),
        st.text(max_size=30),
    ),
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(args=argv)
def test_fuzzed_arguments_exit_0_or_2_never_a_traceback(
    files: dict[str, Path], args: tuple[str, ...], monkeypatch
) -> None:
    monkeypatch.chdir(files["root"])
    subst = {
        "STUDY": str(files["study"]),
        "RUN": str(RUN_TOML),
        "FIT": str(files["fit"]),
        "TABLE": str(files["table"]),
    }
    flat = [
        w
        for a in args
        for w in (
            a.split(" ")
            if a in ("study status", "data verify", "data inspect", "study watch --once")
            else [a]
        )
    ]
    code, err = _main([subst.get(a, a) for a in flat])
    assert code in (0, 2), (flat, code, err[-1500:])
    assert "Traceback" not in err, (flat, err[-1500:])


def test_a_run_that_fails_for_its_own_reasons_exits_1_without_a_traceback(
    tmp_path: Path, tiny_corpus: Path
) -> None:
    cfg = tmp_path / "run.toml"
    cfg.write_text(
        "[model]\nwidth = 16\nn_heads = 2\ndepth = 1\ncontext_tokens = 16\n"
        f'[data]\nsources = [{{kind = "text", path = "{tiny_corpus}"}}]\nshard_tokens = 4096\n'
        "[train]\ntokens = 512\nglobal_batch_size = 4\nthreads = 1\n[debug]\ncrash_at_step = 2\n"
    )
    proc = _scalelab("train", str(cfg), "--out", "run", cwd=tmp_path)
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr and "failed" in proc.stdout + proc.stderr, proc.stderr[-2000:]
    assert json.loads((tmp_path / "run" / "record.json").read_text())["status"] == "failed"
    debug = _scalelab("--debug", "train", str(cfg), "--out", "run2", cwd=tmp_path)
    assert debug.returncode == 1 and "Traceback" in debug.stderr  # the traceback only with --debug
