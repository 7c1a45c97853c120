"""`scalelab data …` imports only the data commands (start-up of every ingest and stats process); other
command lines, and importers of `scalelab.cli`, get every command."""

from __future__ import annotations

import os
import subprocess
import sys


def imported_command_modules(*args: str) -> set[str]:
    proc = subprocess.run([sys.executable, "-v", "-m", "scalelab", *args], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return {
        line.split("'")[1]
        for line in proc.stderr.splitlines()
        if line.startswith("import 'scalelab.") and line.split("'")[1].endswith(".commands")
    }


def test_a_data_command_line_imports_only_the_data_commands():
    assert imported_command_modules("--verbose", "data", "ingest", "--help") == {"scalelab.data.commands"}


def test_other_command_lines_and_importers_get_every_command():
    everything = imported_command_modules("--help")
    assert {"scalelab.data.commands", "scalelab.fit.commands", "scalelab.train.commands"} <= everything
    from scalelab.cli import app

    names = {g.name for g in app.registered_groups} | {c.name for c in app.registered_commands}
    assert {"data", "transfer"} <= names


def test_console_script_workers_do_not_reimport_the_cli(tmp_path):
    script = tmp_path / "scalelab"  # what pip writes for the console script
    script.write_text(
        "import sys\nfrom scalelab.cli import main\nif __name__ == '__main__':\n    sys.exit(main())\n"
    )
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("some text to tokenize\n" * 2000)
    proc = subprocess.run(
        [
            sys.executable,
            str(script),
            "data",
            "ingest",
            str(corpus),
            "-o",
            str(tmp_path / "store"),
            "-j",
            "2",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPROFILEIMPORTTIME": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "store" / "index.json").exists()
    imports = [line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if "|" in line]
    assert imports.count("scalelab.data.ingest") >= 2  # this process's and the worker server's
    assert imports.count("scalelab.cli") == 1  # the command's own import only
