"""Expand a study's design into its runs (grids and IsoFLOP designs) and describe each planned run."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

from scalelab.errors import SpecError
from scalelab.models.flops import ModelShape
from scalelab.spec import GridDesign, IsoFLOPDesign, ListDesign, RunSpec, StudySpec, set_path

#: vocabulary assumed for planning when the spec leaves it to the tokenizer (byte-level: 256 + EOD).
BYTE_VOCAB = 257
#: an IsoFLOP run trains a whole number of steps; with at least this many, rounding D to whole steps moves
#: its compute at most 0.5/MIN_ISOFLOP_STEPS (2.5 %) off the budget — the tolerance the planner states.
MIN_ISOFLOP_STEPS = 20


def isoflop_tolerance(planned: PlannedRun) -> float:
    """Largest relative distance of this IsoFLOP run's FLOPs from its budget: half a step's FLOPs."""
    t = planned.spec.train
    step_tokens = t.global_batch_size * planned.spec.model.context_tokens
    return 0.5 * step_tokens / planned.tokens


@dataclass(frozen=True)
class PlannedRun:
    """One run of a study with the numbers the plan shows before anything runs."""

    spec: RunSpec
    run_id: str
    point: dict[str, Any]  # the design values that made this run (axis → value)
    n_params: int  # non-embedding
    n_params_total: int
    tokens: int
    flops: float


def planning_vocab(spec: RunSpec) -> int:
    """Vocabulary size used for FLOP counts at planning time."""
    if spec.model.vocab_size:
        return spec.model.vocab_size
    return BYTE_VOCAB if spec.data.tokenizer == "byte" else spec.data.bpe_vocab_size


def describe(spec: RunSpec, point: dict[str, Any]) -> PlannedRun:
    shape = ModelShape.from_spec(spec.model, planning_vocab(spec))
    return PlannedRun(
        spec=spec,
        run_id=spec.run_id,
        point=point,
        n_params=shape.non_embedding_params,
        n_params_total=shape.total_params,
        tokens=spec.train.tokens,
        flops=shape.training_flops(spec.train.tokens),
    )


def _with_overrides(
    base: RunSpec, overrides: dict[str, Any], seeds: list[int], where: str
) -> list[tuple[RunSpec, dict[str, Any]]]:
    """The base run with `overrides` applied, once per seed; the point records what was set."""
    spec = base
    for path, value in overrides.items():
        spec = set_path(spec, path, value, source=where)
    out = []
    for seed in seeds:
        seeded = set_path(spec, "train.seed", seed, source=where)
        out.append((seeded, {**overrides, "train.seed": seed}))
    return out


def _expand_grid(study: StudySpec, design: GridDesign, source: str) -> list[tuple[RunSpec, dict[str, Any]]]:
    paths = list(design.axes)
    out = []
    for values in itertools.product(*design.axes.values()):
        overrides = dict(zip(paths, values, strict=True))
        out += _with_overrides(study.base_run(), overrides, design.seeds, f"{source}: study.design.axes")
    return out


def _expand_list(study: StudySpec, design: ListDesign, source: str) -> list[tuple[RunSpec, dict[str, Any]]]:
    out = []
    for i, overrides in enumerate(design.runs):
        out += _with_overrides(study.base_run(), overrides, design.seeds, f"{source}: study.design.runs[{i}]")
    return out


def _expand_isoflop(
    study: StudySpec, design: IsoFLOPDesign, source: str
) -> list[tuple[RunSpec, dict[str, Any]]]:
    """For each budget pick `models_per_budget` widths spread in log N around the 20-tokens-per-param point."""
    base = study.base_run()
    vocab = planning_vocab(base)
    step_tokens = base.train.global_batch_size * base.model.context_tokens
    out = []
    for budget in design.budgets_flops:
        candidates = []
        for width in sorted(set(design.widths)):
            depth = base.model.depth
            if design.depth_per_width:
                depth = max(1, round(width * design.depth_per_width))
            try:
                spec = set_path(base, "model.width", width, source=f"{source}: study.design.widths")
                spec = set_path(spec, "model.depth", depth, source=f"{source}: study.design")
            except SpecError:
                continue
            shape = ModelShape.from_spec(spec.model, vocab)
            steps = round(shape.tokens_for_flops(budget) / step_tokens)
            if steps < MIN_ISOFLOP_STEPS:
                continue  # too big for this budget: rounding to whole steps would miss it by > 2.5 %
            candidates.append((shape.non_embedding_params, spec, steps * step_tokens))
        if len(candidates) < design.models_per_budget:
            raise SpecError(
                f"{source}: study.design.widths: {len(candidates)} usable widths for budget {budget:.3g}, "
                f"need models_per_budget={design.models_per_budget}"
            )
        # centre the K shapes on the shape whose D/N is closest to 20 (Chinchilla's rule of thumb)
        ratios = [abs(math.log(tok / max(n, 1) / 20.0)) for n, _, tok in candidates]
        centre = min(range(len(candidates)), key=ratios.__getitem__)
        k = design.models_per_budget
        lo = min(max(0, centre - k // 2), len(candidates) - k)
        for _n, spec, tokens in candidates[lo : lo + k]:
            for seed in design.seeds:
                s = set_path(spec, "train.tokens", int(tokens), source=f"{source}: study.design")
                s = set_path(s, "train.seed", seed, source=f"{source}: study.design.seeds")
                out.append(
                    (
                        s,
                        {
                            "budget_flops": budget,
                            "model.width": s.model.width,
                            "model.depth": s.model.depth,
                            "train.seed": seed,
                        },
                    )
                )
    return out


def expand_runs(study: StudySpec, source: str = "<study>") -> list[PlannedRun]:
    """Every run the study's design makes, validated; duplicate configs appear once."""
    design = study.design
    if isinstance(design, GridDesign):
        pairs = _expand_grid(study, design, source)
    elif isinstance(design, ListDesign):
        pairs = _expand_list(study, design, source)
    else:
        pairs = _expand_isoflop(study, design, source)
    seen: set[str] = set()
    runs = []
    for spec, point in pairs:
        planned = describe(spec, point)
        if planned.run_id in seen:
            continue
        seen.add(planned.run_id)
        runs.append(planned)
    return runs
