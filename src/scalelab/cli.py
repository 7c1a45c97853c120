"""The `scalelab` command: thin wrappers that parse, call the library and render the result with rich.

Every command that takes a spec accepts `--set dotted.path=value` overrides, validated like the file.
Exit codes (docs/trust.md): 0 success; 2 a user-caused error (bad spec, flag, file or data; a lock held
by another process), printed as one paragraph naming the file/field/flag; 1 a failed run (`train`: see
`exit_code`; 3 diverged) or an internal error (one paragraph, "a bug"); 130 interrupted. `--debug`
shows the traceback.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

import scalelab
from scalelab.cli_study import study_advise
from scalelab.errors import ScalelabError
from scalelab.units import duration, energy, flops, si

console = Console()
err_console = Console(stderr=True)
_state: dict[str, Any] = {"debug": False}

app = typer.Typer(
    name="scalelab",
    help=(
        "From small pilot runs to production-scale training without surprises.\n\n"
        "Typical flow: `scalelab study plan STUDY.toml` (what will run and what it costs) → "
        "`scalelab study run STUDY.toml --out DIR` → `scalelab fit DIR` → `scalelab report DIR`."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)
study_app = typer.Typer(
    help="Plan, run and inspect scaling studies (grids and IsoFLOP designs).", no_args_is_help=True
)
app.add_typer(study_app, name="study")
study_app.command("advise")(study_advise)

SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a spec field: `--set model.width=128` (repeatable)."),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of tables.")]


def _version(value: bool) -> None:
    if value:
        console.print(f"scalelab {scalelab.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log progress details.")] = False,
) -> None:
    _state["debug"] = debug
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _fmt_int(x: Any) -> str:
    return si(x) if x is None or abs(float(x)) >= 1000 else f"{float(x):.0f}"


def _fmt_float(x: Any, spec: str = ".4f") -> str:
    return "—" if x is None else format(float(x), spec)


def _is_tty() -> bool:
    return console.is_terminal


def _out_dir(path: Path, flag: str = "--out") -> Path:
    """`path` as a directory this command can write (created if needed); ScalelabError naming `flag`."""
    from scalelab.errors import SpecError

    if path.exists() and not path.is_dir():
        raise SpecError(f"{flag} {path}: exists and is not a directory; give a directory path")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SpecError(f"{flag} {path}: cannot create the directory ({err.strerror or err})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise SpecError(f"{flag} {path}: the directory is not writable")
    return path


FORECASTING = "forecasting run times (a few timed steps per model shape; cached per machine) …"


# ------------------------------------------------------------------------------------------ study
@study_app.command("plan")
def study_plan(
    spec: Annotated[Path, typer.Argument(help="Study spec (TOML).")],
    set_: SetOption = None,
    parallel: Annotated[
        int, typer.Option("--parallel", "-j", min=1, help="Runs at once (for the wall time).")
    ] = 1,
    measure: Annotated[
        bool,
        typer.Option("--measure/--no-measure", help="Time a few real steps per shape to forecast (cached)."),
    ] = True,
    price: Annotated[
        float | None,
        typer.Option("--price", min=0, help="Price per device-hour (overrides the spec's forecast section)."),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Show every run the study will make (id, shape, N, D, FLOPs, forecast time, memory, energy, cost) and
    the totals.

    Forecasts come from throughput measured on this machine: a few timed optimizer steps per distinct
    shape, cached per machine, so the first plan takes seconds and later ones nothing.
    """
    from scalelab.spec import load_study
    from scalelab.study.forecast import Forecaster, Pricing, plan_rows
    from scalelab.study.plan import expand_runs

    study = load_study(spec, set_ or ())
    if measure:
        err_console.print(FORECASTING, markup=False, highlight=False, soft_wrap=True)
    pricing = Pricing.from_spec(study.forecast, price)
    runs = expand_runs(study, source=spec.name)
    plan = plan_rows(runs, Forecaster() if measure else None, parallel, pricing)
    if as_json:
        print(json.dumps({"study": study.name, **plan}, indent=2))
        return
    rows, total = plan["runs"], plan["total"]
    from scalelab.cli_study import plan_view

    console.print(plan_view(f"study '{study.name}': {len(rows)} runs", rows))
    line = f"total: {total['runs']} runs, {_fmt_int(total['tokens'])} tokens, {flops(total['flops'])}"
    if total["flops_to_spend"] < total["flops"]:
        line += (
            f" as a grid; WSD branches train {_fmt_int(total['tokens_to_train'])} tokens, "
            f"{flops(total['flops_to_spend'])} ({1 - total['flops_to_spend'] / total['flops']:.0%} saved)"
        )
    if total["forecast_wall_seconds"] is not None:
        line += (
            f"; forecast {total['forecast_run_seconds'] / 60:.1f} run-minutes, "
            f"{total['forecast_wall_seconds'] / 60:.1f} minutes wall with --parallel {parallel}"
        )
    if total["forecast_energy_joules"] is not None:
        line += f"; energy {energy(total['forecast_energy_joules'])}"
    if total["forecast_cost"] is not None:
        line += f"; cost {total['forecast_cost']:.2f} {total['currency']}"
    console.print(line)


@study_app.command("run")
def study_run(
    spec: Annotated[Path, typer.Argument(help="Study spec (TOML).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Study directory (registry, runs/, report/).")],
    set_: SetOption = None,
    parallel: Annotated[
        int,
        typer.Option(
            "--parallel",
            "-j",
            min=1,
            help="Runs at once (local executor on a GPU machine: each with its own GPUs, through "
            "CUDA_VISIBLE_DEVICES; see docs/studies.md).",
        ),
    ] = 1,
    timeout: Annotated[float | None, typer.Option(help="Per-run timeout in seconds.")] = None,
    retries: Annotated[int, typer.Option(min=0, help="Retries of a run whose process crashed.")] = 0,
    executor_kind: Annotated[
        str,
        typer.Option(
            "--executor",
            help="`local` (subprocesses here), `ray`, or `slurm` (a job per run; [study.slurm] resources).",
        ),
    ] = "local",
    address: Annotated[
        str | None, typer.Option(help="Ray cluster address; default: a local Ray instance.")
    ] = None,
    gpus_per_run: Annotated[float, typer.Option(help="Ray: GPUs requested per run.")] = 0.0,
    nproc_per_run: Annotated[
        int,
        typer.Option(
            min=1,
            help="Ranks per ddp/fsdp run: each such run trains under torchrun with this many processes "
            "(in its Ray task with --executor ray; one per GPU on GPU nodes).",
        ),
    ] = 1,
    forecast: Annotated[
        bool,
        typer.Option("--forecast/--no-forecast", help="Forecast each run's time first (see `study plan`)."),
    ] = True,
) -> None:
    """Run (or continue) a study: finished runs are skipped, interrupted ones resume from checkpoints."""
    from scalelab.cli_progress import LiveTextColumn
    from scalelab.spec import load_study
    from scalelab.study.eta import StudyEta
    from scalelab.study.executors import ExecutorOptions, RunOutcome, make_executor, run_study
    from scalelab.study.plan import expand_runs

    study = load_study(spec, set_ or ())
    _out_dir(out)
    expand_runs(study, source=spec.name)  # every run the design makes is valid, before anything runs
    executor = make_executor(
        executor_kind,
        study,
        ExecutorOptions(
            parallel=parallel,
            timeout_seconds=timeout,
            retries=retries,
            nproc_per_run=nproc_per_run,
            address=address,
            gpus_per_run=gpus_per_run,
        ),
    )
    forecasters: list[Any] = []

    def forecast_seconds(planned: Any) -> float | None:
        """Measured-throughput forecast; torch is imported only when some run still has to train."""
        if not forecast:
            return None
        if not forecasters:
            from scalelab.study.forecast import Forecaster

            console.print(FORECASTING, markup=False, highlight=False, soft_wrap=True)
            forecasters.append(Forecaster())
        fc = forecasters[0].forecast(planned)
        return None if fc is None else fc.seconds

    eta: list[StudyEta] = []

    def eta_text() -> str:
        return f"ETA {duration(eta[0].seconds_left())}" if eta else ""

    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        LiveTextColumn(eta_text),
        console=console,
        disable=not _is_tty(),
    )
    task: list[Any] = []

    def on_plan(runs: list[Any], forecasts: dict[str, float | None]) -> None:
        todo = len(forecasts)
        eta.append(StudyEta(forecasts, parallel))
        line = f"study '{study.name}': {len(runs)} runs, {len(runs) - todo} already done, {todo} to run"
        if todo and eta[0].seconds_left() is not None:
            line += f"; forecast {duration(eta[0].seconds_left())} with --parallel {parallel}"
        console.print(line, soft_wrap=True)
        task.append(progress.add_task("training", total=todo))

    def on_done(o: RunOutcome) -> None:
        progress.advance(task[0])
        eta[0].finished(o.run_id, o.seconds)
        line = f"{o.run_id}: {o.status} in {o.seconds:.1f} s"
        if o.error:
            line += f" — {o.error.splitlines()[0][:160]}"
        if not _is_tty():
            line += f" · {progress.tasks[0].completed:.0f}/{progress.tasks[0].total:.0f} · study {eta_text()}"
        console.print(line, markup=False, highlight=False, soft_wrap=True)

    with progress:
        result = run_study(
            study,
            out,
            executor=executor,
            source_text=spec.read_text(encoding="utf-8"),
            overrides=tuple(set_ or ()),
            progress=on_done,
            on_plan=on_plan,
            forecast=forecast_seconds,
            on_status=lambda message: console.print(message, markup=False, highlight=False, soft_wrap=True),
        )
    n_fail = len(result.outcomes) - result.count("done") - result.count("skipped")
    console.print(
        f"done: {result.count('done')} trained, {result.count('skipped')} skipped, {n_fail} not done → {out}"
    )
    if n_fail:
        console.print("see `scalelab study status " + str(out) + "` for the failures")


@study_app.command("status")
def study_status(
    study_dir: Annotated[Path, typer.Argument(help="Study directory.")],
    as_json: JsonOption = False,
) -> None:
    """Each run's status, size, losses and time from the registry; failures with their reason."""
    from scalelab.registry import Registry

    with Registry(study_dir / "registry.sqlite", create=False) as reg:
        rows = reg.runs()
    if as_json:
        keep = (
            "run_id",
            "status",
            "point",
            "n_params",
            "tokens",
            "flops",
            "eval_loss",
            "final_train_loss",
            "wall_seconds",
            "forecast_seconds",
            "attempts",
            "error",
            "run_dir",
        )
        print(json.dumps([{k: r.get(k) for k in keep} for r in rows], indent=2))
        return
    from scalelab.cli_study import status_view

    console.print(status_view(f"{study_dir}: {len(rows)} runs", rows))


@study_app.command("add-run")
def study_add_run(
    study_dir: Annotated[Path, typer.Argument(help="Study directory.")],
    run_dir: Annotated[Path, typer.Argument(help="A finished run directory (from `scalelab train`).")],
    role: Annotated[
        str, typer.Option(help="`target`: a big run checked against the prediction, never fitted.")
    ] = "target",
) -> None:
    """Add a finished run from outside the design, e.g. the big run trained with the recommended settings;
    `scalelab report` then shows its actual loss against the predicted interval."""
    from scalelab.fit.api import check_against_fit
    from scalelab.study.add_run import add_run

    row = add_run(study_dir, run_dir, role=role)
    console.print(
        f"added {row['run_id']} as a {row['role']} run: N={_fmt_int(row['n_params'])}, "
        f"D={_fmt_int(row['tokens'])}, eval loss {_fmt_float(row['eval_loss'])}"
    )
    check = check_against_fit(study_dir, row)
    if check is None:
        console.print("no fit to compare with yet: run `scalelab fit` on the study, then `scalelab report`")
    elif "interval" in check:
        lo, hi = check["interval"]
        where = "[green]inside[/]" if check["inside"] else "[red]OUTSIDE[/]"
        console.print(
            f"the fit predicted {check['predicted']:.4g} ({check['interval_kind']} interval "
            f"[{lo:.4g}, {hi:.4g}]); actual {check['actual']:.4g}: {where}"
        )
        if check.get("verdict"):
            console.print(f"  ({check['verdict']})", highlight=False)
    else:
        console.print(f"the fit predicted {check['predicted']:.4g}; actual {check['actual']:.4g}")


@study_app.command("watch")
def study_watch(
    study_dir: Annotated[Path, typer.Argument(help="Study directory.")],
    interval: Annotated[float, typer.Option(min=0.2, help="Seconds between refreshes.")] = 2.0,
    once: Annotated[bool, typer.Option("--once", help="Print one snapshot and exit.")] = False,
) -> None:
    """A live dashboard of a study: each run's width, N, D, progress, loss, tokens/s and ETA, and the
    study's ETA. Waits for the study's registry to appear; exits when no run is pending or running."""
    from scalelab.errors import RegistryError
    from scalelab.study.watch import registry_exists

    if once and not registry_exists(study_dir):
        raise RegistryError(
            f"{study_dir}: no registry.sqlite yet; start the study with `scalelab study run`, or watch "
            "without --once to wait for it"
        )
    try:
        _watch(study_dir, interval, once)
    except KeyboardInterrupt:  # leaving the dashboard stops nothing
        pass


def _watch(study_dir: Path, interval: float, once: bool) -> None:
    import time

    from rich.live import Live

    from scalelab.cli_study import study_title, watch_view
    from scalelab.study.watch import registry_exists, study_eta, study_progress

    live_tty = _is_tty() and not once
    if not registry_exists(study_dir):
        console.print(
            f"waiting for {study_dir / 'registry.sqlite'} (`scalelab study run` creates it) …",
            soft_wrap=True,
            markup=False,
        )
        while not registry_exists(study_dir):
            time.sleep(interval)

    def snapshot() -> tuple[Any, bool]:
        rows = study_progress(study_dir)
        counts: dict[str, int] = {}
        for r in rows:
            counts[r.status] = counts.get(r.status, 0) + 1
        ended = all(r.finished for r in rows)
        return watch_view(study_title(str(study_dir), counts, study_eta(rows)), rows), ended

    view, ended = snapshot()
    if once or ended or not live_tty:
        console.print(view)
        if once or ended:
            return
        while not ended:  # not a terminal: a snapshot every `interval` until the study ends
            time.sleep(interval)
            view, ended = snapshot()
            console.print(view)
        return
    with Live(view, console=console, refresh_per_second=4) as live:
        while not ended:
            time.sleep(interval)
            view, ended = snapshot()
            live.update(view)
    console.print("study finished")


# ------------------------------------------------------------------------------------------ train
@app.command("train")
def train(
    config: Annotated[
        Path, typer.Argument(help="Run config: TOML with [model], [data], [train], or config.json.")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run directory.")],
    set_: SetOption = None,
    resume: Annotated[
        bool, typer.Option("--resume/--no-resume", help="Continue from the last good checkpoint in --out.")
    ] = True,
    snapshot_at: Annotated[
        str | None,
        typer.Option(
            "--snapshot-at",
            help="Comma-separated steps at which to keep a checkpoint for good in --out/snapshots/ "
            "(a WSD trunk: shorter runs branch from these).",
        ),
    ] = None,
    branch_from: Annotated[
        Path | None,
        typer.Option(
            "--branch-from",
            help="A WSD trunk's snapshot directory (RUN/snapshots/step-N) to start from when --out has no "
            "checkpoint: only the cooldown is trained, with the same result as from scratch.",
        ),
    ] = None,
    progress_every: Annotated[
        float,
        typer.Option(
            "--progress-every",
            min=0.0,
            envvar="SCALELAB_PROGRESS_SECONDS",
            help="When the output is not a terminal: seconds between progress lines on stderr "
            "(step, loss, tokens/s, MFU, ETA). A terminal shows a live bar instead.",
        ),
    ] = 10.0,
) -> None:
    """Train one run; writes config.json, provenance.json, metrics.jsonl, checkpoint/ and record.json.

    Progress (step, loss, tokens/s, MFU, ETA) goes to stderr: a live bar on a terminal, a plain line every
    `--progress-every` seconds otherwise; under torchrun only rank 0 reports.
    """
    from scalelab.cli_progress import StepProgressView
    from scalelab.extras import require_sinks
    from scalelab.spec import load_run
    from scalelab.train.progress import ProgressCallback
    from scalelab.train.run import exit_code, run_training, torchrun_world_size, under_torchrun

    spec = under_torchrun(load_run(config, set_ or ()))  # torchrun + a plain spec: DDP
    require_sinks(spec.train.sinks)  # a missing optional package is a spec error, before anything runs
    steps = _parse_steps(snapshot_at) if snapshot_at else ()
    _out_dir(out)
    main_rank = os.environ.get("RANK", "0") == "0"  # under torchrun, rank 0 reports for all
    lock: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
    if main_rank:  # one trainer per run directory (rank 0 speaks for a torchrun job)
        from scalelab.io import file_lock

        lock = file_lock(out / ".run.lock", wait=False, what=f"{out} (a run being trained)")
    view = StepProgressView(err_console, live=err_console.is_terminal, interval_seconds=progress_every)
    with lock:
        if main_rank:
            err_console.print(
                f"{spec.run_id}: preparing the token store (built from the corpus once, then cached), the "
                "model and the data loader …",
                markup=False,
                highlight=False,
                soft_wrap=True,
            )
        with view:
            record = run_training(
                spec,
                out,
                resume=resume,
                snapshot_steps=steps,
                branch_from=branch_from,
                callbacks=[ProgressCallback(view, spec.run_id)] if main_rank else [],
            )
    if main_rank:
        console.print(
            f"{record['run_id']}: {record['status']} — train loss {_fmt_float(record.get('final_train_loss'))}, "
            f"eval loss {_fmt_float(record.get('eval_loss'))}, {_fmt_float(record.get('wall_seconds'), '.1f')} s"
            + (f"\n{record['error']}" if record.get("error") else ""),
            markup=False,  # errors carry brackets (gloo's "[/…/pair.cc:152]") that are not rich markup
            highlight=False,
        )
    code = exit_code(record)
    if torchrun_world_size() > 1:
        # A rank of a finished job leaves without interpreter teardown: in two full test runs, 3 two-rank
        # CPU jobs had a rank abort there ("terminate called without an active exception", exit -6)
        # after the record, the checkpoints and the process group's shutdown were all done, failing the
        # whole torchrun job (cause not found yet). Everything is written atomically by now; only the
        # exit code is left to give.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    raise typer.Exit(code)


def _parse_steps(text: str) -> tuple[int, ...]:
    try:
        steps = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ScalelabError(f"--snapshot-at {text!r}: expected comma-separated step numbers") from None
    if any(s < 1 for s in steps):
        raise ScalelabError(f"--snapshot-at {text!r}: steps count from 1")
    return steps


# ----------------------------------------------------------------------------------------- report
@app.command("report")
def report(
    study_dir: Annotated[Path, typer.Argument(help="Study directory (after `scalelab fit`).")],
    open_: Annotated[bool, typer.Option("--open", help="Open the report in a browser.")] = False,
    notebook: Annotated[
        bool, typer.Option("--notebook", help="Also write report/report.ipynb, which rebuilds every figure.")
    ] = False,
    transfer: Annotated[
        Path | None,
        typer.Option(
            "--transfer", help="An LR-sweep study directory whose transfer analysis the report includes."
        ),
    ] = None,
    noise_scale: Annotated[
        Path | None,
        typer.Option(
            help="JSON of `scalelab transfer noise-scale --json`: batch size for the recommended run."
        ),
    ] = None,
    usd_per_hour: Annotated[
        float | None,
        typer.Option(
            "--usd-per-hour",
            min=0.0,
            help="Price of the study's hardware per hour: the recommended run's cost.",
        ),
    ] = None,
) -> None:
    """Write DIR/report/index.html: the decision (recommended run, next actions), loss curves, the fit and
    its intervals (self-contained); and DIR/report/recommended_run.toml, ready for `scalelab train`."""
    from scalelab.report.html import build_report

    path = build_report(study_dir, transfer, noise_scale, usd_per_hour)
    console.print(f"report: {path}")
    if (path.parent / "recommended_run.toml").exists():
        console.print(f"recommended run: {path.parent / 'recommended_run.toml'}")
    if notebook:
        from scalelab.report.notebook import write_notebook

        console.print(f"notebook: {write_notebook(study_dir)}")
    if open_:
        import webbrowser

        webbrowser.open(path.resolve().as_uri())


# -------------------------------------------------------------------------------- mounted modules
_GROUPS = (("scalelab.data.commands", "data"), ("scalelab.transfer.commands", "transfer"))
_REGISTERING = (
    "scalelab.fit.commands",
    "scalelab.serve.commands",
    "scalelab.train.commands",
    "scalelab.export.commands",
)


def _mount_optional(only: str | None = None) -> None:
    """Sub-commands owned by other modules; each module registers its own (`app` sub-apps or `register`).

    With `only` (a sub-app's name), just that sub-app: a command line under it needs no other module,
    and typer then builds no other command (~0.1 s of each `scalelab data …` process)."""
    import importlib

    for module, name in _GROUPS:
        if only not in (None, name):
            continue
        try:
            app.add_typer(importlib.import_module(module).app, name=name)
        except (ImportError, AttributeError) as err:  # pragma: no cover - a module still being built
            logging.getLogger(__name__).debug("%s commands unavailable: %s", name, err)
    for module in _REGISTERING if only is None else ():
        try:
            importlib.import_module(module).register(app)
        except (ImportError, AttributeError) as err:  # pragma: no cover
            logging.getLogger(__name__).debug("%s unavailable: %s", module, err)


def _group_on_command_line() -> str | None:
    """The mounted sub-app this process's command line runs, when this process is the `scalelab`
    command (``python -m scalelab`` or the console script) and its first word names one; else None
    (importers such as tests get every command)."""
    main_spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    as_command = (main_spec is not None and main_spec.name == "scalelab.__main__") or (
        Path(sys.argv[0]).name == "scalelab"
    )
    first = next((a for a in sys.argv[1:] if not a.startswith("-")), None)
    return first if as_command and first in {name for _, name in _GROUPS} else None


_mount_optional(_group_on_command_line())


INTERRUPTED = "interrupted; re-run the same command to continue where it stopped"


def _from_ctrl_c(err: BaseException) -> bool:
    """Whether `err` comes from a KeyboardInterrupt (typer turns Ctrl-C into a silent exit code 130)."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, KeyboardInterrupt):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _console_script_is_package_main() -> None:
    """The `scalelab` console script is ``python -m scalelab``: say so on its ``__main__`` module, as
    ``-m`` does. Otherwise every spawn or forkserver child (each ingest or stats worker) re-runs the
    script on start, importing this whole CLI (~0.2 CPU-s each) for nothing it uses."""
    main_module = sys.modules.get("__main__")
    if getattr(main_module, "__spec__", True) is None and Path(sys.argv[0]).name == "scalelab":
        import importlib.util

        main_module.__spec__ = importlib.util.find_spec("scalelab.__main__")  # type: ignore[union-attr]


def main() -> None:
    """Entry point: run the app; expected errors become one paragraph and exit code 2, Ctrl-C says how to
    continue and exits 130."""
    _console_script_is_package_main()
    try:
        app()
    except ScalelabError as err:
        if _state["debug"]:
            raise
        err_console.print(f"[bold red]error:[/] {escape(str(err))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print(INTERRUPTED)
        sys.exit(130)
    except SystemExit as done:
        if done.code == 130 and _from_ctrl_c(done):
            err_console.print(INTERRUPTED)
        raise
    except OSError as err:  # a path given on the command line that cannot be read or written
        if _state["debug"] or not (err.filename or err.filename2):
            raise
        path = err.filename2 or err.filename
        err_console.print(
            f"[bold red]error:[/] {escape(str(path))}: {escape(err.strerror or str(err))}; check the paths "
            "given on the command line (an --out that is a file, a folder that cannot be created, a missing "
            "input)",
            highlight=False,
            soft_wrap=True,
        )
        sys.exit(2)
    except Exception as err:  # noqa: BLE001 — not the user's fault: one paragraph, exit 1, traceback on --debug
        if _state["debug"]:
            raise
        err_console.print(
            f"[bold red]internal error:[/] {escape(type(err).__name__)}: {escape(str(err)[:500])} — this is a "
            "bug in scalelab, not in your input; re-run with --debug for the traceback and report it",
            highlight=False,
            soft_wrap=True,
        )
        sys.exit(1)
