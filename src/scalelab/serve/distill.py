"""Knowledge distillation: train a student on a teacher's soft targets, and compare it with the same
student trained from scratch on the same tokens.

Loss per token: ce_weight · CE(student, data) + kl_weight · T² · KL(softmax(teacher/T) ‖ softmax(student/T))
(Hinton et al. 2015; the T² keeps the soft-target gradients on the scale of the hard ones).

How it reuses the trainer: `train/trainer.py` has no loss hook, but its loss *is* `model(x, y)`. So the
Trainer gets a `DistillationObjective` as its model — a module whose forward computes the loss above in
training mode and plain CE in eval mode (so held-out numbers are comparable with any run's
`eval_loss`) — with the student as `raw_model` (what checkpoints save) and the student's parameter
groups in the optimizer (the teacher is frozen and never optimized). Checkpoints
(train/checkpoint.py), metrics.jsonl (train/observe.py), schedule, clipping and evaluation are the
trainer's own. The scratch baseline is `run_training` of the very same student spec, so both see the
same token order and the same held-out set.

Output directory:
  student/   config.json (the student RunSpec — `scalelab serve OUT/student` works), distill.json,
             metrics.jsonl, checkpoint/, record.json
  scratch/   an ordinary run directory (run_training)
  distill_report.json   held-out loss of teacher, student and scratch, and the difference
A re-run starts the student over (no resume); the scratch run resumes/skips like any run.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from torch import nn

from scalelab.errors import SpecError
from scalelab.hw import peak_flops, step_gemms
from scalelab.io import atomic_write_json
from scalelab.models.gpt import GPT
from scalelab.serve.evaluation import heldout_loss
from scalelab.serve.loading import LoadedRun, load_run
from scalelab.spec import RunSpec, apply_overrides, config_hash, read_toml, run_from_dict
from scalelab.train.build import default_loader_factory, prepare_run, resolve_device
from scalelab.train.checkpoint import save_checkpoint
from scalelab.train.observe import MetricsLogger
from scalelab.train.run import run_training
from scalelab.train.trainer import Callback, DivergenceGuard, Trainer

log = logging.getLogger(__name__)


class DistillSpec(BaseModel):
    """The `[distill]` table of a student config."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    temperature: float = Field(1.0, gt=0, le=100, description="softmax temperature T of both models")
    kl_weight: float = Field(0.8, ge=0, description="weight of T²·KL(teacher ‖ student)")
    ce_weight: float = Field(0.2, ge=0, description="weight of the cross-entropy on the data")
    compare_scratch: bool = Field(True, description="also train the student from scratch on the same tokens")

    @model_validator(mode="after")
    def _some_weight(self) -> DistillSpec:
        if self.kl_weight + self.ce_weight <= 0:
            raise ValueError("kl_weight: kl_weight + ce_weight must be > 0")
        return self


def load_student(
    path: str | Path, teacher: RunSpec, overrides: list[str] | tuple[str, ...] = ()
) -> tuple[RunSpec, DistillSpec]:
    """Read a student config: a run TOML ([model], [train], optional [data]) plus a [distill] table.

    Without [data] the student trains on the teacher's data (it must use the teacher's tokenizer anyway).
    """
    path = Path(path)
    raw = apply_overrides(read_toml(path), overrides)
    distill_raw = raw.pop("distill", {})
    raw.setdefault("data", teacher.data.model_dump(mode="json"))
    student = run_from_dict(raw, path.name)
    try:
        dspec = DistillSpec.model_validate(distill_raw)
    except ValidationError as err:
        first = err.errors(include_url=False)[0]
        field = ".".join(str(p) for p in first["loc"]) or "distill"
        msg = str(first["msg"]).removeprefix("Value error, ")
        raise SpecError(f"{path.name}: distill.{field}: {msg}") from None
    if student.data.tokenizer != teacher.data.tokenizer:
        raise SpecError(
            f"{path.name}: data.tokenizer: the student must use the teacher's tokenizer "
            f"({teacher.data.tokenizer!r}), got {student.data.tokenizer!r}"
        )
    return student, dspec


class DistillationObjective(nn.Module):
    """`forward(x, y)`: the distillation loss in training mode, plain cross-entropy in eval mode."""

    def __init__(self, student: GPT, teacher: nn.Module, spec: DistillSpec) -> None:
        super().__init__()
        self.student = student
        self.teacher = teacher.eval().requires_grad_(False)
        self.spec = spec
        self.last: dict[str, float] = {}

    def train(self, mode: bool = True) -> DistillationObjective:
        super().train(mode)
        self.teacher.eval()  # the teacher is never in training mode
        return self

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = self.student(x).float()
        vocab = logits.size(-1)
        ce = F.cross_entropy(logits.view(-1, vocab), y.reshape(-1))
        if not self.training:
            return ce
        t = self.spec.temperature
        with torch.no_grad():
            soft = F.log_softmax(self.teacher(x).float().view(-1, vocab) / t, dim=-1)
        log_p = F.log_softmax(logits.view(-1, vocab) / t, dim=-1)
        kl = F.kl_div(log_p, soft, log_target=True, reduction="batchmean") * (t * t)
        self.last = {"ce": float(ce.detach()), "kl": float(kl.detach())}
        return self.spec.ce_weight * ce + self.spec.kl_weight * kl


def _check_compatible(teacher: LoadedRun, student: RunSpec, vocab: int) -> None:
    tshape = teacher.model.shape
    if tshape.vocab_size != vocab:
        raise SpecError(
            f"model.vocab_size: the student's vocabulary ({vocab}) differs from the teacher's ({tshape.vocab_size})"
        )
    if student.model.context_tokens > tshape.context_tokens:
        raise SpecError(
            f"model.context_tokens: {student.model.context_tokens} exceeds the teacher's context "
            f"({tshape.context_tokens}); the teacher cannot give targets beyond it"
        )


def train_student(
    teacher: LoadedRun,
    student: RunSpec,
    dspec: DistillSpec,
    out_dir: Path,
    *,
    store: Any = None,
    callbacks: Sequence[Callback] = (),
) -> dict[str, Any]:
    """Distil `teacher` into a fresh `student` in `out_dir` (a run directory); returns its record."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if store is None:
        from scalelab.data.store import ensure_store

        store = ensure_store(student.data)
    vocab = student.model.vocab_size or int(store.vocab_size)
    _check_compatible(teacher, student, vocab)
    device = resolve_device(student.train.device)
    chash = config_hash(student)
    (out / "config.json").write_text(student.canonical_json() + "\n")
    atomic_write_json(
        out / "distill.json",
        {
            "teacher_run_dir": str(teacher.run_dir),
            "teacher_run_id": teacher.spec.run_id,
            "teacher_checkpoint": str(teacher.checkpoint),
            "teacher_step": teacher.step,
            "distill": dspec.model_dump(),
        },
    )
    (out / "record.json").unlink(missing_ok=True)
    (out / "metrics.jsonl").unlink(missing_ok=True)
    shutil.rmtree(out / "checkpoint", ignore_errors=True)

    old_threads = torch.get_num_threads()
    if student.train.threads:
        torch.set_num_threads(student.train.threads)
    try:
        prepared = prepare_run(student, store, default_loader_factory, device)
        model, shape, eval_set = prepared.raw_model, prepared.shape, prepared.eval_batches
        objective = DistillationObjective(model, teacher.model.to(device), dspec)
        metrics = MetricsLogger(
            out / "metrics.jsonl",
            flops_per_token=shape.training_flops_per_token,
            peak_flops=peak_flops(
                device,
                student.train.precision,
                step_gemms(shape, prepared.train.micro_batch_size or prepared.train.global_batch_size),
            )[0],
            device=device,
            log_interval_steps=student.train.log_interval_steps,
        )

        def save(tr: Trainer) -> Path:
            return save_checkpoint(
                out / "checkpoint",
                step=tr.state.step,
                model=model,
                tensor_state=tr.tensor_state(),
                json_state=tr.json_state(),
                config_hash=chash,
                keep=student.train.keep_checkpoints,
            )

        trainer = Trainer(
            objective,
            prepared.groups,
            prepared.train,
            train_loader=prepared.train_loader,
            total_steps=prepared.total_steps,
            context_tokens=student.model.context_tokens,
            device=device,
            eval_batches=eval_set,
            callbacks=[DivergenceGuard(student.train.divergence_factor), metrics, *callbacks],
            checkpoint_fn=save,
            raw_model=model,
        )
        try:
            state = trainer.fit()
        finally:
            metrics.close()
        teacher_loss = heldout_loss(teacher.model, eval_set, device)
    finally:
        torch.set_num_threads(old_threads)
    record = {
        "run_id": student.run_id,
        "config_hash": chash,
        "status": state.status,
        "error": state.message if state.status != "done" else None,
        "kind": "distilled",
        "teacher_run_id": teacher.spec.run_id,
        "n_params": shape.non_embedding_params,
        "n_params_total": shape.total_params,
        "tokens": state.tokens,
        "steps": state.step,
        "final_train_loss": state.loss,
        "final_train_ce": objective.last.get("ce"),
        "final_train_kl": objective.last.get("kl"),
        "eval_loss": state.eval_loss,
        "teacher_eval_loss": teacher_loss,
        "wall_seconds": time.time() - t0,
        "distill": dspec.model_dump(),
    }
    atomic_write_json(out / "record.json", record)
    return record


def distill(
    teacher_dir: str | Path,
    student_config: str | Path,
    out_dir: str | Path,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    callbacks: Callable[[str], Sequence[Callback]] | None = None,
) -> dict[str, Any]:
    """Distil the run in `teacher_dir` into the student of `student_config`; compare with scratch.

    Returns (and writes to out_dir/distill_report.json) the held-out losses of teacher, distilled
    student and scratch student on the student's held-out set, and student − scratch.
    `callbacks(phase)` (phase "student" or "scratch") gives extra trainer callbacks, e.g. a progress bar.
    """
    out = Path(out_dir)
    teacher = load_run(teacher_dir)
    student, dspec = load_student(student_config, teacher.spec, overrides)
    from scalelab.data.store import ensure_store

    store = ensure_store(student.data)
    extra = callbacks or (lambda phase: ())
    rec = train_student(teacher, student, dspec, out / "student", store=store, callbacks=extra("student"))
    report: dict[str, Any] = {
        "teacher_run_id": teacher.spec.run_id,
        "student_run_id": student.run_id,
        "tokens": rec["tokens"],
        "teacher_eval_loss": rec["teacher_eval_loss"],
        "student_eval_loss": rec["eval_loss"],
        "student_status": rec["status"],
        "scratch_eval_loss": None,
        "student_minus_scratch": None,
        "distill": dspec.model_dump(),
    }
    if dspec.compare_scratch:
        scratch = run_training(student, out / "scratch", resume=True, store=store, callbacks=extra("scratch"))
        report["scratch_eval_loss"] = scratch["eval_loss"]
        report["scratch_status"] = scratch["status"]
        if rec["eval_loss"] is not None and scratch["eval_loss"] is not None:
            report["student_minus_scratch"] = rec["eval_loss"] - scratch["eval_loss"]
    atomic_write_json(out / "distill_report.json", report)
    log.info("distillation report: %s", json.dumps(report))
    return report
