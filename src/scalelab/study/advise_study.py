"""`scalelab study advise`: candidate next runs of a study (sizes, token budgets, a seed replicate), ranked
by `study.advise`, the chosen ones written as a `list` design, and the sample-size answer."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scalelab.errors import FitError, ScalelabError, SpecError
from scalelab.io import atomic_write_text
from scalelab.spec import RunSpec, StudySpec, set_path
from scalelab.study.advise import (
    Candidate,
    FitSettings,
    SampleSize,
    Scored,
    sample_size,
    score_candidates,
)
from scalelab.study.plan import describe, expand_runs


@dataclass(frozen=True)
class Advice:
    """Ranked candidates (of every group advised), the runs chosen within the budget, the sample-size
    answer per group and the design file."""

    target_flops: float
    quantity: str
    ranked: list[Scored]
    chosen: list[Scored]
    samples: dict[str | None, SampleSize]
    design_path: Path | None
    group: str | None  # the one group advised (--group, or a grouped study's only group); None: all
    groups: list[str] = field(default_factory=list)  # every group advised, in the study's order

    @property
    def sample(self) -> SampleSize | None:
        """The sample-size answer when one group (or none) was advised."""
        return next(iter(self.samples.values())) if len(self.samples) == 1 else None

    def width_now(self) -> dict[str | None, float]:
        """The target's log width now, per group advised."""
        out: dict[str | None, float] = {}
        for s in self.ranked:
            out.setdefault(s.candidate.group, s.width_before)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "target_flops": self.target_flops,
            "quantity": self.quantity,
            "group": self.group,
            "groups": self.groups,
            "ranked": [s.to_dict() for s in self.ranked],
            "chosen": [s.to_dict() for s in self.chosen],
            "sample_size": None if self.sample is None else self.sample.to_dict(),
            "sample_size_by_group": {g: v.to_dict() for g, v in self.samples.items() if g is not None},
            "design": None if self.design_path is None else str(self.design_path),
        }


def load_study_json(study_dir: Path) -> StudySpec:
    """The study as it ran (its validated study.json)."""
    path = study_dir / "study.json"
    try:
        return StudySpec.model_validate(json.loads(path.read_text()))
    except OSError as err:
        raise SpecError(
            f"{path}: cannot read ({err.strerror or err}); is {study_dir} a study directory?"
        ) from None
    except ValueError as err:
        raise SpecError(f"{path}: not a valid study ({str(err).splitlines()[0]})") from None


def _candidate(
    spec: RunSpec, overrides: dict[str, Any], n_key: str, label: str, group: str | None
) -> Candidate:
    p = describe(spec, overrides)
    n = p.n_params if n_key == "non_embedding" else p.n_params_total
    return Candidate(float(n), float(p.tokens), float(p.flops), label, overrides, group)


def study_candidates(
    study: StudySpec, n_params: str = "non_embedding", group: str | None = None
) -> list[Candidate]:
    """Widths of the design and twice the largest, at its token counts and 2×/4× the largest, minus the
    runs already planned, plus a new seed of the largest-compute run; of one `group` of a grouped study
    (its runs carry the group's `group_by` value; a data-source group is named, not overridden)."""
    planned = expand_runs(study)
    if group is not None:
        planned = [r for r in planned if r.point.get("group") == group]
        if not planned:
            raise SpecError(f"--group: {group!r} is not a group of study {study.name!r}")
    base = planned[0].spec
    pin = {study.group_by: planned[0].point[study.group_by]} if group is not None and study.group_by else {}
    prefix = f"[{group}] " if group is not None else ""
    widths = sorted({r.spec.model.width for r in planned})
    heads = base.model.n_heads
    widths.append(2 * widths[-1] // heads * heads)
    tokens = sorted({r.spec.train.tokens for r in planned})
    tokens += [2 * tokens[-1], 4 * tokens[-1]]
    done = {(r.spec.model.width, r.spec.train.tokens) for r in planned}
    out = []
    for w in widths:
        for t in tokens:
            if (w, t) in done:
                continue
            ov = {**pin, "model.width": w, "train.tokens": t}
            try:
                spec = set_path(set_path(base, "model.width", w), "train.tokens", t)
            except SpecError:
                continue
            out.append(_candidate(spec, ov, n_params, f"{prefix}width {w}, {t} tokens", group))
    big = max(planned, key=lambda r: r.flops)
    seed = max(r.spec.train.seed for r in planned) + 1
    ov = {
        **pin,
        "model.width": big.spec.model.width,
        "train.tokens": big.spec.train.tokens,
        "train.seed": seed,
    }
    label = f"{prefix}seed {seed} of {big.run_id}"
    out.append(_candidate(set_path(big.spec, "train.seed", seed), ov, n_params, label, group))
    return out


def choose(ranked: list[Scored], budget_flops: float | None, top: int) -> list[Scored]:
    """Best shrink per FLOP first, while the budget lasts (the top `top` without a budget); only runs
    expected to shrink the interval."""
    out, spent = [], 0.0
    for s in ranked:
        if s.shrink <= 0:
            continue
        if budget_flops is not None:
            if spent + s.candidate.flops > budget_flops:
                continue
        elif len(out) >= top:
            break
        out.append(s)
        spent += s.candidate.flops
    return out


def design_toml(chosen: list[Scored], study: StudySpec, header: str) -> str:
    """The chosen runs as `list` designs (one per group and seed), ready to append to the study."""
    by_key: dict[tuple[str | None, int], list[dict[str, Any]]] = {}
    for s in chosen:
        ov = dict(s.candidate.overrides)
        seed = int(ov.pop("train.seed", study.design.seeds[0]))
        by_key.setdefault((s.candidate.group, seed), []).append(ov)
    lines = [f"# {line}" for line in header.splitlines()]
    for (group, seed), runs in by_key.items():
        lines.append("")
        if group is not None:
            lines.append(f"# group {json.dumps(group)}")
        lines += ["[[advice]]", 'kind = "list"', f"seeds = [{seed}]", "runs = ["]
        for ov in runs:
            lines.append("  { " + ", ".join(f'"{k}" = {json.dumps(v)}' for k, v in ov.items()) + " },")
        lines.append("]")
    return "\n".join(lines) + "\n"


def advise_study(
    study_dir: str | Path,
    target_flops: float | None = None,
    *,
    budget_flops: float | None = None,
    quantity: str = "loss",
    width: float | None = None,
    top: int = 3,
    draws: int = 1,
    bootstrap: int = 0,
    group: str | None = None,
) -> Advice:
    """Rank the study's candidate next runs for its target, choose some within `budget_flops`, write them
    to DIR/report/advice.toml, and (given `width`, a ± fraction) say what reaches that interval.

    A grouped study (`study.sources` or `study.group_by`) is advised per group: each group's runs are
    fitted alone and its candidates scored against its own interval; the rankings of all groups are
    merged (shrink of the log width per FLOP is comparable across groups), or only `group` is advised."""
    from scalelab.fit.api import table_from_study

    study_dir = Path(study_dir)
    study = load_study_json(study_dir)
    compute = target_flops or study.target.compute_flops
    if not compute:
        raise ScalelabError(
            f"{study_dir}: no target compute: pass --target-compute or set [study.target] compute_flops"
        )
    table = table_from_study(study_dir, n_params=study.fit.n_params, loss=study.fit.loss)
    grouped = table.group is not None and (len(table.groups) > 1 or bool(study.sources or study.group_by))
    if group is not None and not grouped:
        raise SpecError(f"--group: study {study.name!r} has no groups (no [study.sources] or group_by)")
    order = list(study.sources) if study.sources else []  # the study's order of data sources
    names: list[str | None] = (
        sorted(table.groups, key=lambda g: order.index(g) if g in order else len(order))
        if grouped
        else [None]
    )
    if group is not None:
        if group not in names:
            raise SpecError(f"--group: {group!r} is not a group of {study_dir} (groups: {', '.join(names)})")
        names = [group]
    settings = FitSettings(
        bootstrap=bootstrap, delta=study.fit.huber_delta, confidence=0.9, seed=study.fit.seed
    )
    ranked: list[Scored] = []
    samples: dict[str | None, SampleSize] = {}
    for name in names:
        sub = table if name is None else table.subset(table.group == name)
        where = study_dir if name is None else f"{study_dir} (group {name!r})"
        if len(sub) < 6:
            raise FitError(f"{where}: {len(sub)} finished runs; advice needs a fit (at least 6 runs)")
        try:
            ranked += score_candidates(
                sub,
                study_candidates(study, study.fit.n_params, name),
                compute,
                quantity=quantity,
                draws=draws,
                settings=settings,
            )
        except FitError as err:
            raise FitError(f"{where}: {err}") from None
        if width:
            samples[name] = sample_size(sub, compute, width, quantity=quantity, settings=settings)
    ranked.sort(key=lambda s: -s.safe_shrink_per_flop)
    chosen = choose(ranked, budget_flops, top)
    one = names[0] if len(names) == 1 else None
    path = None
    if chosen:
        path = study_dir / "report" / "advice.toml"
        path.parent.mkdir(parents=True, exist_ok=True)
        note = ""
        if grouped:
            note = f"\nFitted per group ({', '.join(str(n) for n in names)}); each run's group is named above its table."
            if study.sources:
                note += (
                    "\nA list design in a study with [study.sources] runs on every source: to add a run to one "
                    "group only, run its table in a copy of the study whose [study.sources] keeps that group."
                )
        header = (
            f"scalelab study advise: the runs that shrink the {quantity} interval at {compute:.3g} FLOPs the "
            f"most per FLOP.\nCopy an [[advice]] table into a study's [study.design] (or run it as a list "
            f"design into the same --out) to add them." + note
        )
        atomic_write_text(path, design_toml(chosen, study, header))
    return Advice(compute, quantity, ranked, chosen, samples, path, one, [n for n in names if n is not None])
