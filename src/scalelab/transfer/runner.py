"""Train one small run in this process (no run directory, no subprocess) and return its losses.

Transfer sweeps train many tiny models; starting a subprocess and writing checkpoints per run costs more
than the training itself. `train_in_process` builds the model and parametrization exactly as
`scalelab.train.run.run_training` does (`prepare_run`: same seeding, same eval set; the same `Trainer`), but keeps
everything in memory. Use `run_training` when you want a recorded run; use this for sweeps and checks.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import torch

from scalelab.spec import RunSpec
from scalelab.train.build import LoaderFactory, default_loader_factory, prepare_run, resolve_device
from scalelab.train.trainer import Callback, DivergenceGuard, Trainer


def _finite(x: float | None) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


def train_in_process(
    spec: RunSpec,
    *,
    store: Any = None,
    loader_factory: LoaderFactory | None = None,
    callbacks: Sequence[Callback] = (),
    threads: int | None = 1,
) -> dict[str, Any]:
    """Train `spec` in memory; return `{run_id, status, error, eval_loss, final_train_loss, steps, seconds}`.

    `store` defaults to `ensure_store(spec.data)` and `loader_factory` to the `BlockLoader`. A diverged run
    returns status "diverged" and `eval_loss` None; an exception inside the loop becomes status "failed".
    `threads` sets torch's intra-op threads for the run (restored afterwards); None leaves them alone.
    """
    t0 = time.perf_counter()
    out: dict[str, Any] = {
        "run_id": spec.run_id,
        "status": "failed",
        "error": None,
        "eval_loss": None,
        "final_train_loss": None,
        "steps": 0,
        "seconds": 0.0,
    }
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    trainer: Trainer | None = None
    try:
        if store is None:
            from scalelab.data.store import ensure_store

            store = ensure_store(spec.data)
        device = resolve_device(spec.train.device)
        p = prepare_run(spec, store, loader_factory or default_loader_factory, device)
        trainer = Trainer(
            p.model,
            p.groups,
            p.train,
            train_loader=p.train_loader,
            total_steps=p.total_steps,
            context_tokens=spec.model.context_tokens,
            device=device,
            eval_batches=p.eval_batches,
            debug=spec.debug,
            callbacks=[DivergenceGuard(spec.train.divergence_factor), *callbacks],
            raw_model=p.raw_model,
        )
        state = trainer.fit()
        out["status"] = state.status
        out["error"] = state.message if state.status != "done" else None
    except Exception as err:  # noqa: BLE001 — a sweep point that fails is a result, not a crash
        out["status"] = "failed"
        out["error"] = f"{type(err).__name__}: {err}"
    finally:
        if trainer is not None:
            trainer.close()
        torch.set_num_threads(old_threads)
    if trainer is not None:
        st = trainer.state
        out["steps"] = st.step
        out["final_train_loss"] = _finite(st.loss)
        out["eval_loss"] = _finite(st.eval_loss) if out["status"] == "done" else None
    out["seconds"] = time.perf_counter() - t0
    return out
