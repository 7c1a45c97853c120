"""CLI commands of train/: `scalelab launch` (torchrun wrapper). `register(app)` adds them to the app."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    """Add the `launch` command to the `scalelab` typer app."""

    @app.command("launch")
    def launch_cmd(
        config: Annotated[Path, typer.Argument(help="Run config (TOML or config.json), as for `train`.")],
        out: Annotated[Path, typer.Option("--out", "-o", help="Run directory.")],
        nproc: Annotated[int, typer.Option("--nproc", help="Processes (ranks) per node.")] = 2,
        set_: Annotated[
            list[str] | None,
            typer.Option("--set", "-s", help="Override a spec field: `--set execution.strategy=fsdp`."),
        ] = None,
        max_restarts: Annotated[
            int, typer.Option("--max-restarts", help="Restart the group this often after a rank dies.")
        ] = 0,
        nnodes: Annotated[
            str, typer.Option("--nnodes", help="Nodes: N, or MIN:MAX for an elastic job.")
        ] = "1",
        rdzv_endpoint: Annotated[
            str | None,
            typer.Option("--rdzv-endpoint", help="c10d rendezvous HOST:PORT (default 127.0.0.1:free)."),
        ] = None,
        rdzv_conf: Annotated[
            str | None, typer.Option("--rdzv-conf", help="torchrun rendezvous options, KEY=VALUE,…")
        ] = None,
        resume: Annotated[
            bool, typer.Option("--resume/--no-resume", help="Continue from the last committed checkpoint.")
        ] = True,
        dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the torchrun command only.")] = False,
    ) -> None:
        """Train one run on several processes: wraps `python -m torch.distributed.run … scalelab train`.

        Without `--set execution.strategy=…` the config's strategy is used; 'none' is set to 'ddp' (in
        [execution], so the run keeps its id).
        """
        from scalelab.extras import require_sinks
        from scalelab.spec import load_run
        from scalelab.train.parallel.launch import launch, torchrun_command

        overrides = list(set_ or ())
        spec = load_run(config, overrides)  # validate here, once, before any process starts
        require_sinks(spec.train.sinks)
        if spec.train.strategy == "none":
            overrides.append("execution.strategy=ddp")  # execution only: same run id
        argv = torchrun_command(
            config,
            out,
            nproc=nproc,
            overrides=overrides,
            max_restarts=max_restarts,
            nnodes=nnodes,
            rdzv_endpoint=rdzv_endpoint,
            rdzv_conf=rdzv_conf,
            resume=resume,
        )
        if dry_run:
            typer.echo(" ".join(argv))
            raise typer.Exit(0)
        raise typer.Exit(launch(argv))
