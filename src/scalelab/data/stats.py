"""Mergeable, out-of-core statistics: moments (Chan/Pébay merge) and KLL quantile sketches.

Everything here is computed chunk by chunk and merged, so a table or token store larger than RAM is
summarised in one streaming pass, and the pass can be split over worker processes whose partial
results are merged in a fixed order:

- `Moments`: count, mean, M2, M3 (→ variance, skewness), min, max. Two chunks merge exactly with the
  pairwise formulas of Chan et al. (1979) extended to the third moment by Pébay (2008); a single
  chunk is summarised with a numerically stable two-pass formula.
- `Quantiles`: an Apache DataSketches KLL sketch (``kll_doubles_sketch``), mergeable and
  serialisable; answers are within the sketch's normalised rank error. The default k=269 is the
  smallest whose bound, as DataSketches states it (99% confidence, single-quantile queries), is at
  most 1% (0.997%; k=200 gave 1.33%). The sketch's size grows only with k and log(n).
- `column_stats` for numeric columns of Parquet (by row group) and CSV (by byte range) files;
  `token_store_stats` for document lengths and token frequencies of a token store (by shard).
- `RobustScaler`: median centring and percentile-range scaling (scikit-learn's shape), fitted from
  KLL sketches so it can be fitted out of core with `partial_fit`.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from scalelab.data.procs import worker_context
from scalelab.errors import DataError

TARGET_RANK_ERROR = 0.01
DEFAULT_K = 269  # == k_for_rank_error(TARGET_RANK_ERROR); a test keeps the two in step
_KLL_K_RANGE = (8, 65535)  # what kll_doubles_sketch accepts
SUMMARY_QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)


# ----------------------------------------------------------------------------------------- moments
@dataclass
class Moments:
    """Count, mean, central moment sums M2/M3, min and max of the finite values seen; NaNs counted apart."""

    count: int = 0
    mean: float = 0.0
    m2: float = 0.0
    m3: float = 0.0
    min: float = math.inf
    max: float = -math.inf
    missing: int = 0

    @classmethod
    def of(cls, values: np.ndarray | Sequence[float]) -> Moments:
        """Moments of one chunk (two-pass within the chunk: stable even for large offsets)."""
        x = np.asarray(values, dtype=np.float64).ravel()
        finite = ~np.isnan(x)
        missing = int(x.size - finite.sum())
        x = x[finite]
        if x.size == 0:
            return cls(missing=missing)
        mean = float(x.mean())
        d = x - mean
        return cls(
            count=int(x.size),
            mean=mean,
            m2=float(np.dot(d, d)),
            m3=float(np.sum(d * d * d)),
            min=float(x.min()),
            max=float(x.max()),
            missing=missing,
        )

    def merge(self, other: Moments) -> Moments:
        """The moments of both chunks together (pairwise update; associative up to rounding)."""
        na, nb = self.count, other.count
        if nb == 0:
            return Moments(**{**self.__dict__, "missing": self.missing + other.missing})
        if na == 0:
            return Moments(**{**other.__dict__, "missing": self.missing + other.missing})
        n = na + nb
        delta = other.mean - self.mean
        mean = self.mean + delta * nb / n
        m2 = self.m2 + other.m2 + delta * delta * na * nb / n
        m3 = (
            self.m3
            + other.m3
            + delta**3 * na * nb * (na - nb) / (n * n)
            + 3.0 * delta * (na * other.m2 - nb * self.m2) / n
        )
        return Moments(
            n, mean, m2, m3, min(self.min, other.min), max(self.max, other.max), self.missing + other.missing
        )

    def update(self, values: np.ndarray | Sequence[float]) -> Moments:
        return self.merge(Moments.of(values))

    @property
    def variance(self) -> float:
        """Sample variance (n - 1 in the denominator); NaN for fewer than two values."""
        return self.m2 / (self.count - 1) if self.count > 1 else math.nan

    @property
    def std(self) -> float:
        return math.sqrt(self.variance) if self.count > 1 else math.nan

    @property
    def skewness(self) -> float:
        """Population skewness g1 = sqrt(n)·M3 / M2^1.5 (scipy.stats.skew with bias=True)."""
        if self.count < 2 or self.m2 == 0:
            return math.nan
        return math.sqrt(self.count) * self.m3 / self.m2**1.5

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Moments:
        return cls(**d)


# --------------------------------------------------------------------------------------- quantiles
def kll_rank_error(k: int) -> float:
    """DataSketches' normalised rank error bound of a KLL sketch with this k (99% confidence,
    single-quantile queries), independent of n."""
    from datasketches import kll_doubles_sketch

    return float(kll_doubles_sketch.get_normalized_rank_error(int(k), False))


def k_for_rank_error(target: float) -> int:
    """The smallest KLL k whose `kll_rank_error` is at most `target` (the bound falls as k grows)."""
    lo, hi = _KLL_K_RANGE
    if not kll_rank_error(hi) <= target:
        raise DataError(f"no KLL k reaches rank error {target} (k={hi} gives {kll_rank_error(hi):.2e})")
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if kll_rank_error(mid) <= target else (mid + 1, hi)
    return lo


class Quantiles:
    """A KLL quantile sketch of float64 values (NaNs ignored): mergeable, serialisable, picklable."""

    def __init__(self, k: int = DEFAULT_K, sketch: Any = None) -> None:
        from datasketches import kll_doubles_sketch

        self.k = k
        self.sketch = sketch if sketch is not None else kll_doubles_sketch(k)

    def update(self, values: np.ndarray | Sequence[float]) -> Quantiles:
        x = np.asarray(values, dtype=np.float64).ravel()
        x = x[~np.isnan(x)]
        if x.size:
            self.sketch.update(np.ascontiguousarray(x))
        return self

    def merge(self, other: Quantiles) -> Quantiles:
        self.sketch.merge(other.sketch)
        return self

    @property
    def n(self) -> int:
        return int(self.sketch.n)

    def quantile(self, q: float) -> float:
        """Value at normalised rank `q` in [0, 1] (NaN when empty)."""
        if self.n == 0:
            return math.nan
        return float(self.sketch.get_quantile(float(q), True))

    def quantiles(self, qs: Iterable[float]) -> np.ndarray:
        return np.array([self.quantile(q) for q in qs], dtype=np.float64)

    @property
    def rank_error(self) -> float:
        """Normalised rank error bound of single-quantile queries (99% confidence), from DataSketches."""
        return float(self.sketch.normalized_rank_error(False))

    def to_bytes(self) -> bytes:
        return bytes(self.sketch.serialize())

    @classmethod
    def from_bytes(cls, data: bytes) -> Quantiles:
        """Inverse of `to_bytes`; k is the serialised sketch's own."""
        from datasketches import kll_doubles_sketch

        sketch = kll_doubles_sketch.deserialize(data)
        return cls(int(sketch.k), sketch)

    def to_b64(self) -> str:
        return base64.b64encode(self.to_bytes()).decode("ascii")

    @classmethod
    def from_b64(cls, text: str) -> Quantiles:
        return cls.from_bytes(base64.b64decode(text))

    def __getstate__(self) -> dict[str, Any]:
        return {"k": self.k, "data": self.to_bytes()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        other = Quantiles.from_bytes(state["data"])
        self.k, self.sketch = other.k, other.sketch


# ------------------------------------------------------------------------------------ column stats
@dataclass
class ColumnStats:
    """Moments and a quantile sketch of one column, mergeable."""

    moments: Moments = field(default_factory=Moments)
    quantiles: Quantiles = field(default_factory=Quantiles)

    def update(self, values: np.ndarray) -> ColumnStats:
        self.moments = self.moments.update(values)
        self.quantiles.update(values)
        return self

    def merge(self, other: ColumnStats) -> ColumnStats:
        self.moments = self.moments.merge(other.moments)
        self.quantiles.merge(other.quantiles)
        return self

    def summary(self, qs: Sequence[float] = SUMMARY_QUANTILES) -> dict[str, Any]:
        """Plain JSON-able numbers (NaN where undefined)."""
        m = self.moments
        out: dict[str, Any] = {
            "count": m.count,
            "missing": m.missing,
            "mean": m.mean if m.count else math.nan,
            "std": m.std,
            "skewness": m.skewness,
            "min": m.min if m.count else math.nan,
            "max": m.max if m.count else math.nan,
        }
        for q, v in zip(qs, self.quantiles.quantiles(qs), strict=True):
            out[f"p{q * 100:g}"] = float(v)
        out["rank_error"] = self.quantiles.rank_error
        return out


def _merge_all(
    parts: Iterable[dict[str, ColumnStats]], columns: Sequence[str], k: int
) -> dict[str, ColumnStats]:
    total = {c: ColumnStats(quantiles=Quantiles(k)) for c in columns}
    for part in parts:
        for c in columns:
            total[c].merge(part[c])
    return total


def _star(unit: tuple[Any, ...], fn: Callable[..., Any]) -> Any:
    return fn(*unit)


def _run_units(
    fn: Callable[..., Any], units: list[tuple[Any, ...]], workers: int, executor: str = "local"
) -> Iterator[Any]:
    """Results of fn(*unit) in unit order, computed in `workers` spawned processes when > 1, or as Ray
    tasks with ``executor="ray"`` (`scalelab.data.raymap`); merged in this order either way."""
    if executor == "ray":
        from scalelab.data.raymap import ray_ordered_map

        yield from ray_ordered_map(_star, units, shared=(fn,))
        return
    if workers <= 1 or len(units) <= 1:
        for u in units:
            yield fn(*u)
        return
    with ProcessPoolExecutor(max_workers=min(workers, len(units)), mp_context=worker_context()) as pool:
        futures = [pool.submit(fn, *u) for u in units]
        for f in futures:
            yield f.result()


def _check_executor(executor: str) -> None:
    if executor not in ("local", "ray"):
        raise DataError(f"executor must be 'local' or 'ray', got {executor!r}")


def _numeric(arr: Any, column: str, where: str) -> np.ndarray:
    """A pyarrow array as float64 (nulls → NaN); `DataError` naming the column when not numeric."""
    import pyarrow as pa

    t = arr.type
    if not (
        pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t) or pa.types.is_null(t)
    ):
        raise DataError(f"{where}: column '{column}' is not numeric (type {t}); choose numeric columns")
    if pa.types.is_null(t):
        return np.full(len(arr), np.nan)
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    return np.asarray(arr.cast(pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float64)


def _parquet_unit(path: str, row_groups: list[int], columns: list[str], k: int, batch_rows: int) -> dict:
    import pyarrow.parquet as pq

    stats = {c: ColumnStats(quantiles=Quantiles(k)) for c in columns}
    pf = pq.ParquetFile(path)
    for batch in pf.iter_batches(batch_size=batch_rows, row_groups=row_groups, columns=columns):
        for c in columns:
            stats[c].update(_numeric(batch.column(c), c, path))
    return stats


def _csv_unit(path: str, start: int, end: int, columns: list[str], k: int, block_bytes: int) -> dict:
    """Stats of the CSV lines that begin in [start, end) (the header line is never counted)."""
    import pyarrow as pa
    import pyarrow.csv as pcsv

    stats = {c: ColumnStats(quantiles=Quantiles(k)) for c in columns}
    with open(path, "rb") as fh:
        header = fh.readline()
        names = pcsv.read_csv(io.BytesIO(header)).column_names if header.strip() else []
        pos = max(start, len(header))
        if pos > len(header):  # move to the start of the first line that begins at or after `start`
            fh.seek(pos - 1)
            if fh.read(1) != b"\n":
                pos += len(fh.readline())
        fh.seek(pos)
        convert = pcsv.ConvertOptions(include_columns=columns)
        read = pcsv.ReadOptions(column_names=names)
        while pos < end:
            block = fh.read(min(block_bytes, end - pos))
            if not block:
                break
            if not block.endswith(b"\n"):
                block += fh.readline()  # finish the line that starts inside our range
            pos += len(block)
            try:
                table = pcsv.read_csv(io.BytesIO(block), read_options=read, convert_options=convert)
            except pa.ArrowException as err:
                raise DataError(f"{path}: cannot parse CSV near byte {pos} ({err})") from None
            for c in columns:
                stats[c].update(_numeric(table.column(c), c, path))
    return stats


def column_stats(
    path: str | Path,
    columns: Sequence[str],
    *,
    workers: int = 1,
    k: int = DEFAULT_K,
    batch_rows: int = 65_536,
    block_bytes: int = 8 << 20,
    executor: str = "local",
) -> dict[str, ColumnStats]:
    """Moments and quantiles of numeric `columns` of a Parquet or CSV file, streamed and merged.

    Parquet is split by row group, CSV by byte ranges aligned to line starts (this assumes no line
    breaks inside quoted CSV fields). A missing or non-numeric column raises `DataError` naming it.
    The units are cut for `workers` and computed there, or as Ray tasks with ``executor="ray"`` (the
    file's path must then be readable on every node).
    """
    _check_executor(executor)
    path = Path(path)
    columns = list(columns)
    if not columns:
        raise DataError("no columns given")
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        units = _parquet_units(path, columns, k, batch_rows, workers)
        fn: Callable[..., Any] = _parquet_unit
    elif suffix in (".csv", ".tsv", ".txt"):
        units = _csv_units(path, columns, k, block_bytes, workers)
        fn = _csv_unit
    else:
        raise DataError(f"{path}: unsupported table format '{suffix}' (use .parquet or .csv)")
    return _merge_all(_run_units(fn, units, workers, executor), columns, k)


def _parquet_units(path: Path, columns: list[str], k: int, batch_rows: int, workers: int) -> list[tuple]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as err:
        raise DataError(f"{path}: cannot read Parquet file ({err})") from None
    schema = pf.schema_arrow
    for c in columns:
        if c not in schema.names:
            raise DataError(f"{path}: no column '{c}' (columns: {', '.join(schema.names)})")
        t = schema.field(c).type
        if not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)):
            raise DataError(f"{path}: column '{c}' is not numeric (type {t}); choose numeric columns")
    n = pf.num_row_groups
    per = max(1, math.ceil(n / max(1, workers * 4)))
    return [
        (str(path), list(range(i, min(n, i + per))), columns, k, batch_rows) for i in range(0, n, per)
    ] or [(str(path), [], columns, k, batch_rows)]


def _csv_units(path: Path, columns: list[str], k: int, block_bytes: int, workers: int) -> list[tuple]:
    import pyarrow.csv as pcsv

    with open(path, "rb") as fh:
        header = fh.readline()
    names = pcsv.read_csv(io.BytesIO(header)).column_names if header.strip() else []
    for c in columns:
        if c not in names:
            raise DataError(f"{path}: no column '{c}' (columns: {', '.join(names)})")
    size = path.stat().st_size
    n_units = max(1, min(workers * 4, size // (1 << 20)))
    bounds = np.linspace(0, size, n_units + 1).astype(np.int64)
    return [
        (str(path), int(a), int(b), columns, k, block_bytes)
        for a, b in zip(bounds[:-1], bounds[1:], strict=True)
    ]


# ------------------------------------------------------------------------------ token store stats
def _shard_unit(
    store_path: str, split: str, i: int, k: int
) -> tuple[int, list[int], int, bool, np.ndarray, Any]:
    """(length before the first EOD, stats of complete documents inside, length after the last EOD,
    whether the shard has an EOD, token counts, quantile sketch) for one shard."""
    from scalelab.data.store import TokenStore

    store = TokenStore.open(store_path)
    tokens = store.shard_array(split, i)
    counts = np.bincount(np.asarray(tokens), minlength=store.vocab_size).astype(np.int64)
    eod = np.flatnonzero(np.asarray(tokens) == store.eod_id)
    if eod.size == 0:
        return int(tokens.size), Moments(), 0, False, counts, Quantiles(k)  # type: ignore[return-value]
    inner = np.diff(eod) - 1
    stats = ColumnStats(quantiles=Quantiles(k)).update(inner)
    return int(eod[0]), stats.moments, int(tokens.size - eod[-1] - 1), True, counts, stats.quantiles  # type: ignore[return-value]


def token_store_stats(
    store: Any, split: str = "train", *, workers: int = 1, k: int = DEFAULT_K, executor: str = "local"
) -> dict[str, Any]:
    """Document-length statistics (tokens per document, EOD excluded) and token frequencies of a split.

    Shards are processed in parallel (`workers` processes, or Ray tasks with ``executor="ray"``);
    documents that span shards are stitched together in order.
    Returns ``{"documents", "tokens", "doc_length": ColumnStats, "token_counts": ndarray[vocab]}``.
    """
    _check_executor(executor)
    n = len(store.shards(split))
    units = [(str(store.path), split, i, k) for i in range(n)]
    doc = ColumnStats(quantiles=Quantiles(k))
    counts = np.zeros(store.vocab_size, dtype=np.int64)
    carry = 0
    for head, moments, tail, has_eod, c, sketch in _run_units(_shard_unit, units, workers, executor):
        counts += c
        if not has_eod:
            carry += head
            continue
        first = ColumnStats(quantiles=Quantiles(k)).update(np.array([carry + head]))
        doc.merge(first)
        doc.merge(ColumnStats(moments, sketch))
        carry = tail
    if carry:
        doc.update(np.array([carry]))  # a trailing document without EOD (not produced by ingest)
    return {
        "documents": doc.moments.count,
        "tokens": int(counts.sum()),
        "doc_length": doc,
        "token_counts": counts,
    }


# ---------------------------------------------------------------------------------- robust scaler
class RobustScaler:
    """Centre by the median and scale by a percentile range, per feature (scikit-learn's shape).

    Fitted from KLL sketches, so `partial_fit` works on chunks of any size and the fit of a table
    larger than memory costs one pass. Fitted attributes: ``center_``, ``scale_``, ``n_features_in_``,
    ``n_samples_seen_``. With ``clip=(lo, hi)``, transformed values are clipped to that range
    (`inverse_transform` cannot undo clipping). A zero range gives scale 1, as in scikit-learn.
    """

    def __init__(
        self,
        quantile_range: tuple[float, float] = (25.0, 75.0),
        *,
        with_centering: bool = True,
        with_scaling: bool = True,
        clip: tuple[float, float] | None = None,
        k: int = DEFAULT_K,
    ) -> None:
        lo, hi = quantile_range
        if not 0 <= lo < hi <= 100:
            raise DataError(f"quantile_range must satisfy 0 <= low < high <= 100, got {quantile_range}")
        if clip is not None and not clip[0] < clip[1]:
            raise DataError(f"clip must be (low, high) with low < high, got {clip}")
        self.quantile_range = (float(lo), float(hi))
        self.with_centering = with_centering
        self.with_scaling = with_scaling
        self.clip = None if clip is None else (float(clip[0]), float(clip[1]))
        self.k = k
        self._sketches: list[Quantiles] | None = None

    @staticmethod
    def _as_2d(X: Any) -> np.ndarray:
        x = np.asarray(X, dtype=np.float64)
        if x.ndim == 1:
            x = x[:, None]
        if x.ndim != 2:
            raise DataError(f"expected a 2-D array (samples × features), got shape {x.shape}")
        return x

    def fit(self, X: Any) -> RobustScaler:
        self._sketches = None
        return self.partial_fit(X)

    def partial_fit(self, X: Any) -> RobustScaler:
        x = self._as_2d(X)
        if self._sketches is None:
            self._sketches = [Quantiles(self.k) for _ in range(x.shape[1])]
            self.n_samples_seen_ = 0
        elif x.shape[1] != len(self._sketches):
            raise DataError(f"X has {x.shape[1]} features, the scaler was fitted with {len(self._sketches)}")
        for j, sk in enumerate(self._sketches):
            sk.update(x[:, j])
        self.n_samples_seen_ += x.shape[0]
        self._refresh()
        return self

    @classmethod
    def from_sketches(cls, sketches: Sequence[Quantiles], **kwargs: Any) -> RobustScaler:
        """A scaler fitted from existing sketches (e.g. from `column_stats`)."""
        scaler = cls(**kwargs)
        scaler._sketches = [Quantiles.from_bytes(s.to_bytes()) for s in sketches]
        scaler.n_samples_seen_ = max((s.n for s in sketches), default=0)
        scaler._refresh()
        return scaler

    def _refresh(self) -> None:
        assert self._sketches is not None
        lo, hi = (q / 100.0 for q in self.quantile_range)
        d = len(self._sketches)
        self.n_features_in_ = d
        self.center_ = (
            np.array([s.quantile(0.5) for s in self._sketches]) if self.with_centering else np.zeros(d)
        )
        if self.with_scaling:
            scale = np.array([s.quantile(hi) - s.quantile(lo) for s in self._sketches])
            scale[~np.isfinite(scale) | (scale == 0)] = 1.0
        else:
            scale = np.ones(d)
        self.scale_ = scale

    def _check(self, X: Any) -> tuple[np.ndarray, bool]:
        if not hasattr(self, "center_"):
            raise DataError("RobustScaler is not fitted yet; call fit or partial_fit first")
        one_d = np.asarray(X).ndim == 1
        x = self._as_2d(X)
        if x.shape[1] != self.n_features_in_:
            raise DataError(f"X has {x.shape[1]} features, the scaler was fitted with {self.n_features_in_}")
        return x, one_d

    def transform(self, X: Any) -> np.ndarray:
        x, one_d = self._check(X)
        out = (x - self.center_) / self.scale_
        if self.clip is not None:
            out = np.clip(out, *self.clip)
        return out[:, 0] if one_d else out

    def fit_transform(self, X: Any) -> np.ndarray:
        return self.fit(X).transform(X)

    def inverse_transform(self, X: Any) -> np.ndarray:
        x, one_d = self._check(X)
        out = x * self.scale_ + self.center_
        return out[:, 0] if one_d else out

    def to_json(self) -> str:
        """Parameters, fitted attributes and the sketches (so `partial_fit` can continue after loading)."""
        state: dict[str, Any] = {
            "type": "RobustScaler",
            "quantile_range": list(self.quantile_range),
            "with_centering": self.with_centering,
            "with_scaling": self.with_scaling,
            "clip": None if self.clip is None else list(self.clip),
            "k": self.k,
        }
        if hasattr(self, "center_"):
            state.update(
                center_=self.center_.tolist(),
                scale_=self.scale_.tolist(),
                n_features_in_=self.n_features_in_,
                n_samples_seen_=self.n_samples_seen_,
                sketches=[s.to_b64() for s in self._sketches or []],
            )
        return json.dumps(state)

    @classmethod
    def from_json(cls, text: str) -> RobustScaler:
        try:
            state = json.loads(text)
        except ValueError as err:
            raise DataError(f"not a RobustScaler JSON ({err})") from None
        if not isinstance(state, dict) or state.get("type") != "RobustScaler":
            raise DataError("not a RobustScaler JSON (missing type)")
        scaler = cls(
            tuple(state["quantile_range"]),  # type: ignore[arg-type]
            with_centering=state["with_centering"],
            with_scaling=state["with_scaling"],
            clip=None if state["clip"] is None else tuple(state["clip"]),  # type: ignore[arg-type]
            k=state["k"],
        )
        if "center_" in state:
            scaler.center_ = np.asarray(state["center_"], dtype=np.float64)
            scaler.scale_ = np.asarray(state["scale_"], dtype=np.float64)
            scaler.n_features_in_ = int(state["n_features_in_"])
            scaler.n_samples_seen_ = int(state["n_samples_seen_"])
            scaler._sketches = [Quantiles.from_b64(s) for s in state.get("sketches", [])] or None
        return scaler


def default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))
