"""Expand a study's design into its runs (grids, lists, IsoFLOP and WSD designs) and describe each one.

WSD designs link their runs: per model size the longest run is the trunk and keeps snapshots where each
shorter run's cooldown starts; the shorter runs are branches that train only from there (train/branch.py).
A planned run's `tokens`/`flops` are those of the run it stands for (what the fit uses);
`tokens_to_train`/`flops_to_spend` are what executing it costs.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace
from typing import Any

from scalelab.errors import SpecError
from scalelab.models.flops import ModelShape
from scalelab.spec import (
    GridDesign,
    IsoFLOPDesign,
    ListDesign,
    OFATDesign,
    RunSpec,
    StudySpec,
    WSDDesign,
    set_path,
)

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
    branch_of: str | None = None  # WSD branch: the trunk run it starts from
    branch_step: int = 0  # ... at this step
    snapshot_steps: tuple[int, ...] = ()  # WSD trunk: steps where its branches start

    @property
    def step_tokens(self) -> int:
        return self.spec.train.global_batch_size * self.spec.model.context_tokens

    @property
    def tokens_to_train(self) -> int:
        """Tokens this run trains itself (a branch starts at its trunk's snapshot)."""
        return self.tokens - self.branch_step * self.step_tokens

    @property
    def flops_to_spend(self) -> float:
        return self.flops * self.tokens_to_train / self.tokens if self.tokens else 0.0


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


def _expand_ofat(study: StudySpec, design: OFATDesign, source: str) -> list[tuple[RunSpec, dict[str, Any]]]:
    """Each factor alone over its values (the others at the base run); the point's `factors` maps each
    factor a run belongs to (a run at the base values belongs to several) to its value there."""
    base = study.base_run()
    out: dict[str, tuple[RunSpec, dict[str, Any]]] = {}
    for factor, values in design.factors.items():
        where = f"{source}: study.design.factors.{factor}"
        for value in values:
            if factor == "compute":
                heads = base.model.n_heads
                width = max(heads, round(base.model.width * value**0.25 / heads) * heads)
                overrides = {"model.width": width, "train.tokens": round(base.train.tokens * value**0.5)}
            else:
                overrides = {factor: value}
            for spec, point in _with_overrides(base, overrides, design.seeds, where):
                spec, first = out.setdefault(spec.run_id, (spec, {**point, "factors": {}}))
                first["factors"][factor] = value
    return list(out.values())


def _expand_wsd(study: StudySpec, design: WSDDesign, source: str) -> list[tuple[RunSpec, dict[str, Any]]]:
    """Per size (axes × seeds) one WSD run per token count, longest first, sharing an absolute warmup."""
    where = f"{source}: study.design"
    base = set_path(study.base_run(), "train.schedule", "wsd", source=where)
    if base.train.warmup_tokens is None:
        step_tokens = base.train.global_batch_size * base.model.context_tokens
        warmup_steps = round(base.train.warmup_fraction * min(design.tokens) / step_tokens)
        base = set_path(base, "train.warmup_tokens", warmup_steps * step_tokens, source=where)
    out = []
    for values in itertools.product(*design.axes.values()):
        size = dict(zip(design.axes, values, strict=True))
        for tokens in sorted(set(design.tokens), reverse=True):
            overrides = {**size, "train.tokens": tokens}
            out += _with_overrides(base, overrides, design.seeds, f"{where}.tokens")
    return out


def link_branches(runs: list[PlannedRun], source: str = "<study>") -> list[PlannedRun]:
    """Make the longest single-process WSD run of each group of runs differing only in tokens the trunk,
    and the others its branches (starting at their cooldown); checked with train.branch.check_branch."""
    from scalelab.train.branch import BranchError, branch_key, branch_step, check_branch

    groups: dict[str, list[int]] = {}
    for i, r in enumerate(runs):
        t = r.spec.train
        if (
            t.schedule == "wsd"
            and t.strategy == "none"
            and not t.batch_schedule
            and not t.max_global_batch_size
        ):
            groups.setdefault(branch_key(r.spec), []).append(i)
    out = list(runs)
    for members in groups.values():
        trunk_i = max(members, key=lambda i: runs[i].tokens)
        trunk = runs[trunk_i]
        snapshots = set()
        for i in members:
            if i == trunk_i or runs[i].tokens == trunk.tokens:
                continue
            step = branch_step(runs[i].spec)
            if step < 1:
                continue  # the cooldown is the whole run: nothing to share
            try:
                check_branch(trunk.spec, runs[i].spec, step)
            except BranchError as err:
                raise SpecError(f"{source}: study.design: {err}") from None
            out[i] = replace(runs[i], branch_of=trunk.run_id, branch_step=step)
            snapshots.add(step)
        out[trunk_i] = replace(trunk, snapshot_steps=tuple(sorted(snapshots)))
    return out


def _expand_design(study: StudySpec, source: str) -> list[tuple[RunSpec, dict[str, Any]]]:
    design = study.design
    if isinstance(design, GridDesign):
        pairs = _expand_grid(study, design, source)
    elif isinstance(design, ListDesign):
        pairs = _expand_list(study, design, source)
    elif isinstance(design, WSDDesign):
        pairs = _expand_wsd(study, design, source)
    elif isinstance(design, OFATDesign):
        pairs = _expand_ofat(study, design, source)
    else:
        pairs = _expand_isoflop(study, design, source)
    return pairs


def _grouped(study: StudySpec, source: str) -> list[tuple[RunSpec, dict[str, Any]]]:
    """The design once per data source of `study.sources` (each run's point naming it as `group`), or
    once with the group read off the `study.group_by` axis, or once ungrouped."""
    if study.sources:
        pairs = []
        for name, sources in study.sources.items():
            sub = study.model_copy(update={"data": study.data.model_copy(update={"sources": sources})})
            pairs += [(spec, {**point, "group": name}) for spec, point in _expand_design(sub, source)]
        return pairs
    pairs = _expand_design(study, source)
    if study.group_by:
        missing = [p for _, p in pairs if study.group_by not in p]
        if missing:
            axes = sorted({k for _, p in pairs for k in p})
            raise SpecError(
                f"{source}: study.group_by: {study.group_by!r} is not a design axis (axes: {', '.join(axes)})"
            )
        pairs = [(spec, {**point, "group": str(point[study.group_by])}) for spec, point in pairs]
    return pairs


def expand_runs(study: StudySpec, source: str = "<study>") -> list[PlannedRun]:
    """Every run the study's design makes (once per data source of `study.sources`), validated; duplicate
    configs appear once."""
    design = study.design
    pairs = _grouped(study, source)
    seen: set[str] = set()
    runs = []
    for spec, point in pairs:
        planned = describe(spec, point)
        if planned.run_id in seen:
            continue
        seen.add(planned.run_id)
        runs.append(planned)
    return link_branches(runs, source) if isinstance(design, WSDDesign) else runs
