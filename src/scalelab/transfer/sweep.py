"""LR-transfer sweeps are ordinary grid studies; these helpers build them and run them in-process.

The existing grid design is enough: its axes are dotted RunSpec paths, so a transfer sweep is
``model.parametrization × model.width (× model.depth) × train.lr (× model.init_std × train.global_batch_size)
× seeds``. `lr_sweep_study` builds that `StudySpec` (run it with `scalelab study run`, analyse it with
`scalelab transfer analyze`); `run_sweep_in_process` trains the same runs inside this process, one thread
each, which is what tests and quick explorations want (no subprocess, no run directories).

Keep `model.base_width` / `model.base_depth` fixed across the sweep: they define the μP/depth-μP base shape,
at which μP equals SP; the grid varies `model.width` / `model.depth` around it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from scalelab.errors import SpecError
from scalelab.spec import GridDesign, RunSpec, StudySpec
from scalelab.study.plan import PlannedRun, expand_runs

#: RunSpec paths a transfer sweep may vary (besides the seed)
SWEEP_AXES = (
    "model.parametrization",
    "model.width",
    "model.depth",
    "train.lr",
    "model.init_std",
    "train.global_batch_size",
)


def lr_grid(
    center: float, octaves_below: int = 4, octaves_above: int = 3, per_octave: int = 1
) -> list[float]:
    """Learning rates spaced by 2^(1/per_octave) from center·2^-below to center·2^above (inclusive)."""
    if center <= 0 or per_octave < 1 or octaves_below < 0 or octaves_above < 0:
        raise SpecError("lr_grid: center must be > 0, per_octave ≥ 1, octave counts ≥ 0")
    ks = range(-octaves_below * per_octave, octaves_above * per_octave + 1)
    return [float(f"{center * 2 ** (k / per_octave):.6g}") for k in ks]


def lr_sweep_study(
    name: str,
    base: RunSpec | Mapping[str, Any],
    *,
    lrs: Sequence[float],
    widths: Sequence[int] = (),
    depths: Sequence[int] = (),
    parametrizations: Sequence[str] = ("sp", "mup"),
    seeds: Sequence[int] = (0,),
    init_stds: Sequence[float] = (),
    batch_sizes: Sequence[int] = (),
    description: str = "",
) -> StudySpec:
    """A grid `StudySpec`: parametrizations × widths × depths × LRs (× init stds × batch sizes) × seeds.

    `base` is the run every point modifies (a RunSpec or its dict form with `model`/`data`/`train`).
    Empty axes are left at the base run's value. Every run is validated (e.g. widths divisible by heads).
    """
    base_spec = base if isinstance(base, RunSpec) else RunSpec.model_validate(dict(base))
    if len(lrs) < 3:
        raise SpecError("lr_sweep_study: lrs: an LR optimum needs at least 3 learning rates")
    axes: dict[str, list[Any]] = {"model.parametrization": list(parametrizations)}
    if widths:
        axes["model.width"] = [int(w) for w in widths]
    if depths:
        axes["model.depth"] = [int(d) for d in depths]
    if init_stds:
        axes["model.init_std"] = [float(s) for s in init_stds]
    if batch_sizes:
        axes["train.global_batch_size"] = [int(b) for b in batch_sizes]
    axes["train.lr"] = [float(lr) for lr in lrs]
    dumped = base_spec.model_dump(mode="json")
    study = StudySpec.model_validate(
        {
            "name": name,
            "description": description
            or "LR transfer sweep: " + " × ".join(f"{k} ({len(v)})" for k, v in axes.items()),
            **{k: dumped[k] for k in ("model", "data", "train", "debug")},
            "design": GridDesign(axes=axes, seeds=list(seeds)).model_dump(mode="json"),
        }
    )
    expand_runs(study, source=name)  # validates every run
    return study


def sweep_axes(study: StudySpec) -> dict[str, list[Any]]:
    """The swept axes of a grid study (raises SpecError for other designs or a sweep without an LR axis)."""
    design = study.design
    if not isinstance(design, GridDesign):
        raise SpecError(f"{study.name}: a transfer sweep is a grid design, got '{design.kind}'")
    if "train.lr" not in design.axes:
        raise SpecError(f"{study.name}: study.design.axes: a transfer sweep needs a 'train.lr' axis")
    return dict(design.axes)


def run_sweep_in_process(
    runs: Iterable[PlannedRun] | StudySpec,
    *,
    store: Any = None,
    loader_factory: Any = None,
    threads: int | None = 1,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Train every run in this process; rows `{point, config (RunSpec), status, eval_loss, ...}`.

    The rows are what `scalelab.transfer.analyze.rows_from_results` reads. `store`/`loader_factory` default
    to each run's token store and the `BlockLoader` (pass a synthetic pair in tests).
    """
    from scalelab.transfer.runner import train_in_process

    planned = expand_runs(runs) if isinstance(runs, StudySpec) else list(runs)
    out = []
    for p in planned:
        res = train_in_process(p.spec, store=store, loader_factory=loader_factory, threads=threads)
        row = {"point": dict(p.point), "spec": p.spec, **res}
        out.append(row)
        if progress is not None:
            progress(row)
    return out


def octaves_between(a: float, b: float) -> float:
    """log2(b / a): how many doublings separate two learning rates."""
    return math.log2(b / a)
