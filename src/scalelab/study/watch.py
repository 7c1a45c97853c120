"""A live view of a study: per run status, shape (width, N, D), step, loss, tokens/s, ETA and
gradient-norm spread, and the whole study's ETA.

Reads only what runs write anyway (the registry and the tail of each `metrics.jsonl`), so watching
never slows training down and works from any machine that sees the study directory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scalelab.errors import RegistryError
from scalelab.io import read_tail
from scalelab.models.flops import ModelShape
from scalelab.registry import Registry
from scalelab.spec import RunSpec
from scalelab.study.eta import StudyEta

TAIL_BYTES = 16_384


@dataclass(frozen=True)
class RunProgress:
    run_id: str
    status: str
    width: int | None
    n_params: int | None  # non-embedding parameters
    step: int | None
    tokens: int | None
    tokens_planned: int | None
    loss: float | None
    eval_loss: float | None
    tokens_per_second: float | None
    eta_seconds: float | None
    grad_norm: float | None
    grad_norm_spread: float | None  # max/min of per-rank gradient norms (distributed runs), else None
    error: str | None
    forecast_seconds: float | None = None
    wall_seconds: float | None = None

    @property
    def finished(self) -> bool:
        return self.status not in ("pending", "running")


def last_metrics(run_dir: str | Path | None) -> tuple[dict[str, Any] | None, float | None]:
    """The last step row of a run's metrics.jsonl and the last eval loss, reading only the file's tail."""
    if not run_dir:
        return None, None
    lines = read_tail(Path(run_dir) / "metrics.jsonl", TAIL_BYTES).splitlines()
    step_row, eval_loss = None, None
    for line in reversed(lines):
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a partial first line of the tail, or a line being written
        if eval_loss is None and row.get("eval_loss") is not None:
            eval_loss = float(row["eval_loss"])
        if step_row is None and row.get("loss") is not None:
            step_row = row
        if step_row is not None and eval_loss is not None:
            break
    return step_row, eval_loss


def study_progress(study_dir: str | Path) -> list[RunProgress]:
    """One `RunProgress` per registered run, from the registry and the runs' metrics tails."""
    with Registry(Path(study_dir) / "registry.sqlite", create=False) as reg:
        rows = reg.runs()
    out = []
    for r in rows:
        spec = _spec(r.get("config_json"))
        planned = spec.train.tokens if spec else None
        m, eval_loss = (
            last_metrics(r.get("run_dir")) if r["status"] in ("running", "pending") else (None, None)
        )
        if r["status"] not in ("running", "pending"):
            step_row = {
                "step": r.get("steps"),
                "tokens": r.get("tokens"),
                "loss": r.get("final_train_loss"),
                "tokens_per_second": r.get("tokens_per_second"),
            }
            eval_loss = r.get("eval_loss")
        else:
            step_row = m or {}
        tokens = step_row.get("tokens")
        tps = step_row.get("tokens_per_second")
        eta = None
        if r["status"] == "running" and tokens is not None and planned and tps:
            eta = max(0.0, (planned - tokens) / tps)
        spread = None
        if step_row.get("grad_norm_max") is not None and step_row.get("grad_norm_min"):
            spread = float(step_row["grad_norm_max"]) / float(step_row["grad_norm_min"])
        out.append(
            RunProgress(
                run_id=r["run_id"],
                status=r["status"],
                width=spec.model.width if spec else None,
                n_params=run_size(r)[1],
                step=step_row.get("step"),
                tokens=tokens,
                tokens_planned=planned,
                loss=step_row.get("loss"),
                eval_loss=eval_loss,
                tokens_per_second=tps,
                eta_seconds=eta,
                grad_norm=step_row.get("grad_norm"),
                grad_norm_spread=spread,
                error=r.get("error"),
                forecast_seconds=r.get("forecast_seconds"),
                wall_seconds=r.get("wall_seconds"),
            )
        )
    return out


def run_size(row: dict[str, Any]) -> tuple[int | None, int | None, int | None]:
    """(width, N non-embedding, D tokens) of a registry row: N and D from the record when the run
    finished, else from its config (N does not depend on the vocabulary)."""
    spec = _spec(row.get("config_json"))
    if spec is None:
        return None, row.get("n_params"), row.get("tokens")
    n_params = row.get("n_params") or _non_embedding_params(spec)
    return spec.model.width, n_params, row.get("tokens") or spec.train.tokens


def _spec(config_json: str | None) -> RunSpec | None:
    try:
        return RunSpec.model_validate_json(config_json) if config_json else None
    except ValueError:
        return None


def _non_embedding_params(spec: RunSpec) -> int:
    return ModelShape.from_spec(spec.model, spec.model.vocab_size or 2).non_embedding_params


def registry_exists(study_dir: str | Path) -> bool:
    """Whether the study has a registry yet (`study run` creates it when it starts)."""
    try:
        with Registry(Path(study_dir) / "registry.sqlite", create=False):
            return True
    except RegistryError:
        return False


def study_eta(rows: list[RunProgress]) -> float | None:
    """Seconds until the study ends (0 when it has; None while unknown): runs in progress count their
    measured time left, pending ones their forecast scaled by finished runs' actual/forecast, over as
    many slots as runs are running now (at least one)."""
    eta = StudyEta(
        {r.run_id: r.forecast_seconds for r in rows}, parallel=sum(r.status == "running" for r in rows)
    )
    for r in rows:
        if r.finished:
            eta.finished(r.run_id, r.wall_seconds or 0.0)
        elif r.eta_seconds is not None:
            eta.remaining(r.run_id, r.eta_seconds)
    return eta.seconds_left()
