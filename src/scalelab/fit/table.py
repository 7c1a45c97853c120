"""The table a scaling law is fitted to: one row per run, validated before any fit.

Columns (case-insensitive; common aliases accepted):

=========  ===========================================  =====================================
column     meaning                                      aliases
=========  ===========================================  =====================================
N          parameters (positive)                        n_params, params, model_size
D          training tokens (positive)                   tokens, n_tokens
loss       final loss (positive)                        eval_loss, final_loss
C          training compute in FLOPs (optional)         flops, compute
seed       training seed (optional)
group      dataset/recipe group (optional)
weight     fit weight (optional, non-negative)          weights
run_id     identifier used in messages (optional)
=========  ===========================================  =====================================

Nothing is silently dropped: a non-positive, NaN or missing value raises `FitError` naming the row and
column; duplicated runs (same N, D, group and seed) are kept and reported in `RunTable.notes`.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from scalelab.errors import FitError

log = logging.getLogger(__name__)

ALIASES: dict[str, tuple[str, ...]] = {
    "N": ("n", "n_params", "params", "model_size", "parameters"),
    "D": ("d", "tokens", "n_tokens", "train_tokens"),
    "loss": ("eval_loss", "final_loss", "l"),
    "C": ("c", "flops", "compute", "compute_flops"),
    "seed": ("seed",),
    "group": ("group",),
    "weight": ("weight", "weights"),
    "run_id": ("run_id", "id", "run"),
}

COMPUTE_6ND = "6ND"
COMPUTE_TABLE = "table"


@dataclass(frozen=True)
class RunTable:
    """Validated runs as arrays (float64), with optional seed/group/weight columns.

    ``compute_source`` says where ``C`` came from: ``"table"`` when the source gave FLOPs (for a study,
    the `models/flops.py` accounting), ``"6ND"`` when it was computed here as 6·N·D.
    """

    N: np.ndarray
    D: np.ndarray
    loss: np.ndarray
    C: np.ndarray
    compute_source: str = COMPUTE_6ND
    seed: np.ndarray | None = None
    group: np.ndarray | None = None
    weight: np.ndarray | None = None
    run_id: tuple[str, ...] = ()
    source: str = "<arrays>"
    notes: tuple[str, ...] = field(default=())

    def __len__(self) -> int:
        return int(self.N.shape[0])

    @property
    def groups(self) -> list[str]:
        """Distinct groups in first-seen order ([""] when there is no group column)."""
        if self.group is None:
            return [""]
        seen: dict[str, None] = {}
        for g in self.group:
            seen.setdefault(str(g), None)
        return list(seen)

    def label(self, i: int) -> str:
        """How row `i` is named in messages: its run_id, else its 1-based row number."""
        if self.run_id:
            return f"row {i + 1} (run {self.run_id[i]})"
        return f"row {i + 1}"

    def subset(self, idx: Sequence[int] | np.ndarray) -> RunTable:
        """Rows `idx` (an index array or boolean mask) as a new table; notes are kept."""
        idx = np.asarray(idx)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)

        def take(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None else a[idx]

        return RunTable(
            N=self.N[idx],
            D=self.D[idx],
            loss=self.loss[idx],
            C=self.C[idx],
            compute_source=self.compute_source,
            seed=take(self.seed),
            group=take(self.group),
            weight=take(self.weight),
            run_id=tuple(self.run_id[i] for i in idx) if self.run_id else (),
            source=self.source,
            notes=self.notes,
        )

    def clusters(self) -> np.ndarray:
        """Bootstrap units: with a seed column, all seeds of one config (N, D, group) form one cluster;
        otherwise every run is its own cluster. Returns an int label per row."""
        if self.seed is None:
            return np.arange(len(self))
        keys: dict[tuple[Any, ...], int] = {}
        out = np.empty(len(self), dtype=np.int64)
        grp = self.group if self.group is not None else [""] * len(self)
        for i in range(len(self)):
            k = (float(self.N[i]), float(self.D[i]), str(grp[i]))
            out[i] = keys.setdefault(k, len(keys))
        return out

    def describe(self) -> dict[str, Any]:
        """Summary used in fit.json."""
        return {
            "source": self.source,
            "n_runs": len(self),
            "compute_source": self.compute_source,
            "N_range": [float(self.N.min()), float(self.N.max())],
            "D_range": [float(self.D.min()), float(self.D.max())],
            "C_range": [float(self.C.min()), float(self.C.max())],
            "loss_range": [float(self.loss.min()), float(self.loss.max())],
            "has_seed": self.seed is not None,
            "groups": self.groups if self.group is not None else [],
            "weighted": self.weight is not None,
            "notes": list(self.notes),
        }


#: largest value accepted in a table column: far beyond any run (N ~ 1e13, D ~ 1e15), small enough that
#: 6·N·D and the law's powers stay finite in float64 (values near 1e300 overflowed deep in the fit)
MAX_VALUE = 1e30


def _check_positive(name: str, values: Any, labels: Sequence[str] | None, source: str) -> np.ndarray:
    raw = list(values)
    out = np.empty(len(raw), dtype=np.float64)
    for i, v in enumerate(raw):
        who = labels[i] if labels else f"row {i + 1}"
        try:
            x = float(v)
        except (TypeError, ValueError):
            raise FitError(f"{source}: {who}: column '{name}' is not a number (got {v!r})") from None
        if v is None or math.isnan(x):
            raise FitError(f"{source}: {who}: column '{name}' is missing or NaN; fix or remove the run")
        if not math.isfinite(x) or x <= 0:
            raise FitError(f"{source}: {who}: column '{name}' must be positive and finite, got {v!r}")
        if x > MAX_VALUE:
            raise FitError(f"{source}: {who}: column '{name}' is {v!r}, above {MAX_VALUE:g}; check its units")
        out[i] = x
    return out


def make_table(
    N: Iterable[float],
    D: Iterable[float],
    loss: Iterable[float],
    C: Iterable[float] | None = None,
    *,
    seed: Iterable[Any] | None = None,
    group: Iterable[Any] | None = None,
    weight: Iterable[float] | None = None,
    run_id: Iterable[Any] | None = None,
    compute_source: str | None = None,
    source: str = "<arrays>",
) -> RunTable:
    """Build a validated `RunTable` from columns. Raises `FitError` naming the first bad row/column."""
    N, D, loss = list(N), list(D), list(loss)
    C = list(C) if C is not None else None
    ids = tuple(str(r) for r in run_id) if run_id is not None else ()
    n_rows = len(N)
    if ids and len(ids) != n_rows:
        raise FitError(f"{source}: column 'run_id' has {len(ids)} values for {n_rows} rows")
    labels = [f"row {i + 1} (run {r})" for i, r in enumerate(ids)] if ids else None
    n = _check_positive("N", N, labels, source)
    d = _check_positive("D", D, labels, source)
    y = _check_positive("loss", loss, labels, source)
    for name, arr in (("D", d), ("loss", y)):
        if arr.shape != n.shape:
            raise FitError(f"{source}: column '{name}' has {arr.size} values, column 'N' has {n.size}")
    if C is not None:
        c = _check_positive("C", C, labels, source)
        if c.shape != n.shape:
            raise FitError(f"{source}: column 'C' has {c.size} values, column 'N' has {n.size}")
        csrc = compute_source or COMPUTE_TABLE
    else:
        c = 6.0 * n * d
        csrc = COMPUTE_6ND
    seeds = np.asarray(list(seed), dtype=object) if seed is not None else None
    groups = np.asarray([str(g) for g in group], dtype=object) if group is not None else None
    w = None
    if weight is not None:
        w = np.asarray([float(x) for x in weight], dtype=np.float64)
        bad = np.flatnonzero(~np.isfinite(w) | (w < 0))
        if bad.size:
            i = int(bad[0])
            who = labels[i] if labels else f"row {i + 1}"
            raise FitError(f"{source}: {who}: column 'weight' must be finite and >= 0, got {w[i]}")
    for name, arr in (("seed", seeds), ("group", groups), ("weight", w)):
        if arr is not None and arr.shape[0] != n.shape[0]:
            raise FitError(f"{source}: column '{name}' has {arr.shape[0]} values, column 'N' has {n.size}")
    if seeds is not None:
        for i, s in enumerate(seeds):
            if s is None or (isinstance(s, float) and math.isnan(s)):
                who = labels[i] if labels else f"row {i + 1}"
                raise FitError(f"{source}: {who}: column 'seed' is missing")
    notes = _duplicate_notes(n, d, seeds, groups, labels)
    for msg in notes:
        log.warning("%s: %s", source, msg)
    return RunTable(
        N=n,
        D=d,
        loss=y,
        C=c,
        compute_source=csrc,
        seed=seeds,
        group=groups,
        weight=w,
        run_id=ids,
        source=source,
        notes=tuple(notes),
    )


def _duplicate_notes(
    n: np.ndarray,
    d: np.ndarray,
    seeds: np.ndarray | None,
    groups: np.ndarray | None,
    labels: Sequence[str] | None,
) -> list[str]:
    seen: dict[tuple[Any, ...], list[int]] = {}
    for i in range(n.size):
        key = (
            float(n[i]),
            float(d[i]),
            str(groups[i]) if groups is not None else "",
            str(seeds[i]) if seeds is not None else "",
        )
        seen.setdefault(key, []).append(i)
    groups = [rows for rows in seen.values() if len(rows) > 1]
    if not groups:
        return []
    shown = "; ".join(", ".join(labels[i] if labels else f"row {i + 1}" for i in rows) for rows in groups[:5])
    more = f"; and {len(groups) - 5} more groups" if len(groups) > 5 else ""
    n_rows = sum(len(r) for r in groups)
    return [
        f"{len(groups)} groups of duplicated runs (same N, D, group and seed; {n_rows} rows): {shown}{more}; "
        "all are kept and fitted (add a seed column if they are repeats)"
    ]


def _find(columns: Sequence[str], key: str, mapping: Mapping[str, str] | None) -> str | None:
    if mapping and key in mapping:
        if mapping[key] not in columns:
            raise FitError(f"column '{mapping[key]}' (given for {key}) is not in the table")
        return mapping[key]
    lower = {c.lower(): c for c in columns}
    for cand in (key.lower(), *ALIASES.get(key, ())):
        if cand.lower() in lower:
            return lower[cand.lower()]
    return None


def table_from_records(
    records: Sequence[Mapping[str, Any]] | Mapping[str, Sequence[Any]],
    source: str = "<records>",
    columns: Mapping[str, str] | None = None,
) -> RunTable:
    """A `RunTable` from a list of row dicts or a dict of columns.

    `columns` maps our names (N, D, loss, C, seed, group, weight, run_id) to the table's own names.
    """
    if isinstance(records, Mapping):
        cols: dict[str, list[Any]] = {str(k): list(v) for k, v in records.items()}
    else:
        names: dict[str, None] = {}
        for r in records:
            for k in r:
                names.setdefault(str(k), None)
        cols = {k: [r.get(k) for r in records] for k in names}
    if not cols or not any(len(v) for v in cols.values()):
        raise FitError(f"{source}: the table has no rows")
    present = list(cols)
    found = {k: _find(present, k, columns) for k in ALIASES}
    for req in ("N", "D", "loss"):
        if found[req] is None:
            raise FitError(
                f"{source}: missing column '{req}' (accepted names: {', '.join((req, *ALIASES[req]))}); "
                f"columns present: {', '.join(present)}"
            )
    get = {k: (cols[v] if v is not None else None) for k, v in found.items()}
    return make_table(
        get["N"],  # type: ignore[arg-type]
        get["D"],  # type: ignore[arg-type]
        get["loss"],  # type: ignore[arg-type]
        get["C"],
        seed=get["seed"],
        group=get["group"],
        weight=get["weight"],
        run_id=get["run_id"],
        source=source,
    )


def _read_csv(path: Path) -> dict[str, list[Any]]:
    import csv

    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None:
            raise FitError(f"{path}: empty CSV file (no header row)")
        cols: dict[str, list[Any]] = {name: [] for name in reader.fieldnames}
        for row in reader:
            for name in reader.fieldnames:
                v = row.get(name)
                cols[name].append(None if v is None or v.strip() == "" else _num(v))
    return cols


def _num(v: str) -> Any:
    try:
        return int(v)
    except ValueError:
        pass
    try:
        return float(v)
    except ValueError:
        return v


def _is_json_doc(path: Path) -> bool:
    """A whole-file JSON document (a list of row objects or a dict of columns), not JSON lines."""
    try:
        doc = json.loads(path.read_text())
    except ValueError:
        return False
    if isinstance(doc, dict):
        return all(isinstance(v, list) for v in doc.values())
    return isinstance(doc, list)


def load_table(path: str | Path, columns: Mapping[str, str] | None = None) -> RunTable:
    """Read runs from a CSV, Parquet or JSONL file (see the module docstring for the columns)."""
    path = Path(path)
    if not path.is_file():
        raise FitError(f"{path}: no such file (expected a CSV, Parquet or JSONL table of runs)")
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            data: Any = _read_csv(path)
        elif suffix in (".parquet", ".pq"):
            import pyarrow.parquet as pq

            data = pq.read_table(path).to_pydict()
        elif suffix == ".json" and _is_json_doc(path):
            data = json.loads(path.read_text())
        elif suffix in (".jsonl", ".ndjson", ".json"):
            rows = []
            for lineno, line in enumerate(path.read_text().splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except ValueError as err:
                    raise FitError(f"{path}: line {lineno}: not valid JSON ({err})") from None
                if not isinstance(obj, dict):
                    raise FitError(f"{path}: line {lineno}: expected a JSON object per line")
                rows.append(obj)
            data = rows
        else:
            raise FitError(f"{path}: unknown table format '{suffix}' (use .csv, .parquet or .jsonl)")
    except OSError as err:
        raise FitError(f"{path}: cannot read ({err})") from None
    except (ValueError, RecursionError) as err:  # not UTF-8, a corrupt Parquet file, JSON nested too deep
        raise FitError(
            f"{path}: not a readable {suffix} table of runs ({type(err).__name__}: {err})"
        ) from None
    return table_from_records(data, source=str(path), columns=columns)
