"""`--executor ray` for the data passes, on a local Ray: ingest byte-identical to the local run, column and
token-store statistics equal in their moments and within the sketch's bound in their quantiles."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from scalelab.data.commands import app
from scalelab.data.corpus import JsonlSource, TextSource
from scalelab.data.ingest import ingest
from scalelab.data.stats import column_stats, token_store_stats
from scalelab.data.store import TokenStore
from scalelab.data.tokenize import ByteTokenizer, train_bpe
from scalelab.errors import DataError
from test_data_ingest_parallel import KW, WORDS, make_corpus, store_bytes

ray = pytest.importorskip("ray")

QS = (0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99)


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SCALELAB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


def test_ray_ingest_is_byte_identical_to_local(tmp_path):
    corpus = make_corpus(tmp_path / "c")
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(f'{{"text": "document {i} {" ".join(WORDS[: i % 15])}"}}\n' for i in range(300)))
    sources = [TextSource(corpus), JsonlSource(jsonl, "text")]
    local = ingest(sources, tmp_path / "local", ByteTokenizer(), **KW)
    remote = ingest(
        [TextSource(corpus), JsonlSource(jsonl, "text")],
        tmp_path / "ray",
        ByteTokenizer(),
        executor="ray",
        **KW,
    )
    expected = store_bytes(local)
    assert len([n for n in expected if n.endswith(".bin")]) > 4  # several shards per split
    assert store_bytes(remote) == expected
    bpe = train_bpe([TextSource(corpus)], 300)  # a tokenizer the tasks rebuild from its definition
    assert store_bytes(ingest([TextSource(corpus)], tmp_path / "bl", bpe, **KW)) == store_bytes(
        ingest([TextSource(corpus)], tmp_path / "br", bpe, executor="ray", **KW)
    )


def _table(tmp_path: Path) -> tuple[Path, Path, dict[str, np.ndarray]]:
    rng = np.random.default_rng(3)
    n = 40_000
    data = {"a": rng.lognormal(1, 1, n), "b": rng.integers(0, 1000, n).astype(np.float64)}
    data["a"][::997] = np.nan
    pq.write_table(
        pa.table({**data, "s": [f"x{i}" for i in range(n)]}), tmp_path / "t.parquet", row_group_size=3000
    )
    csv = tmp_path / "t.csv"
    with open(csv, "w") as fh:
        fh.write("a,b,s\n")
        for a, b in zip(data["a"], data["b"], strict=True):
            fh.write(f"{'' if np.isnan(a) else repr(float(a))},{int(b)},x\n")
    return tmp_path / "t.parquet", csv, data


def _within_bound(stats, values: np.ndarray) -> None:
    xs = np.sort(values[~np.isnan(values)])
    eps = stats.quantiles.rank_error
    for q, v in zip(QS, stats.quantiles.quantiles(QS), strict=True):
        below = np.searchsorted(xs, v, side="left") / xs.size
        at_or_below = np.searchsorted(xs, v, side="right") / xs.size
        assert below - eps <= q <= at_or_below + eps, (q, v, below, at_or_below, eps)


def test_ray_column_stats_equal_local(tmp_path):
    parquet, csv, data = _table(tmp_path)
    for path, kw in ((parquet, {}), (csv, {"block_bytes": 64 << 10})):
        local = column_stats(path, ["a", "b"], workers=2, **kw)
        remote = column_stats(path, ["a", "b"], workers=2, executor="ray", **kw)
        for c in ("a", "b"):
            lm, rm = local[c].moments, remote[c].moments
            assert (rm.count, rm.missing, rm.min, rm.max) == (lm.count, lm.missing, lm.min, lm.max)
            # the same units merged in the same order: the same floating-point operations
            assert (rm.mean, rm.m2, rm.m3) == (lm.mean, lm.m2, lm.m3)
            assert remote[c].quantiles.n == local[c].quantiles.n
            _within_bound(remote[c], data[c])
            _within_bound(local[c], data[c])
    with pytest.raises(DataError, match="column 's' is not numeric"):  # raised in a task, shown as itself
        column_stats(csv, ["s"], executor="ray")
    with pytest.raises(DataError, match="executor must be 'local' or 'ray'"):
        column_stats(csv, ["a"], executor="spark")


def test_ray_token_store_stats_equal_local(tmp_path):
    corpus = make_corpus(tmp_path / "c", n_docs=40)
    store = TokenStore.open(ingest([TextSource(corpus)], tmp_path / "s", ByteTokenizer(), **KW))
    local = token_store_stats(store, workers=2)
    remote = token_store_stats(store, executor="ray")
    assert remote["documents"] == local["documents"] and remote["tokens"] == local["tokens"]
    assert np.array_equal(remote["token_counts"], local["token_counts"])
    lm, rm = local["doc_length"].moments, remote["doc_length"].moments
    assert (rm.count, rm.mean, rm.m2, rm.m3, rm.min, rm.max) == (
        lm.count,
        lm.mean,
        lm.m2,
        lm.m3,
        lm.min,
        lm.max,
    )


def test_cli_stats_and_ingest_with_ray_executor(tmp_path):
    parquet, _, _ = _table(tmp_path)
    runner = CliRunner()
    res = runner.invoke(app, ["stats", str(parquet), "--columns", "a,b", "--executor", "ray", "--json"])
    assert res.exit_code == 0, res.output
    assert '"count": 39959' in res.output
    corpus = make_corpus(tmp_path / "c", n_docs=10)
    res = runner.invoke(app, ["ingest", str(corpus), "--out", str(tmp_path / "s"), "--executor", "ray"])
    assert res.exit_code == 0, res.output
    assert TokenStore.open(tmp_path / "s").verify() == []
    res = runner.invoke(app, ["stats", str(parquet), "--columns", "a", "--executor", "dask"])
    assert isinstance(res.exception, DataError) and "--executor" in str(res.exception)
