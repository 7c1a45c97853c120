"""`scalelab study advise`: candidate next runs of a study (sizes, token budgets, a seed replicate), ranked
by `study.advise`, the chosen ones written as a `list` design, and the sample-size answer."""

from __future__ import annotations

import json
from dataclasses import dataclass
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
    """Ranked candidates, the runs chosen within the budget, the sample-size answer and the design file."""

    target_flops: float
    quantity: str
    ranked: list[Scored]
    chosen: list[Scored]
    sample: SampleSize | None
    design_path: Path | None
    group: str | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "target_flops": self.target_flops,
            "quantity": self.quantity,
            "group": self.group,
            "ranked": [s.to_dict() for s in self.ranked],
            "chosen": [s.to_dict() for s in self.chosen],
            "sample_size": None if self.sample is None else self.sample.to_dict(),
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


def _candidate(spec: RunSpec, overrides: dict[str, Any], n_key: str, label: str) -> Candidate:
    p = describe(spec, overrides)
    n = p.n_params if n_key == "non_embedding" else p.n_params_total
    return Candidate(float(n), float(p.tokens), float(p.flops), label, overrides)


def study_candidates(study: StudySpec, n_params: str = "non_embedding") -> list[Candidate]:
    """Widths of the design and twice the largest, at its token counts and 2×/4× the largest, minus the
    runs already planned, plus a new seed of the largest-compute run."""
    planned = expand_runs(study)
    if study.sources:
        first = next(iter(study.sources))
        planned = [r for r in planned if r.point.get("group") == first]
    base = planned[0].spec
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
            ov = {"model.width": w, "train.tokens": t}
            try:
                spec = set_path(set_path(base, "model.width", w), "train.tokens", t)
            except SpecError:
                continue
            out.append(_candidate(spec, ov, n_params, f"width {w}, {t} tokens"))
    big = max(planned, key=lambda r: r.flops)
    seed = max(r.spec.train.seed for r in planned) + 1
    ov = {"model.width": big.spec.model.width, "train.tokens": big.spec.train.tokens, "train.seed": seed}
    out.append(
        _candidate(set_path(big.spec, "train.seed", seed), ov, n_params, f"seed {seed} of {big.run_id}")
    )
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
    """The chosen runs as `list` designs (one per seed), ready to append to the study."""
    by_seed: dict[int, list[dict[str, Any]]] = {}
    for s in chosen:
        ov = dict(s.candidate.overrides)
        seed = int(ov.pop("train.seed", study.design.seeds[0]))
        by_seed.setdefault(seed, []).append(ov)
    lines = [f"# {line}" for line in header.splitlines()]
    for seed, runs in by_seed.items():
        lines += ["", "[[advice]]", 'kind = "list"', f"seeds = [{seed}]", "runs = ["]
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
) -> Advice:
    """Rank the study's candidate next runs for its target, choose some within `budget_flops`, write them
    to DIR/report/advice.toml, and (given `width`, a ± fraction) say what reaches that interval."""
    from scalelab.fit.api import table_from_study

    study_dir = Path(study_dir)
    study = load_study_json(study_dir)
    compute = target_flops or study.target.compute_flops
    if not compute:
        raise ScalelabError(
            f"{study_dir}: no target compute: pass --target-compute or set [study.target] compute_flops"
        )
    table = table_from_study(study_dir, n_params=study.fit.n_params, loss=study.fit.loss)
    group = None
    if table.group is not None and len(table.groups) > 1:
        group = table.groups[0] if not study.sources else next(iter(study.sources))
        table = table.subset(table.group == group)
    if len(table) < 6:
        raise FitError(f"{study_dir}: {len(table)} finished runs; advice needs a fit (at least 6 runs)")
    settings = FitSettings(
        bootstrap=bootstrap, delta=study.fit.huber_delta, confidence=0.9, seed=study.fit.seed
    )
    ranked = score_candidates(
        table,
        study_candidates(study, study.fit.n_params),
        compute,
        quantity=quantity,
        draws=draws,
        settings=settings,
    )
    chosen = choose(ranked, budget_flops, top)
    sample = sample_size(table, compute, width, quantity=quantity, settings=settings) if width else None
    path = None
    if chosen:
        path = study_dir / "report" / "advice.toml"
        path.parent.mkdir(parents=True, exist_ok=True)
        header = (
            f"scalelab study advise: the runs that shrink the {quantity} interval at {compute:.3g} FLOPs the "
            f"most per FLOP.\nCopy an [[advice]] table into a study's [study.design] (or run it as a list "
            f"design into the same --out) to add them."
            + (f"\nFitted on group {group!r} only." if group else "")
        )
        atomic_write_text(path, design_toml(chosen, study, header))
    return Advice(compute, quantity, ranked, chosen, sample, path, group)
