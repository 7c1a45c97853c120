"""`scalelab serve` and `scalelab distill`: thin wrappers over `scalelab.serve`, rendered with rich.

FastAPI/uvicorn (the `serve` extra) are imported only when a server is actually started, so the rest of
the CLI — and `serve --report`, `distill` — work without them.
"""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from scalelab.errors import ScalelabError

console = Console()


class Quantize(StrEnum):
    int8 = "int8"
    int4 = "int4"


def _mib(n: float) -> str:
    return f"{n / (1 << 20):.2f} MiB"


def serve(
    run_dir: Annotated[Path, typer.Argument(help="Run directory (config.json + checkpoint/).")],
    host: Annotated[str, typer.Option(help="Bind address; loopback unless --allow-remote.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="TCP port.")] = 8000,
    max_batch: Annotated[
        int, typer.Option("--max-batch", min=1, help="KV slots = largest decode batch.")
    ] = 32,
    max_wait_ms: Annotated[
        float,
        typer.Option(
            "--max-wait-ms",
            min=0,
            help="Longest a request waits for others arriving with it, to share one prefill "
            "(a burst ends after 2 ms without arrivals, so a lone request waits 2 ms).",
        ),
    ] = 20.0,
    max_queue: Annotated[
        int,
        typer.Option("--max-queue", min=1, help="Requests that may wait beyond the free slots (then 503)."),
    ] = 256,
    quantize: Annotated[
        Quantize | None,
        typer.Option(
            "--quantize",
            help="int8: torchao int8 weight-only Linears; int4: group-wise int4 Linears and embeddings.",
        ),
    ] = None,
    report: Annotated[
        bool,
        typer.Option("--report", help="With --quantize: print size and held-out loss change, then exit."),
    ] = False,
    device: Annotated[str, typer.Option(help="cpu, cuda or auto.")] = "cpu",
    threads: Annotated[int | None, typer.Option(min=1, help="torch intra-op threads.")] = None,
    response_cache_mb: Annotated[float, typer.Option("--response-cache-mb", min=0)] = 16.0,
    prefix_cache_mb: Annotated[float, typer.Option("--prefix-cache-mb", min=0)] = 64.0,
    allow_remote: Annotated[
        bool, typer.Option("--allow-remote", help="Allow a non-loopback --host (no authentication!).")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="--report as JSON.")] = False,
) -> None:
    """Serve a trained run over HTTP: POST /v1/generate, POST /v1/score, GET /health, GET /metrics, and the
    OpenAI-compatible GET /v1/models, POST /v1/completions, POST /v1/chat/completions.

    Requests are batched dynamically (continuous batching with a KV cache); identical deterministic
    requests and repeated prompt prefixes are cached. Weights are read from the newest checkpoint whose
    checksums verify (safetensors only).
    """
    if report:
        if quantize is None:
            raise typer.BadParameter("--report needs --quantize int8 or int4", param_hint="--report")
        from scalelab.serve.quantize import quantization_report

        if threads:
            import torch

            torch.set_num_threads(threads)
        rep = quantization_report(run_dir, quantize.value, device="cpu" if device == "auto" else device)
        if as_json:
            print(json.dumps(rep, indent=2))
            return
        t = Table(title=f"run {rep['run_id']}: {rep['mode']} quantization ({rep['device']})")
        for col in ("", "fp32", rep["mode"], "change"):
            t.add_column(col, justify="right")
        t.add_row(
            "size",
            _mib(rep["fp32_size_bytes"]),
            _mib(rep["quantized_size_bytes"]),
            f"{rep['size_ratio']:.1%} of fp32 ({1 / rep['size_ratio']:.2f}× smaller)",
        )
        t.add_row(
            f"held-out loss ({rep['heldout_tokens']} tokens)",
            f"{rep['fp32_heldout_loss']:.4f}",
            f"{rep['quantized_heldout_loss']:.4f}",
            f"{rep['loss_delta']:+.4f} nats",
        )
        console.print(t)
        verdict = "within" if rep["within_tolerance"] else "OUTSIDE"
        console.print(f"loss change {verdict} the tolerance of ±{rep['tolerance_nats']:.4f} nats")
        return
    try:
        from scalelab.serve.app import check_loopback, run
    except ImportError as err:
        raise ScalelabError(
            f"scalelab serve needs the 'serve' extra (FastAPI, uvicorn): pip install 'scalelab[serve]' ({err})"
        ) from None
    from scalelab.serve.server import InferenceServer, ServeConfig

    check_loopback(host, allow_remote)
    config = ServeConfig(
        max_batch=max_batch,
        max_wait_ms=max_wait_ms,
        max_queue=max_queue,
        quantize=quantize.value if quantize else None,
        device=device,
        threads=threads,
        response_cache_bytes=int(response_cache_mb * (1 << 20)),
        prefix_cache_bytes=int(prefix_cache_mb * (1 << 20)),
    )
    server = InferenceServer.from_run_dir(run_dir, config)
    console.print(
        f"serving run {server.run.spec.run_id} (step {server.run.step}, {_mib(server.size_bytes)}"
        f"{', ' + config.quantize if config.quantize else ''}) on http://{host}:{port}  "
        f"max_batch={max_batch} max_wait_ms={max_wait_ms:g} max_queue={max_queue}",
        highlight=False,
    )
    run(server, host, port)


def distill(
    teacher: Annotated[Path, typer.Option("--teacher", help="Teacher run directory.")],
    student: Annotated[
        Path, typer.Option("--student", help="Student config TOML ([model], [train], [distill]).")
    ],
    out: Annotated[Path, typer.Option("--out", help="Output directory (student/, scratch/, report).")],
    set_: Annotated[
        list[str] | None, typer.Option("--set", "-s", help="Override a student field: --set train.lr=1e-3.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Train a student on a teacher's soft targets (T²·KL + CE) and compare it with the same student
    trained from scratch on the same tokens (held-out loss of both)."""
    from scalelab.serve.distill import distill as run_distill

    with _TrainProgress() as progress:
        rep = run_distill(teacher, student, out, tuple(set_ or ()), callbacks=progress.callbacks)
    if as_json:
        print(json.dumps(rep, indent=2))
        return
    t = Table(
        title=f"distillation of {rep['teacher_run_id']} into {rep['student_run_id']} ({rep['tokens']} tokens)"
    )
    t.add_column("model")
    t.add_column("held-out loss", justify="right")
    fmt = lambda x: "—" if x is None else f"{x:.4f}"  # noqa: E731
    t.add_row("teacher", fmt(rep["teacher_eval_loss"]))
    t.add_row("student (distilled)", fmt(rep["student_eval_loss"]))
    t.add_row("student (scratch)", fmt(rep["scratch_eval_loss"]))
    console.print(t)
    if rep["student_minus_scratch"] is not None:
        console.print(
            f"distilled − scratch: {rep['student_minus_scratch']:+.4f} nats  (report: {out / 'distill_report.json'})"
        )


class _TrainProgress:
    """A rich progress bar per training phase on a terminal; nothing when not a TTY."""

    def __init__(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
        )
        self.enabled = console.is_terminal

    def __enter__(self) -> _TrainProgress:
        if self.enabled:
            self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self.progress.stop()

    def callbacks(self, phase: str) -> list[Any]:
        if not self.enabled:
            return []
        from scalelab.train.trainer import Callback, TrainState

        progress = self.progress
        task = progress.add_task(f"{phase} steps", total=None)

        class _Bar(Callback):
            def on_step_end(self, state: TrainState) -> None:
                progress.update(task, completed=state.step, total=state.total_steps)

        return [_Bar()]


def register(app: typer.Typer) -> None:
    """Add the top-level `serve` and `distill` commands to the scalelab CLI."""
    app.command("serve")(serve)
    app.command("distill")(distill)
