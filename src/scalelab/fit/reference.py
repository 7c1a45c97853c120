"""Readers for public scaling-law measurements (the files in ``shared/reference/``) as `RunTable`s.

Nothing is downloaded: each reader takes the path of a file (or folder) as published. They feed the
calibration backtests (`benchmarks/bench_fit_calibration.py`, `docs/calibration.md`) and let a team fit
their own law beside published ones.

* `chinchilla_epoch(csv)`: Epoch AI's reconstruction of Hoffmann et al. (2022) Fig. 4 (N, C, loss;
  D = C / 6N, as in Besiroglu et al. 2024).
* `openlm_li2025(csv)`: Li, Kudugunta & Zettlemoyer (2025) open_lm final checkpoints (N, D, C, loss).
* `gadre2024(folder, dataset)`: Gadre et al. (2024) over-training runs on one data set (``c4_original``,
  ``rpj`` or ``rw_original``), the C4 eval loss; runs that never left warm-up are dropped (stated in
  the table's notes).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from scalelab.errors import FitError
from scalelab.fit.table import COMPUTE_6ND, COMPUTE_TABLE, RunTable, make_table

GADRE_DATASETS = ("c4_original", "rpj", "rw_original")
GADRE_CONTEXT_TOKENS = 2048


def _rows(path: Path) -> list[dict[str, str]]:
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            return list(csv.DictReader(fh))
    except OSError as err:
        raise FitError(f"{path}: cannot read ({err.strerror or err})") from None


def _column(rows: list[dict[str, str]], key: str, path: Path) -> np.ndarray:
    try:
        return np.array([float(r[key]) for r in rows])
    except (KeyError, ValueError) as err:
        raise FitError(f"{path}: column {key!r} missing or not numeric ({err})") from None


def chinchilla_epoch(path: str | Path) -> RunTable:
    """Epoch AI's 245 Chinchilla runs: N = 'Model Size', C = 'Training FLOP', D = C / (6N)."""
    path = Path(path)
    rows = _rows(path)
    N = _column(rows, "Model Size", path)
    C = _column(rows, "Training FLOP", path)
    loss = _column(rows, "loss", path)
    return make_table(N, C / (6 * N), loss, C, compute_source=COMPUTE_6ND, source=str(path))


def openlm_li2025(path: str | Path, n_column: str = "N", tuned_only: bool = True) -> RunTable:
    """Li et al. (2025) open_lm final checkpoints: N (or 'N_no_emb'), D, C and the final loss.

    The file holds a learning-rate sweep per (N, D); ``tuned_only`` keeps the best learning rate of
    each (the runs a scaling law describes), as the paper fits them."""
    path = Path(path)
    rows = _rows(path)
    if tuned_only:
        best: dict[tuple[str, str], dict[str, str]] = {}
        for r in rows:
            key = (r.get(n_column, ""), r.get("D", ""))
            if key not in best or float(r["loss"]) < float(best[key]["loss"]):
                best[key] = r
        rows = list(best.values())
    N = _column(rows, n_column, path)
    D = _column(rows, "D", path)
    C = _column(rows, "C", path)
    loss = _column(rows, "loss", path)
    ids = tuple(
        f"{r.get('model', '?')}@{r.get('train_tokens', '?')}/lr={r.get('peak_lr', '?')}" for r in rows
    )
    return make_table(N, D, loss, C, run_id=ids, compute_source=COMPUTE_TABLE, source=str(path))


def gadre2024(folder: str | Path, dataset: str = "c4_original", eval_set: str = "c4_val") -> RunTable:
    """Gadre et al. (2024) runs trained on `dataset`; loss = the eval loss on `eval_set` (C4 by default).

    N = all parameters (``hyperparameters.params``), D = tokens, C = 6·N·D. Runs whose optimizer steps
    (tokens / (global batch × 2048)) do not exceed the warm-up never left warm-up and are dropped."""
    folder = Path(folder)
    if dataset not in GADRE_DATASETS:
        raise FitError(f"gadre2024: dataset {dataset!r} is not one of {', '.join(GADRE_DATASETS)}")
    files = sorted(folder.glob(f"{dataset}-*.json"))
    if not files:
        raise FitError(f"{folder}: no {dataset}-*.json run files here")
    N, D, loss, ids, dropped = [], [], [], [], []
    for f in files:
        try:
            d = json.loads(f.read_text(encoding="utf-8"))
            hp = d["hyperparameters"]
            steps = hp["tokens"] / (hp["global_bs"] * GADRE_CONTEXT_TOKENS)
            match = [r for r in d["results"] if any(eval_set in v for v in r.get("val_data", []))]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise FitError(f"{f}: not a Gadre et al. run file ({err})") from None
        if steps <= hp.get("warmup", 0):
            dropped.append(d.get("name", f.stem))
            continue
        if not match:
            raise FitError(f"{f}: no result on the eval set {eval_set!r}")
        N.append(float(hp["params"]))
        D.append(float(hp["tokens"]))
        loss.append(float(match[-1]["loss"]))
        ids.append(d.get("name", f.stem))
    N_a, D_a = np.array(N), np.array(D)
    table = make_table(N_a, D_a, np.array(loss), 6 * N_a * D_a, run_id=tuple(ids), source=str(folder))
    if dropped:
        note = f"{len(dropped)} runs never left warm-up and were dropped: {', '.join(dropped)}"
        table = RunTable(**{**table.__dict__, "notes": (*table.notes, note)})
    return table
