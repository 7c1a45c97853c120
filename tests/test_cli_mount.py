"""`scalelab data …` imports only the data commands (start-up of every ingest and stats process); other
command lines, and importers of `scalelab.cli`, get every command."""

from __future__ import annotations

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
