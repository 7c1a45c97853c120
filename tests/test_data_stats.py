"""Mergeable statistics: exact moment merges, KLL quantiles within their bound, RobustScaler."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy import stats as sps
from typer.testing import CliRunner

from scalelab.data.commands import app
from scalelab.data.corpus import TextSource
from scalelab.data.ingest import ingest, is_heldout
from scalelab.data.stats import (
    DEFAULT_K,
    TARGET_RANK_ERROR,
    ColumnStats,
    Moments,
    Quantiles,
    RobustScaler,
    column_stats,
    k_for_rank_error,
    kll_rank_error,
    token_store_stats,
)
from scalelab.data.store import TokenStore
from scalelab.data.tokenize import ByteTokenizer
from scalelab.errors import DataError


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SCALELAB_CACHE_DIR", str(tmp_path / "cache"))


def assert_moments_close(a: Moments, b: Moments) -> None:
    assert a.count == b.count and a.missing == b.missing
    scale = max(1.0, abs(b.mean))
    assert a.mean == pytest.approx(b.mean, rel=1e-9, abs=1e-9 * scale)
    assert a.m2 == pytest.approx(b.m2, rel=1e-7, abs=1e-9 * scale**2)
    assert a.m3 == pytest.approx(b.m3, rel=1e-6, abs=1e-6 * max(1.0, b.m2) ** 1.5)
    assert (a.min, a.max) == (b.min, b.max)


finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False)


@given(arrays(np.float64, st.integers(1, 400), elements=finite), st.lists(st.integers(0, 400), max_size=3))
@settings(max_examples=150, deadline=None)
def test_merged_moments_equal_single_pass(x, cuts):
    parts = np.split(x, sorted(c % (x.size + 1) for c in cuts))  # 4 "workers" (some may be empty)
    merged = Moments()
    for p in parts:
        merged = merged.merge(Moments.of(p))
    assert_moments_close(merged, Moments.of(x))


def test_moments_against_numpy_and_scipy():
    rng = np.random.default_rng(0)
    x = rng.gamma(2.0, 3.0, size=10_000) + 1e6  # large offset: naive sums would lose precision
    x[::97] = np.nan
    m = Moments()
    for chunk in np.array_split(x, 4):
        m = m.merge(Moments.of(chunk))
    v = x[~np.isnan(x)]
    assert m.count == v.size and m.missing == x.size - v.size
    assert m.mean == pytest.approx(v.mean(), rel=1e-12)
    assert m.variance == pytest.approx(v.var(ddof=1), rel=1e-9)
    assert m.skewness == pytest.approx(sps.skew(v), rel=1e-6)
    assert Moments.from_dict(json.loads(json.dumps(m.to_dict()))) == m


def test_default_k_meets_the_rank_error_target_by_the_librarys_own_bound():
    from datasketches import kll_doubles_sketch

    assert DEFAULT_K == k_for_rank_error(TARGET_RANK_ERROR) == 269
    bound = kll_doubles_sketch.get_normalized_rank_error(DEFAULT_K, False)
    assert Quantiles().rank_error == kll_rank_error(DEFAULT_K) == bound <= 0.01
    assert kll_rank_error(DEFAULT_K - 1) > 0.01  # the smallest such k
    assert Quantiles.from_bytes(Quantiles(64).update(np.arange(10.0)).to_bytes()).k == 64


@given(
    arrays(np.float64, st.integers(1, 3000), elements=finite),
    st.integers(1, 4),
)
@settings(max_examples=40, deadline=None)
def test_kll_quantiles_within_rank_error(x, n_parts):
    parts = [Quantiles().update(p) for p in np.array_split(x, n_parts)]
    sk = parts[0]
    for p in parts[1:]:
        sk.merge(Quantiles.from_bytes(p.to_bytes()))
    assert sk.n == x.size
    eps = sk.rank_error
    xs = np.sort(x)
    n = xs.size
    for q in (0.0, 0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0):
        v = sk.quantile(q)
        below = np.searchsorted(xs, v, side="left") / n  # share strictly below v
        at_or_below = np.searchsorted(xs, v, side="right") / n
        assert below - eps <= q <= at_or_below + eps, (q, v, below, at_or_below, eps)
        exact = np.quantile(xs, q)
        lo = np.quantile(xs, max(0.0, q - eps), method="lower")
        hi = np.quantile(xs, min(1.0, q + eps), method="higher")
        assert lo <= v <= hi or math.isclose(v, exact)


def test_column_stats_parquet_and_csv_parallel_equal_single(tmp_path):
    rng = np.random.default_rng(1)
    n = 50_000
    data = {"a": rng.normal(5, 2, n), "b": rng.integers(0, 1000, n), "s": [f"x{i}" for i in range(n)]}
    data["a"][::1000] = np.nan
    pq.write_table(pa.table(data), tmp_path / "t.parquet", row_group_size=4000)
    csv = tmp_path / "t.csv"
    with open(csv, "w") as fh:
        fh.write("a,b,s\n")
        for a, b, s in zip(data["a"], data["b"], data["s"], strict=True):
            fh.write(f"{'' if np.isnan(a) else repr(float(a))},{b},{s}\n")
    single = column_stats(tmp_path / "t.parquet", ["a", "b"], workers=1)
    par = column_stats(tmp_path / "t.parquet", ["a", "b"], workers=4)
    csv_par = column_stats(csv, ["a", "b"], workers=4, block_bytes=64 << 10)
    for c in ("a", "b"):
        assert_moments_close(par[c].moments, single[c].moments)
        assert_moments_close(csv_par[c].moments, single[c].moments)
    v = data["a"][~np.isnan(data["a"])]
    assert single["a"].moments.count == v.size and single["a"].moments.missing == 50
    assert single["a"].summary()["p50"] == pytest.approx(np.median(v), abs=0.1)
    with pytest.raises(DataError, match="column 's' is not numeric"):
        column_stats(tmp_path / "t.parquet", ["a", "s"])
    with pytest.raises(DataError, match="column 's' is not numeric"):
        column_stats(csv, ["s"])
    with pytest.raises(DataError, match="no column 'zz'"):
        column_stats(csv, ["zz"])


def test_token_store_stats(tmp_path):
    corpus = tmp_path / "c"
    corpus.mkdir()
    lengths = [10, 5000, 3, 700, 9000, 1]
    for i, n in enumerate(lengths):
        (corpus / f"{i}.txt").write_text("a" * n)
    out = ingest(
        [TextSource(corpus)], tmp_path / "s", ByteTokenizer(), heldout_fraction=0.01, shard_tokens=1024
    )
    store = TokenStore.open(out)
    held = store.num_documents("heldout")
    res = token_store_stats(store, workers=2)
    train_lengths = sorted(n for i, n in enumerate(lengths) if not is_heldout(f"0:{i}.txt", 0.01))
    assert res["documents"] == len(lengths) - held == len(train_lengths)
    assert res["doc_length"].moments.mean == pytest.approx(np.mean(train_lengths))
    assert res["doc_length"].moments.max == max(train_lengths)
    assert res["token_counts"][256] == len(train_lengths)
    assert res["token_counts"][ord("a")] == sum(train_lengths)


def test_robust_scaler_round_trip_and_json():
    rng = np.random.default_rng(2)
    X = np.column_stack([rng.normal(10, 3, 5000), rng.exponential(2, 5000), np.full(5000, 7.0)])
    sc = RobustScaler((25, 75)).fit(X)
    assert sc.n_features_in_ == 3 and sc.n_samples_seen_ == 5000
    eps = 0.02
    for j in range(2):
        assert np.quantile(X[:, j], 0.5 - eps) <= sc.center_[j] <= np.quantile(X[:, j], 0.5 + eps)
    assert sc.scale_[2] == 1.0  # constant feature: no division by zero
    Z = sc.transform(X)
    np.testing.assert_allclose(sc.inverse_transform(Z), X, rtol=1e-12, atol=1e-12)
    again = RobustScaler.from_json(sc.to_json())
    np.testing.assert_array_equal(again.transform(X), Z)
    # partial_fit in chunks ≈ fit in one go
    inc = RobustScaler()
    for chunk in np.array_split(X, 7):
        inc.partial_fit(chunk)
    assert inc.n_samples_seen_ == 5000
    np.testing.assert_allclose(inc.center_, sc.center_, atol=0.3)
    # continue fitting after a JSON round trip
    cont = RobustScaler.from_json(inc.to_json()).partial_fit(X[:10])
    assert cont.n_samples_seen_ == 5010
    clipped = RobustScaler(clip=(-1, 1)).fit(X[:, :1]).transform(X[:, 0])
    assert clipped.ndim == 1 and clipped.min() >= -1 and clipped.max() <= 1
    with pytest.raises(DataError, match="not fitted"):
        RobustScaler().transform(X)
    with pytest.raises(DataError, match="features"):
        sc.transform(X[:, :2])
    from_sk = RobustScaler.from_sketches([Quantiles().update(X[:, 0])])
    assert from_sk.center_[0] == pytest.approx(sc.center_[0], abs=0.3)
    assert isinstance(ColumnStats().update(X[:, 0]).summary()["p50"], float)


def test_cli_commands(tmp_path):
    corpus = tmp_path / "c"
    corpus.mkdir()
    for i in range(20):
        (corpus / f"{i}.txt").write_text("hello world " * (50 + i))
    runner = CliRunner()
    store = tmp_path / "store"
    r = runner.invoke(
        app,
        ["ingest", str(corpus), "--out", str(store), "--shard-tokens", "2048", "--heldout-fraction", "0.2"],
    )
    assert r.exit_code == 0, r.output
    assert "train" in r.output
    r = runner.invoke(app, ["verify", str(store)])
    assert r.exit_code == 0 and "✓" in r.output
    r = runner.invoke(app, ["info", str(store), "--json"])
    assert r.exit_code == 0 and json.loads(r.output)["tokenizer"] == "byte"
    r = runner.invoke(app, ["stats", str(store), "--json"])
    assert r.exit_code == 0 and json.loads(r.output)["documents"] > 0
    pq.write_table(pa.table({"x": np.arange(100.0)}), tmp_path / "t.parquet")
    r = runner.invoke(app, ["stats", str(tmp_path / "t.parquet"), "--columns", "x", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["columns"]["x"]["mean"] == pytest.approx(49.5)
    r = runner.invoke(app, ["stats", str(tmp_path / "t.parquet"), "--columns", "x"])
    assert r.exit_code == 0 and "x" in r.output
    tok = tmp_path / "tok.json"
    r = runner.invoke(app, ["train-tokenizer", str(corpus), "--out", str(tok), "--vocab-size", "300"])
    assert r.exit_code == 0 and tok.is_file(), r.output
    shard = store / "train-00000.bin"
    shard.write_bytes(b"\x01" + shard.read_bytes()[1:])
    r = runner.invoke(app, ["verify", str(store)])
    assert r.exit_code == 1 and "train-00000.bin" in r.output
