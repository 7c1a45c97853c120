"""Every command README.md shows keeps working.

What runs, and what is only checked:
- the quickstart's three commands (`study run`, `fit`, `report`, in the bash block) run as written
  (`make test-slow`: six training runs), on a tiny study (the quickstart spec swapped for a 3×2 study of width-16 models on a
  small corpus, so the test takes seconds, not the quickstart's minutes);
- the error example (`$ scalelab study plan … --set model.width=30`) runs verbatim: same message, exit 2;
- every command in the command table: its `--help` works and lists every option the table shows for it;
- `make demo` / `make test` (they rebuild .venv and run for minutes): their targets exist in the Makefile
  and `make demo`'s recipe is the three quickstart commands the README lists;
- the Python block (an OpenAI client) needs a live server: tests/test_serve_openai.py runs it verbatim
  against one (only the port differs).
"""

from __future__ import annotations

import itertools
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from readme_text import README, blocks
from tiny_study import tiny_study

ROOT = Path(__file__).resolve().parents[1]
SRC = str(ROOT / "src")

TINY = tiny_study(
    "readme",
    """
[study.train]
tokens = 512
global_batch_size = 8
eval_interval_steps = 4
eval_tokens = 256
threads = 1
[study.design]
kind = "grid"
[study.design.axes]
"model.width" = [16, 32, 48]
"train.tokens" = [512, 1024]
[study.fit]
bootstrap = 20
[study.target]
compute_flops = 1e9
""",
)


def commands(block: str) -> list[str]:
    """Command lines of a bash block, comments dropped."""
    out = []
    for line in block.splitlines():
        line = line.split("  #")[0].strip()
        if line and not line.startswith("#"):
            out.append(line)
    return out


def scalelab(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "scalelab", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": SRC, "COLUMNS": "200", **env},
    )


def test_readme_shows_the_commands_this_test_covers() -> None:
    bash = [c for b in blocks("bash") for c in commands(b)]
    assert "make demo" in bash and "make test" in bash
    quick = [c for c in bash if "scalelab" in c]
    assert [shlex.split(c)[1] for c in quick] == ["study", "fit", "report"]


@pytest.mark.slow  # six real training runs in subprocesses: about a minute on a loaded 2-core machine
def test_quickstart_commands_run_as_written_at_tiny_size(tmp_path: Path, tiny_corpus: Path) -> None:
    spec = tmp_path / "tiny.toml"
    spec.write_text(TINY.format(corpus=tiny_corpus))
    quick = [c for b in blocks("bash") for c in commands(b) if "scalelab" in c]
    for line in quick:
        args = shlex.split(line.replace("examples/quickstart.toml", str(spec)))[1:]
        proc = scalelab(args, tmp_path)
        assert proc.returncode == 0, (line, proc.stdout[-2000:], proc.stderr[-2000:])
    report = tmp_path / "runs" / "quickstart" / "report"
    assert (report / "index.html").exists() and (report / "fit.json").exists()
    assert (report / "recommended_run.toml").exists()  # the README says the report writes it


def test_the_error_example_is_what_scalelab_prints() -> None:
    (block,) = [b for b in blocks("") if b.lstrip().startswith("$ scalelab")]
    command, expected = block.strip().splitlines()[:2]
    proc = scalelab(shlex.split(command.removeprefix("$ "))[1:], ROOT)
    assert proc.returncode == 2
    assert expected.strip() in (proc.stdout + proc.stderr), proc.stderr


def table_rows() -> list[tuple[list[str], list[str]]]:
    """(subcommand path, options shown) for each command of the README's command table."""
    word = re.compile(r"[a-z][a-z-]*")
    rows = []
    for cell in re.findall(r"^\| `(scalelab [^`]+)`", README, flags=re.M):
        first, *more = [v.strip() for v in cell.split(" / ")]  # "scalelab data ingest / verify / …"
        path = list(itertools.takewhile(word.fullmatch, first.split()[1:]))
        rows.append((path, re.findall(r"--[a-z][a-z-]*", first)))
        rows += [
            (path[:-1] + [v.split()[0]], re.findall(r"--[a-z][a-z-]*", v))
            for v in more
            if word.fullmatch(v.split()[0])
        ]
    return rows


@pytest.mark.parametrize("path,options", table_rows(), ids=lambda x: " ".join(x) if x else "")
def test_every_table_command_and_option_exists(path: list[str], options: list[str]) -> None:
    proc = scalelab([*path, "--help"], ROOT)
    assert proc.returncode == 0, (path, proc.stderr[-1000:])
    for opt in options:
        assert opt in proc.stdout, (
            f"`scalelab {' '.join(path)}` has no {opt} (README's command table says it does)"
        )


def test_make_targets_exist_and_demo_runs_the_quickstart_commands() -> None:
    makefile = (ROOT / "Makefile").read_text()
    for target in ("demo", "test"):
        assert re.search(rf"^{target}:", makefile, flags=re.M), target
    recipe = re.search(r"^demo:.*?\n((?:\t.*\n)+)", makefile, flags=re.M).group(1)
    for line in [c for b in blocks("bash") for c in commands(b) if "scalelab" in c]:
        words = shlex.split(line)
        sub = " ".join(words[1:3]) if words[1] == "study" else words[1]
        assert f"$(BIN)/scalelab {sub}" in recipe, line
