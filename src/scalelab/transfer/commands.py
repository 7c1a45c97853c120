"""`scalelab transfer …`: analyse LR-transfer sweeps, check a transfer, the gradient noise scale, coord checks.

Thin: each command parses, calls one library function of `scalelab.transfer`, renders with rich (or prints
JSON with `--json`). Torch is imported only by commands that train.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from scalelab.errors import SpecError

app = typer.Typer(
    help="Hyperparameter transfer: LR optima across width/depth (SP, μP, depth-μP), transfer checks, "
    "gradient noise scale and batch-size/LR rules, coordinate checks.",
    no_args_is_help=True,
)

SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a run-spec field: `--set model.width=256` (repeatable)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON.")]


def _fmt(v: Any, spec: str = ".4g") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    return format(float(v), spec)


def _floats(text: str, what: str) -> list[float]:
    try:
        vals = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SpecError(f"{what}: expected comma-separated numbers, got {text!r}") from None
    if not vals:
        raise SpecError(f"{what}: no values given")
    return vals


def _console() -> Console:
    """A console at least 120 columns wide when not a terminal (tables stay readable in logs and files)."""
    c = Console()
    return c if c.is_terminal else Console(width=max(120, c.width))


def _print_json(obj: Any) -> None:
    typer.echo(json.dumps(obj, indent=2, sort_keys=True, default=str))


# ------------------------------------------------------------------------------------- analyze
def render_analysis(d: dict[str, Any], console: Console) -> None:
    """Tables for `TransferAnalysis.to_dict()`: per-shape optima, then slopes with verdicts, then warnings."""
    t = Table(title="LR optimum per shape: quadratic in ln LR, 90 % bootstrap interval; Δloss measured")
    for col in ("param.", "width", "depth", "seeds", "grid best", "LR* [interval]", "loss*", "Δ×2", "Δ×½",
                "seed std"):  # fmt: skip
        t.add_column(col, justify="left" if col == "param." else "right")
    for s in d["shapes"]:
        f = s["fit"] or {}
        iv = f.get("lr_opt_interval") or [None, None]
        edge = "" if f.get("bracketed", True) else " edge"
        t.add_row(
            s["parametrization"],
            str(s["width"]),
            str(s["depth"]),
            str(len(s["seeds"])),
            _fmt(f.get("best_grid_lr"), ".3g"),
            f"{_fmt(f.get('lr_opt'), '.3g')}{edge} [{_fmt(iv[0], '.3g')}, {_fmt(iv[1], '.3g')}]",
            _fmt(f.get("loss_at_opt")),
            _fmt(f.get("measured_x2"), ".3f"),
            _fmt(f.get("measured_half"), ".3f"),
            _fmt(f.get("seed_std"), ".2g"),
        )
    console.print(t)
    v = Table(
        title=f"how the optimum moves: ln LR* = a + slope·ln size (flat if |slope| ≤ {d['tolerance']:g})"
    )
    for col in ("param.", "axis", "held fixed", "slope", "90 % interval", "verdict"):
        v.add_column(col, justify="left" if col in ("param.", "axis", "held fixed", "verdict") else "right")
    for s in d["slopes"]:
        fixed = ", ".join(f"{k}={val}" for k, val in s["fixed"].items() if k in ("width", "depth"))
        lo, hi = s["slope_interval"]
        style = {"transfers": "green", "does not transfer": "red"}.get(s["verdict"], "yellow")
        v.add_row(
            s["parametrization"],
            s["axis"],
            fixed,
            f"{s['slope']:+.3f}",
            f"[{lo:+.3f}, {hi:+.3f}]",
            f"[{style}]{s['verdict']}[/]",
        )
    console.print(v)
    for w in d["warnings"]:
        console.print(f"[yellow]warning:[/] {w}", highlight=False)


@app.command()
def analyze(
    study_dir: Annotated[
        Path, typer.Argument(help="A study directory (with registry.sqlite) of an LR sweep.")
    ],
    json_: JsonOpt = False,
    plot: Annotated[Path | None, typer.Option("--plot", help="Write the transfer figure (PNG) here.")] = None,
    tolerance: Annotated[float, typer.Option(help="|slope| below which the optimum is flat.")] = 0.3,
    loss: Annotated[str, typer.Option(help="eval (held-out) or train loss.")] = "eval",
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples per shape.")] = 200,
    target_width: Annotated[
        int | None, typer.Option(help="Also print the LR each parametrization's fit predicts at this width.")
    ] = None,
) -> None:
    """Fit each shape's optimum LR and how it moves with width (and depth); print the verdict."""
    from scalelab.transfer.analyze import analyze_study

    if loss not in ("eval", "train"):
        raise SpecError(f"--loss: expected 'eval' or 'train', got {loss!r}")
    analysis = analyze_study(study_dir, loss=loss, tolerance=tolerance, n_bootstrap=bootstrap)
    d = analysis.to_dict()
    if target_width is not None:
        d["recommended_lr"] = {
            p: analysis.recommend_lr(p, target_width)
            for p in sorted({s.parametrization for s in analysis.shapes})
        }
        d["target_width"] = target_width
    if plot is not None:
        from scalelab.transfer.plot import plot_analysis

        d["plot"] = str(plot_analysis(analysis, plot))
    if json_:
        _print_json(d)
        return
    console = _console()
    render_analysis(d, console)
    for p, lr in (d.get("recommended_lr") or {}).items():
        console.print(f"{p}: LR predicted at width {target_width}: {_fmt(lr)}")
    if plot is not None:
        console.print(f"figure: {d['plot']}")


# --------------------------------------------------------------------------------------- check
def render_check(d: dict[str, Any], console: Console) -> None:
    t = Table(title=f"transfer check at LR {d['lr']:.4g} (tolerance {d['tolerance']:.2%})")
    for col in ("×", "LR", "final losses (per seed)", "mean"):
        t.add_column(col, justify="right")
    for p in d["points"]:
        losses = ", ".join(_fmt(v, ".4f") for v in p["losses"])
        mark = " ◀" if p["multiplier"] == 1.0 else ""
        t.add_row(f"{p['multiplier']:g}{mark}", _fmt(p["lr"]), losses, _fmt(p["mean"], ".4f"))
    console.print(t)
    verdict = "[bold green]PASS[/]" if d["passed"] else "[bold red]FAIL[/]"
    console.print(f"{verdict}: " + "; ".join(d["reasons"]), highlight=False)


@app.command()
def check(
    config: Annotated[Path, typer.Argument(help="The target run's config (TOML or config.json).")],
    set_: SetOpt = None,
    lr: Annotated[
        float | None, typer.Option(help="The transferred LR (default: the config's train.lr).")
    ] = None,
    from_: Annotated[
        Path | None,
        typer.Option("--from", help="Take the LR from this sweep's analysis at the target's width."),
    ] = None,
    multipliers: Annotated[
        str, typer.Option(help="LR multipliers of the bracket; must include 1.")
    ] = "0.5,1,2",
    seeds: Annotated[str, typer.Option(help="Seeds (comma-separated).")] = "",
    tolerance: Annotated[float, typer.Option(help="Relative loss gap to the best point that passes.")] = 0.01,
    out: Annotated[
        Path | None, typer.Option(help="Record each run under OUT/runs/<run_id> (default: in memory).")
    ] = None,
    json_: JsonOpt = False,
) -> None:
    """Train the target at the transferred LR and at ×½, ×2 around it; pass if it is within tolerance of
    the best. Exit code 0 on pass, 1 on fail."""
    from scalelab.spec import load_run
    from scalelab.transfer.check import run_check

    spec = load_run(config, set_ or [])
    if lr is not None and from_ is not None:
        raise SpecError("--lr and --from: give one of them")
    if from_ is not None:
        from scalelab.transfer.analyze import analyze_study

        analysis = analyze_study(from_)
        lr = analysis.recommend_lr(spec.model.parametrization, spec.model.width, spec.model.depth)
        if lr is None:
            raise SpecError(
                f"--from {from_}: the sweep has no width fit for parametrization '{spec.model.parametrization}'"
            )
    seed_list = [int(s) for s in _floats(seeds, "--seeds")] if seeds else None
    console = Console(stderr=True)

    def progress(r: dict[str, Any]) -> None:
        if not json_:
            console.print(
                f"×{r['multiplier']:g} seed {r['seed']}: {r['status']} eval loss {_fmt(r.get('eval_loss'), '.4f')}"
            )

    result = run_check(
        spec,
        lr,
        multipliers=_floats(multipliers, "--multipliers"),
        seeds=seed_list,
        tolerance=tolerance,
        out_dir=out,
        progress=progress,
    )
    d = result.to_dict()
    if json_:
        _print_json(d)
    else:
        render_check(d, _console())
    raise typer.Exit(0 if result.passed else 1)


# --------------------------------------------------------------------------------- noise-scale
@app.command("noise-scale")
def noise_scale(
    config: Annotated[Path | None, typer.Argument(help="A run config to train while measuring.")] = None,
    set_: SetOpt = None,
    micro_batch: Annotated[
        int | None, typer.Option(help="Sequences per micro-batch (default: the config's, else global/4).")
    ] = None,
    b_noise: Annotated[
        float | None, typer.Option(help="Skip training: use this B_noise (tokens) for the recommendation.")
    ] = None,
    target_tokens: Annotated[int | None, typer.Option(help="Token budget of the target run.")] = None,
    context: Annotated[
        int | None, typer.Option(help="Target context length (default: the config's).")
    ] = None,
    tuned_lr: Annotated[float | None, typer.Option(help="Tuned LR (default: the config's).")] = None,
    tuned_batch: Annotated[int | None, typer.Option(help="Batch (sequences) the LR was tuned at.")] = None,
    optimizer: Annotated[str, typer.Option(help="adam or sgd (which LR rule).")] = "adam",
    json_: JsonOpt = False,
) -> None:
    """Measure the gradient noise scale B_simple while training CONFIG (micro-batch vs step gradients),
    and recommend the target run's batch size and LR."""
    from scalelab.transfer.batch import recommend_batch

    if optimizer not in ("adam", "sgd"):
        raise SpecError(f"--optimizer: expected 'adam' or 'sgd', got {optimizer!r}")
    d: dict[str, Any] = {}
    spec = None
    if config is not None:
        from scalelab.spec import load_run

        spec = load_run(config, set_ or [])
    if b_noise is None:
        if spec is None:
            raise SpecError("give a CONFIG to measure on, or --b-noise TOKENS")
        from scalelab.spec import set_path
        from scalelab.train.noise_scale import GradientNoiseCallback, summarize_history
        from scalelab.transfer.runner import train_in_process

        g = spec.train.global_batch_size
        mb = micro_batch or spec.train.micro_batch_size or max(1, g // 4)
        if mb >= g or g % mb:
            raise SpecError(
                f"--micro-batch: must divide train.global_batch_size={g} and be smaller, got {mb}"
            )
        spec = set_path(spec, "train.micro_batch_size", mb, source=str(config))
        cb = GradientNoiseCallback()
        res = train_in_process(spec, callbacks=[cb], threads=spec.train.threads)
        summary = summarize_history(cb.history)
        d["run"] = {k: res[k] for k in ("status", "eval_loss", "steps", "seconds")}
        d["estimate"] = cb.estimate().to_dict()
        d["b_simple_tokens"] = {"first": summary["first"], "late": summary["last"]}
        b_noise = summary["last"]
    d["b_noise_tokens"] = b_noise
    if b_noise is not None and target_tokens is not None:
        ctx = context or (spec.model.context_tokens if spec else None)
        lr0 = tuned_lr or (spec.train.lr if spec else None)
        b0 = tuned_batch or (spec.train.global_batch_size if spec else None)
        if ctx is None or lr0 is None or b0 is None:
            raise SpecError("--context, --tuned-lr and --tuned-batch are needed without a CONFIG")
        rec = recommend_batch(
            b_noise,
            target_tokens=target_tokens,
            context_tokens=ctx,
            tuned_lr=lr0,
            tuned_batch_sequences=b0,
            optimizer=optimizer,  # type: ignore[arg-type]
        )
        d["recommendation"] = rec.to_dict()
    if json_:
        _print_json(d)
        return
    console = _console()
    if "estimate" in d:
        e = d["estimate"]
        console.print(
            f"run: {d['run']['status']}, {d['run']['steps']} steps, eval loss {_fmt(d['run']['eval_loss'], '.4f')}\n"
            f"|G|² {_fmt(e['g2'])}, tr(Σ) {_fmt(e['trace'])} (batches {_fmt(e['b_small'])} / {_fmt(e['b_big'])} "
            f"tokens, {e['n']} steps averaged)\n"
            f"B_simple: {_fmt(d['b_simple_tokens']['first'])} tokens at the start, "
            f"{_fmt(d['b_simple_tokens']['late'])} over the last quarter (it grows as the loss falls)"
        )
    console.print(f"critical batch ≈ B_noise ≈ {_fmt(b_noise)} tokens")
    if "recommendation" in d:
        r = d["recommendation"]
        console.print(
            f"target: batch {r['batch_sequences']} sequences ({r['batch_tokens']} tokens), {r['steps']} steps, "
            f"LR {_fmt(r['lr'])} ({r['lr_scaling']['rule']}; trusted: {r['lr_scaling']['trusted']} — "
            f"{r['lr_scaling']['note']})\n  " + "; ".join(r["reasons"]),
            highlight=False,
        )


# -------------------------------------------------------------------------------- coord-check
@app.command("coord-check")
def coord_check_cmd(
    widths: Annotated[
        str, typer.Option(help="Widths (comma-separated; multiples of --heads).")
    ] = "64,128,256,512",
    parametrization: Annotated[str, typer.Option(help="sp, mup or depth_mup.")] = "mup",
    steps: Annotated[int, typer.Option(help="Adam steps per width.")] = 4,
    depth: int = 2,
    heads: int = 4,
    lr: float = 1e-2,
    tolerance: Annotated[float, typer.Option(help="|ln RMS / ln width slope| called stable.")] = 0.2,
    json_: JsonOpt = False,
) -> None:
    """Activation RMS per layer across widths after a few steps: flat under μP, growing under SP."""
    from scalelab.models.parametrization import coord_check
    from scalelab.transfer.coord import summarize_coord_check

    if parametrization not in ("sp", "mup", "depth_mup"):
        raise SpecError(f"--parametrization: expected sp, mup or depth_mup, got {parametrization!r}")
    ws = [int(w) for w in _floats(widths, "--widths")]
    if any(w % heads for w in ws):
        raise SpecError(f"--widths: every width must be a multiple of --heads={heads}, got {ws}")
    rows = coord_check(ws, parametrization, steps, depth=depth, n_heads=heads, lr=lr)
    layers = summarize_coord_check(rows, tolerance=tolerance)
    if json_:
        _print_json({"rows": rows, "layers": [c.to_dict() for c in layers]})
        return
    t = Table(title=f"coord check: {parametrization}, activation RMS after {steps} steps")
    t.add_column("layer")
    for w in ws:
        t.add_column(f"w={w}", justify="right")
    t.add_column("slope vs width", justify="right")
    t.add_column("stable")
    for c in layers:
        by_w = dict(zip(c.widths, c.rms, strict=True))
        t.add_row(
            c.layer, *[_fmt(by_w.get(w), ".3g") for w in ws], f"{c.slope:+.2f}", "yes" if c.stable else "NO"
        )
    _console().print(t)
