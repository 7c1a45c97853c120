"""`python -m scalelab.serve serve RUN_DIR …` / `… distill …`: the serve commands without the main CLI."""

from __future__ import annotations

import logging
import sys

import typer

from scalelab.errors import ScalelabError
from scalelab.serve.commands import register

app = typer.Typer(name="scalelab-serve", no_args_is_help=True, pretty_exceptions_enable=False)
register(app)


def main() -> None:
    logging.basicConfig(
        level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    try:
        app()
    except ScalelabError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
