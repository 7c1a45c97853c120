"""CLI of export/: `scalelab export RUN_DIR --format hf --out DIR`. `register(app)` adds it to the app."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    """Add the `export` command to the `scalelab` typer app."""

    @app.command("export")
    def export_cmd(
        run_dir: Annotated[Path, typer.Argument(help="Run directory (config.json + checkpoint/).")],
        out: Annotated[Path, typer.Option("--out", "-o", help="Directory to write.")],
        format_: Annotated[str, typer.Option("--format", help="Output format: `hf` (Hugging Face).")] = "hf",
    ) -> None:
        """Write a trained run as a Hugging Face model directory (config.json, model.safetensors,
        tokenizer files) with μP multipliers folded into the weights."""
        from scalelab.errors import ScalelabError
        from scalelab.export.hf import FORMATS, export_hf

        if format_ not in FORMATS:
            raise ScalelabError(f"--format: expected one of {', '.join(FORMATS)}, got {format_!r}")
        typer.echo(f"exported {run_dir} to {export_hf(run_dir, out)}")
