"""The command line as a person meets it: help, version, and errors as one paragraph with exit code 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def scalelab(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "scalelab", *args], capture_output=True, text=True, timeout=120
    )


def test_help_lists_the_commands_and_version_prints() -> None:
    out = scalelab("--help")
    assert out.returncode == 0
    for command in ("study", "train", "fit", "recommend", "report", "data", "transfer", "serve", "launch"):
        assert command in out.stdout
    assert scalelab("--version").stdout.startswith("scalelab ")


def test_a_bad_spec_is_one_paragraph_and_exit_code_2(tmp_path: Path) -> None:
    out = scalelab(
        "study", "plan", str(EXAMPLES / "quickstart.toml"), "--set", "model.width=30", "--no-measure"
    )
    assert out.returncode == 2
    assert "quickstart.toml: study.model.width: must be a multiple of n_heads=4, got 30" in " ".join(
        out.stderr.split()
    )
    assert "Traceback" not in out.stderr
    spec = tmp_path / "x.toml"
    spec.write_text("x = 1\n")
    out = scalelab("study", "plan", str(spec))
    assert out.returncode == 2 and "needs a [study] table" in out.stderr  # brackets are not rich markup


def test_plan_json_without_measuring() -> None:
    import json

    out = scalelab("study", "plan", str(EXAMPLES / "quickstart.toml"), "--no-measure", "--json")
    plan = json.loads(out.stdout)
    assert out.returncode == 0 and plan["total"]["runs"] == 12 and plan["runs"][0]["forecast_seconds"] is None
